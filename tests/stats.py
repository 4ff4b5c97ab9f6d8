"""Chi-square goodness of fit without scipy."""
import torch


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of observed counts [K] against probabilities [K]; cells expected < min_expected pooled."""
    counts, probs = counts.double(), probs.double()
    expected = probs * counts.sum()
    small = expected < min_expected
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum().view(1)])
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    if expected[-1] == 0:
        assert counts[-1] == 0, "a draw fell on a cell of probability 0"
        counts, expected = counts[:-1], expected[:-1]
    stat = ((counts - expected) ** 2 / expected).sum()
    df = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))

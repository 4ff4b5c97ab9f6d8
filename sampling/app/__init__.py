"""What the programs (``main.py``, ``eval_dolly.py``, ``serving.py``, the benchmarks) build on the
algorithm core: command-line flags and one-line errors (``cli``), loading models and tokenizers
(``models``), prompts in batches (``batching``), and the server's request scheduler (``scheduler``)."""

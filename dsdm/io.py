"""Disk conventions shared by every stage: atomic writes, JSON sidecars, completion markers, fingerprints.

A stage writes only under its own directory; each finished output directory holds `_done.json` with the config slice
that produced it, the dsdm version, the git SHA and the wall time. Re-running a stage whose marker matches its config
does nothing; a mismatch is refused, naming the keys that changed (pass --force to redo the stage).
Writes go to a temporary name in the same directory and are renamed into place, so a crash leaves either nothing or a
whole file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

DONE_FILE = "_done.json"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds, delete it otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic, human-readable JSON (2-space indent, keys in insertion order, trailing newline)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """np.save, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def open_memmap(path: str | Path, shape: tuple[int, ...], dtype: Any, fill: Any = None) -> np.memmap:
    """Open an .npy memmap for read/write, creating it (atomically, optionally filled) if it does not exist.

    An existing file must have the same shape and dtype; otherwise it is refused (stale store from another config).
    """
    path = Path(path)
    if path.exists():
        mm = np.load(path, mmap_mode="r+")
        if mm.shape != tuple(shape) or mm.dtype != np.dtype(dtype):
            raise ValueError(
                f"{path}: existing array has shape {mm.shape} {mm.dtype}, expected {tuple(shape)} {np.dtype(dtype)}; "
                "it belongs to another configuration; delete it or use another output directory"
            )
        return mm
    with atomic_path(path) as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
        if fill is not None:
            mm[...] = fill
        mm.flush()
        del mm
    return np.load(path, mmap_mode="r+")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_sha() -> str | None:
    """The dsdm checkout's commit, if dsdm runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance() -> dict:
    """What produced an output: dsdm version, git SHA, Python/torch/numpy versions, host."""
    import torch

    from dsdm import __version__

    return {
        "dsdm_version": __version__,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "host": platform.node(),
    }


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        for k in sorted(set(old) | set(new), key=str):
            keys += _diff_keys(old.get(k, "<missing>"), new.get(k, "<missing>"), f"{prefix}{k}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]


def is_done(stage_dir: str | Path, config: dict, force: bool = False) -> bool:
    """True if `stage_dir` holds a completion marker written with this exact `config`.

    A marker from a different config raises ValueError naming the changed keys, unless `force` (then False: redo).
    """
    marker = Path(stage_dir) / DONE_FILE
    if not marker.exists():
        return False
    old = read_json(marker).get("config", {})
    new = json.loads(json.dumps(config, default=_json_default))
    if old == new:
        return True
    if force:
        return False
    changed = ", ".join(_diff_keys(old, new)) or "(unknown)"
    raise ValueError(
        f"{stage_dir} was produced by a different configuration (changed: {changed}). "
        "Use another output directory, or pass --force to redo this stage."
    )


def mark_done(stage_dir: str | Path, config: dict, started: float | None = None, **extra: Any) -> dict:
    """Write `_done.json` (config + provenance + wall time + extra) last, after every output is in place."""
    record = {
        "config": config,
        **provenance(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_time_s": None if started is None else round(time.time() - started, 3),
        **extra,
    }
    write_json(Path(stage_dir) / DONE_FILE, record)
    return record


def clear_done(stage_dir: str | Path) -> None:
    """Remove a completion marker before a stage rewrites its outputs."""
    marker = Path(stage_dir) / DONE_FILE
    if marker.exists():
        marker.unlink()

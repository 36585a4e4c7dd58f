"""Disk conventions shared by every stage: atomic writes, JSON sidecars, stage records, fingerprints, the run lock.

A stage writes only under its own directory; each finished output directory holds one record, `_done.json`, written
last (docs/runner.md):

    {"stage": ..., "config": <the stage's config slice>, "config_hash": sha256(canonical JSON of the slice),
     "inputs": {upstream name: upstream record key}, "key": sha256(config + inputs),
     "outputs": {relative path: sha256 of the file}, "finished": ..., "wall_time_s": ..., dsdm version, git SHA}

Re-running a stage whose record matches its config and inputs does nothing; a mismatch is refused, naming the keys
that changed (pass --force to redo the stage). `verify` re-hashes every record's outputs, so a changed, missing or
truncated file is found and named.
Writes go to a temporary name in the same directory and are renamed into place, so a crash leaves either nothing or a
whole file; a directory without its record is unfinished and is redone (or resumed where the stage can).

Test hook (used by the crash tests, never set in normal use): DSDM_FAULT=kill@N sends SIGKILL to this process at the
N-th atomic write, DSDM_FAULT=enospc@N raises OSError(ENOSPC) there, DSDM_FAULT=count=FILE appends "N<TAB>path" to FILE
for every atomic write (the map from write numbers to the stages that make them).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

DONE_FILE = "_done.json"
LOCK_FILE = ".lock"
IGNORED_DIRS = {"checkpoint"}  # in-progress state of a running stage: never part of its recorded outputs


# -----------------------------------------------------------------------------
# Fault injection for the crash tests (see the module docstring)

_fault_count = 0


def _fault_point(path: Path) -> str | None:
    """Count one atomic write (of `path`); act on DSDM_FAULT. Returns "after" when the kill must follow the rename."""
    global _fault_count
    spec = os.environ.get("DSDM_FAULT")
    if not spec:
        return None
    _fault_count += 1
    if spec.startswith("count="):
        with open(spec[6:], "a", encoding="utf-8") as f:
            f.write(f"{_fault_count}\t{path}\n")
        return None
    action, _, at = spec.partition("@")
    if not at.isdigit() or _fault_count != int(at):
        return None
    if action == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (injected by DSDM_FAULT)")
    if action == "kill":
        if _fault_count % 2:  # odd points die before the rename (a temp file is left), even points after it
            _die()
        return "after"
    raise ValueError(f"DSDM_FAULT={spec!r}: expected kill@N, enospc@N or count=FILE")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


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
        kill_after_rename = _fault_point(path) == "after"
        os.replace(tmp, path)
        if kill_after_rename:
            _die()
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


def npy_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a C-order .npy file, read from its header alone."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(
                f"{path}: .npy format version {version} is not one dsdm writes; delete the file to redo it"
            )
        shape, fortran_order, dtype = read(f)
        if fortran_order:
            raise ValueError(f"{path}: a Fortran-order .npy has no contiguous rows; delete the file to redo it")
        return tuple(shape), dtype, f.tell()


def pwrite_rows(path: str | Path, row_start: int, array: np.ndarray) -> None:
    """Write `array` into rows [row_start, row_start + len(array)) of the existing .npy at `path` as ONE byte range
    (os.pwrite at header length + row_start * row bytes), then fsync. array: (m, *row shape) of the file's dtype.

    Not through a writable memmap: a memmap writes back whole pages, and on a shared filesystem (NFS) a page that
    straddles another host's rows could be written back with stale bytes over them (docs/estimator.md, "Feature
    store"). Every other byte of the file is left untouched, so sparse stores stay sparse."""
    path = Path(path)
    shape, dtype, offset = npy_header(path)
    rows = np.asarray(array)
    if rows.dtype != dtype or rows.shape[1:] != shape[1:] or rows.ndim != len(shape):
        raise ValueError(
            f"{path}: holds rows of {dtype} {shape[1:]}, was handed {rows.dtype} {rows.shape[1:]} "
            f"(array {rows.shape}); it belongs to another configuration: delete it or use another output directory"
        )
    if not 0 <= row_start <= row_start + len(rows) <= shape[0]:
        raise ValueError(f"{path}: rows {row_start}-{row_start + len(rows)} are outside its {shape[0]} rows")
    data = memoryview(np.ascontiguousarray(rows).reshape(-1).view(np.uint8))
    pos = offset + row_start * dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    fd = os.open(path, os.O_WRONLY)
    try:
        while data:  # pwrite may write fewer bytes than asked (signals, NFS): loop until all are written
            n = os.pwrite(fd, data, pos)
            data, pos = data[n:], pos + n
        os.fsync(fd)
    finally:
        os.close(fd)


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


def canonical_json(obj: Any) -> str:
    """The one serialization every hash is taken of: sorted keys, no spaces, numpy/Path converted."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def plain(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples -> lists, numpy scalars -> Python), for comparisons."""
    return json.loads(canonical_json(obj))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def record_key(config: Any, inputs: dict | None = None) -> str:
    """Identity of a stage's result: sha256 of its config slice and its inputs' keys."""
    return sha256_text(canonical_json({"config": config, "inputs": inputs or {}}))


def output_hashes(stage_dir: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file a stage wrote under `stage_dir`, in sorted order.

    Left out: records (_done.json), dot-files and dot-folders (the run lock, temporary files of writes in progress or
    interrupted, scratch stores), checkpoint/ folders, and sub-folders that hold their own record (a nested stage:
    its record hashes its own files)."""
    root = Path(stage_dir)
    out: dict[str, str] = {}

    def walk(d: Path) -> None:
        for p in sorted(d.iterdir()):
            if p.is_dir():
                # dot-folders are scratch (SemDeDup's .semdedup-*, a Ray pool build's .parts): a killed run may leave
                # them, and they are not what the stage produced
                if p.name not in IGNORED_DIRS and not p.name.startswith(".") and not (p / DONE_FILE).exists():
                    walk(p)
            elif p.is_file() and p.name != DONE_FILE and not p.name.startswith("."):
                out[p.relative_to(root).as_posix()] = sha256_file(p)

    if root.is_dir():
        walk(root)
    return out


def read_record(stage_dir: str | Path) -> dict | None:
    """The stage's `_done.json`, or None if the stage has not finished."""
    marker = Path(stage_dir) / DONE_FILE
    return read_json(marker) if marker.exists() else None


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        for k in sorted(set(old) | set(new), key=str):
            keys += _diff_keys(old.get(k, "<missing>"), new.get(k, "<missing>"), f"{prefix}{k}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]


def is_done(stage_dir: str | Path, config: dict, force: bool = False) -> bool:
    """True if `stage_dir` holds a record written with this exact `config`.

    A record from a different config raises ValueError naming the changed keys. force: always False (redo), also
    when the config matches: `--force` means recompute, whatever the record says.
    """
    record = read_record(stage_dir)
    if record is None or force:
        return False
    changed = _diff_keys(record.get("config", {}), plain(config))
    if not changed:
        return True
    raise ValueError(
        f"{stage_dir} was produced by a different configuration (changed: {', '.join(changed)}). "
        "Use another output directory, or pass --force to redo this stage."
    )


def mark_done(
    stage_dir: str | Path,
    config: dict,
    started: float | None = None,
    *,
    inputs: dict | None = None,
    stage: str | None = None,
    **extra: Any,
) -> dict:
    """Write the stage record `_done.json` last, after every output is in place; it hashes the outputs."""
    stage_dir = Path(stage_dir)
    config = plain(config)
    inputs = plain(inputs or {})
    record = {
        "stage": stage or stage_dir.name,
        "config": config,
        "config_hash": sha256_text(canonical_json(config)),
        "inputs": inputs,
        "key": record_key(config, inputs),
        "outputs": output_hashes(stage_dir),
        **provenance(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_time_s": None if started is None else round(time.time() - started, 3),
        **extra,
    }
    write_json(stage_dir / DONE_FILE, record)
    return record


def clear_done(stage_dir: str | Path) -> None:
    """Remove a completion marker before a stage rewrites its outputs."""
    marker = Path(stage_dir) / DONE_FILE
    if marker.exists():
        marker.unlink()


# -----------------------------------------------------------------------------
# One writer per run directory


class RunLocked(ValueError):
    """Another process holds the run directory's lock."""


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold an advisory lock on `run_dir` (flock on <run_dir>/.lock) for the duration of the block.

    A second process on the same directory is refused at once with the holder's pid; the lock dies with its process,
    so a killed run never leaves a stale lock behind."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunLocked(
                f"{run_dir} is in use by another dsdm process (pid {holder}); wait for it to finish or stop it, "
                "or use another output directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


# -----------------------------------------------------------------------------
# verify: the records read back


def verify(run_dir: str | Path) -> tuple[list[str], int]:
    """Re-hash the outputs of every stage record under `run_dir`. -> (problems, files checked).

    A problem names the file and what is wrong: changed (sha256 differs), missing, or an unfinished stage that a
    finished one depends on. Records without `outputs` (written by dsdm before records hashed their outputs) are
    reported as unverifiable."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory")
    problems: list[str] = []
    checked = 0
    records = sorted(run_dir.rglob(DONE_FILE))
    if not records:
        problems.append(f"{run_dir}: no stage records ({DONE_FILE}) found; is this a dsdm run directory?")
    for marker in records:
        stage_dir = marker.parent
        try:
            record = read_json(marker)
        except (OSError, ValueError) as e:
            problems.append(f"{marker}: unreadable record ({e})")
            continue
        outputs = record.get("outputs")
        if outputs is None:
            problems.append(f"{marker}: record has no output hashes (written by an older dsdm); cannot verify")
            continue
        for rel, digest in outputs.items():
            path = stage_dir / rel
            checked += 1
            if not path.is_file():
                problems.append(f"{path}: missing (recorded by {marker})")
            elif sha256_file(path) != digest:
                problems.append(f"{path}: changed since it was written (sha256 differs from {marker})")
        run = record.get("run") or {}
        for name, key in (run.get("inputs") or {}).items():
            if name in run.get("external", []):
                continue  # not part of this run directory (e.g. a pool given by path)
            upstream = read_record(run_dir / name)
            if upstream is None or (upstream.get("run") or {}).get("key") != key:
                problems.append(f"{stage_dir}: its input {name} is missing or was recomputed after it (stale)")
    return problems, checked

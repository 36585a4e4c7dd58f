"""The one selection writer: indices.npy + selection.json, used by `dsdm select`, `dsdm baseline` and the runner.

A selection directory holds
    indices.npy      (k,) int64 pool indices (`indices_order`: "ascending", or "best-first" for `dsdm select`)
    selection.json   the record below (format dsdm-selection/2)
and the caller's stage record (_done.json, dsdm.io.mark_done), written after both.

selection.json fields: format, method, k, seed (None when the rule draws nothing), target (task names; [] for an
untargeted method), target_specs, pool {path, fingerprint, num_examples}, rule (how the indices follow from the
scores), sign, scores_file (None for methods without a stored score vector), indices_file, indices_order, config
(the method's settings), composition ({source: count}), plus what the method reports about its fit (e.g. SemDeDup's
kept fraction). The sign convention itself is stated once, in dsdm/select.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dsdm.io import read_json, save_npy, write_json

FORMAT = "dsdm-selection/2"
SIGN = "larger score = more helpful; the rule keeps the largest scores (dsdm/select.py)"
ORDERS = ("ascending", "best-first")


def composition(pool, indices: np.ndarray) -> dict[str, int]:
    """{source: number of selected examples}, sorted by source; streams the `source` column of the row groups
    holding `indices` (Pool.value_counts), so no per-example Python string is made."""
    return pool.value_counts("source", indices)


def write(
    out_dir: str | Path,
    indices: np.ndarray,
    *,
    pool,
    method: str,
    rule: str,
    seed: int | None,
    target: list[str] = (),
    target_specs: list[str] = (),
    config: dict | None = None,
    scores_file: str | None = None,
    order: str = "ascending",
    **info: Any,
) -> dict:
    """Write indices.npy and selection.json under `out_dir`; returns the record. indices: (k,) distinct pool indices."""
    indices = np.asarray(indices, dtype=np.int64)
    if order not in ORDERS:
        raise ValueError(f"indices order must be one of {ORDERS}, got {order!r}")
    if indices.ndim != 1 or np.unique(indices).size != indices.size:
        raise ValueError(f"a selection must be distinct pool indices, shape (k,); got shape {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= len(pool)):
        raise ValueError(f"selection indices must lie in [0, {len(pool)})")
    if order == "ascending" and np.any(np.diff(indices) <= 0):
        raise ValueError("indices_order 'ascending' needs sorted indices")
    record = {
        "format": FORMAT,
        "method": method,
        "k": int(indices.size),
        "seed": None if seed is None else int(seed),
        "target": list(target),
        "target_specs": [str(s) for s in target_specs],
        "pool": {"path": str(Path(pool.path).resolve()), "fingerprint": pool.fingerprint, "num_examples": len(pool)},
        "rule": rule,
        "sign": SIGN,
        "scores_file": scores_file,
        "indices_file": "indices.npy",
        "indices_order": order,
        "config": config or {},
        "composition": composition(pool, indices),
        **info,
    }
    out_dir = Path(out_dir)
    save_npy(out_dir / "indices.npy", indices)
    write_json(out_dir / "selection.json", record)
    return record


def read(sel_dir: str | Path) -> tuple[np.ndarray, dict]:
    """(indices, record) of a selection directory; refuses other formats with the fix."""
    sel_dir = Path(sel_dir)
    path = sel_dir / "selection.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a selection directory (written by dsdm select/baseline)")
    record = read_json(path)
    if record.get("format") != FORMAT:
        raise ValueError(f"{path}: format {record.get('format')!r}, expected {FORMAT}; re-run the selection")
    return np.load(sel_dir / record["indices_file"]), record

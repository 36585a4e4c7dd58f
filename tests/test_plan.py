"""dsdm plan against a measured run: configs/micro.yaml's pool shape and featurize settings, a pool and a feature
store actually written, their bytes on disk vs the plan's prediction (within 2x); warnings name their knob. Run:
    .venv/bin/python -m pytest -q tests/test_plan.py
"""

from pathlib import Path

import numpy as np
import torch

from dsdm import featurize as F
from dsdm.experiment import load_experiment
from dsdm.io import write_json
from dsdm.model import build_model, save_model
from dsdm.plan import check_fit, plan, table
from dsdm.pool import Pool, PoolWriter

ROOT = Path(__file__).resolve().parents[1]


def disk(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def test_plan_disk_is_within_2x_of_a_measured_featurize(tmp_path):
    """The micro config's pool (240 examples of 32 tokens) and its featurize settings (2 micro proxies, k = 64,
    float32, shards of 256), written for real: the plan's pool and features disk are within 2x of the bytes used."""
    cfg = load_experiment(ROOT / "configs" / "micro.yaml", base_dir=tmp_path)
    rng = np.random.default_rng(0)
    w = PoolWriter(tmp_path / "pool", vocab_size=97)
    for i in range(240):
        w.add(rng.integers(1, 97, size=32), doc_id=f"d{i}", source="s")
    pool = Pool(w.close({"seq_len": 32, "eos_id": 0}, {}))
    for m in range(cfg.proxy["n"]):
        torch.manual_seed(m)
        save_model(build_model(cfg.proxy["train"]["preset"], vocab_size=97, seq_len=32), tmp_path / f"proxies/p{m}")
    models = [f"p{m}" for m in range(cfg.proxy["n"])]
    write_json(tmp_path / "proxies" / "manifest.json", {"pool_fingerprint": pool.fingerprint, "models": models})
    fcfg = F.FeaturizeConfig(**{**cfg.featurize, "device": "cpu"})
    F.run(tmp_path / "pool", tmp_path / "proxies", tmp_path / "features", fcfg)

    stages, warnings, note = plan(cfg, len(pool), 32, 97)
    predicted = {s.stage: s.disk for s in stages}
    for stage, folder in (("pool", "pool"), ("features", "features")):
        measured = disk(tmp_path / folder)
        assert measured / 2 <= predicted[stage] <= 2 * measured, (stage, predicted[stage], measured)
    assert "measured" in note and "| features |" in table(stages)


def test_plan_warns_naming_the_knob(tmp_path):
    cfg = load_experiment(ROOT / "configs" / "micro.yaml", ["featurize.shard_size=8"], base_dir=tmp_path)
    stages, warnings, _ = plan(cfg, 240, 32, 97)
    assert any("featurize.shard_size" in w for w in warnings), warnings
    big = load_experiment(ROOT / "configs" / "micro.yaml", ["featurize.proj_dim=200000"], base_dir=tmp_path)
    stages, warnings, _ = plan(big, 240, 32, 97, gpu="a100")
    assert any("GPU memory" in w and "featurize.proj_dim" in w for w in warnings), warnings
    fit = check_fit(stages, tmp_path, ram_bytes=1 << 30)
    assert any("peak RAM" in w and "featurize.proj_dim" in w for w in fit), fit

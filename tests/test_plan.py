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
    small = ["featurize.shard_size=8", "featurize.gram_group=1"]  # 30 Gram partials of the micro features' size
    cfg = load_experiment(ROOT / "configs" / "micro.yaml", small, base_dir=tmp_path)
    stages, warnings, _ = plan(cfg, 240, 32, 97)
    assert any("featurize.gram_group" in w and "featurize.shard_size" in w for w in warnings), warnings
    default = load_experiment(ROOT / "configs" / "micro.yaml", small[:1], base_dir=tmp_path)
    assert not any("Gram partials" in w for w in plan(default, 240, 32, 97)[1])  # 1 group of 256 shards
    # dense: the feature dim is k itself (the factorized sketch caps it at the layers' sizes, 15k for micro)
    over = ["featurize.proj_dim=200000", "featurize.projector=dense"]
    big = load_experiment(ROOT / "configs" / "micro.yaml", over, base_dir=tmp_path)
    stages, warnings, _ = plan(big, 240, 32, 97, gpu="a100")
    assert any("GPU memory" in w and "featurize.proj_dim" in w for w in warnings), warnings
    fit = check_fit(stages, tmp_path, ram_bytes=1 << 30)
    assert any("peak RAM" in w and "featurize.proj_dim" in w for w in fit), fit


def test_plan_disk_is_within_2x_of_a_whole_micro_run(tmp_path):
    """configs/micro.yaml run end to end on the runner test's micro data (240 x 32 tokens, 3 tasks, 38 models):
    every stage's planned disk is within 2x of the blocks its folders use."""
    from test_experiment import build_micro_data

    from dsdm.cli import main
    from dsdm.config import save_config

    build_micro_data(tmp_path)
    cfg = load_experiment(ROOT / "configs" / "micro.yaml", base_dir=tmp_path)
    save_config(cfg, tmp_path / "micro.yaml")
    out = tmp_path / "run"
    assert main(["experiment", str(tmp_path / "micro.yaml"), "--out", str(out)]) == 0
    pool = Pool(tmp_path / "pool")
    stages, warnings, _ = plan(cfg, len(pool), pool.seq_len, pool.vocab_size)
    assert not any("not readable" in w for w in warnings), warnings  # the task sizes were read, not assumed
    predicted = {s.stage: s.disk for s in stages}
    measured = {
        "pool": disk(tmp_path / "pool"),
        "proxies": disk(out / "proxies"),
        "features": disk(out / "features"),
        "scores": disk(out / "scores" / "dsdm"),
        "baselines": disk(out / "scores") - disk(out / "scores" / "dsdm"),
        "models": disk(out / "models") + disk(out / "selections"),
        "eval": disk(out / "eval"),
    }
    assert set(predicted) == set(measured)
    for stage, used in measured.items():
        assert used / 2 <= predicted[stage] <= 2 * used, (stage, predicted[stage], used)


def test_cpu_cost_model_reproduces_its_measurements():
    """The fitted training cost is within 1.4x of every measured throughput it was fitted to, and the featurize
    model passes through both measured featurize rates (docs/benchmarks.md "Featurize", the demo's features record)."""
    from dsdm.plan import CPU_FEATURIZE_MEASURED, CPU_TRAIN_MEASURED, _feat_s, _train_s, cpu_model

    m = cpu_model()
    for preset, over, vocab, seq_len, rate in CPU_TRAIN_MEASURED:
        assert 1 / 1.4 < rate * _train_s(m, preset, vocab, seq_len, **over) < 1.4, (preset, vocab, seq_len)
    for preset, over, vocab, seq_len, rate in CPU_FEATURIZE_MEASURED:
        assert abs(rate * _feat_s(m, preset, vocab, seq_len, **over) - 1) < 1e-6
    # what drives the cost at these sizes: the vocabulary (LM head and softmax) and the preset
    assert _train_s(m, "nano", 4096, 128) > 2 * _train_s(m, "nano", 512, 128) > 2 * _train_s(m, "micro", 512, 128)


def test_plan_times_the_repro_within_25_percent_of_its_records():
    """configs/repro-cpu.yaml at T = 3.77M tokens (the run of 2026-11-29 on a quarter of the full build: 125,876 pool
    examples, all six methods, local executor) against that run's stage records (2 quiet cores; docs/benchmarks.md
    "`dsdm plan` against measured runs"). Features and models are predictions, not calibrations: the featurize rate
    comes from the demo's record and the training rate from "Learning regime". Before the nano recalibration the
    plan said 35 min of features for the 15 min measured."""
    at_t = ["budget.tokens=3768320", "pool.build.sample_fraction=0.25", "proxy.fraction=0.4", "training.executor=local"]
    at_t.append("budget.compute_scaling=tokens")  # that run's curve: nano on c x T tokens
    at_t.append("methods=[random, semdedup, dsdm, dsdm-inverse, dsir, classifier]")
    cfg = load_experiment(ROOT / "configs" / "repro-cpu.yaml", at_t)  # tasks absent in CI: their sizes assumed
    stages = {s.stage: s.seconds for s in plan(cfg, 125876, 128, 512)[0]}
    measured = {"features": 910.675, "models": 4063.1, "baselines": 59.763 + 59.452 + 43.306}
    for stage, seconds in measured.items():
        assert 0.8 < stages[stage] / seconds < 1.25, (stage, stages[stage], seconds)

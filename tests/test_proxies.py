"""Proxies (dsdm.proxies): subsets are independent of the number of proxies, every proxy gets its own trainer seed
(also when the user sets train.seed), and a re-run after an interruption does not retrain a finished proxy.

A 40-example pool and the micro preset for a few steps keep it fast. Run: pytest tests/test_proxies.py
"""

import json

import numpy as np
import pytest
from test_models import _pool

from dsdm.proxies import ProxiesConfig, draw_subset, run

TRAIN = {"preset": "micro", "steps": 3, "batch_size": 4, "device": "cpu", "log_every": 1}


def _seed(d, m) -> int:
    return json.loads((d / f"proxy_{m}" / "train.json").read_text())["config"]["seed"]


def test_subsets_do_not_depend_on_the_number_of_proxies(tmp_path):
    pool = _pool(tmp_path / "pool")
    a = run(pool.path, tmp_path / "a", ProxiesConfig(n=2, fraction=0.5, seed=3, train=TRAIN))
    b = run(pool.path, tmp_path / "b", ProxiesConfig(n=3, fraction=0.5, seed=3, train=TRAIN))
    for m in range(2):
        sa, sb = (np.load(d / "subsets" / f"proxy_{m}.npy") for d in (a, b))
        assert np.array_equal(sa, sb) and np.array_equal(sa, draw_subset(40, 0.5, 3, m))
        wa, wb = ((d / f"proxy_{m}" / "model.safetensors").read_bytes() for d in (a, b))
        assert wa == wb
    subsets = [np.load(b / "subsets" / f"proxy_{m}.npy") for m in range(3)]
    assert all(s.size == 20 and np.unique(s).size == 20 and s.dtype == np.int64 for s in subsets)
    assert not np.array_equal(subsets[0], subsets[1])  # distinct draws, not one subset reused
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["models"] == ["proxy_0", "proxy_1", "proxy_2"] and manifest["num_proxies"] == 3


@pytest.mark.parametrize("train_seed", [None, 5])
def test_every_proxy_gets_its_own_seed(tmp_path, train_seed):
    # fraction 1: every proxy sees the same examples, so only the seed can tell their weights apart
    pool = _pool(tmp_path / "pool")
    train = TRAIN if train_seed is None else {**TRAIN, "seed": train_seed}
    d = run(pool.path, tmp_path / "p", ProxiesConfig(n=3, fraction=1.0, seed=2, train=train))
    seeds = [_seed(d, m) for m in range(3)]
    assert len(set(seeds)) == 3
    base = 2 if train_seed is None else train_seed
    assert seeds == [base * 1000 + m for m in range(3)]  # the default rule is unchanged; a set seed is the base
    weights = [(d / f"proxy_{m}" / "model.safetensors").read_bytes() for m in range(3)]
    assert len(set(weights)) == 3


def test_a_finished_proxy_is_not_retrained(tmp_path):
    pool = _pool(tmp_path / "pool")
    cfg = ProxiesConfig(n=2, fraction=0.5, seed=0, train=TRAIN)
    d = run(pool.path, tmp_path / "p", cfg)
    stamp = {m: (d / f"proxy_{m}" / "_done.json").stat().st_mtime_ns for m in range(2)}
    weights1 = (d / "proxy_1" / "model.safetensors").read_bytes()
    # an interruption after proxy 0: proxy 1 and the stage record are missing
    (d / "_done.json").unlink()
    for f in sorted((d / "proxy_1").rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    run(pool.path, d, cfg)
    assert (d / "proxy_0" / "_done.json").stat().st_mtime_ns == stamp[0]  # not retrained
    assert (d / "proxy_1" / "model.safetensors").read_bytes() == weights1  # retrained, to the same bytes
    assert (d / "_done.json").exists()
    record = (d / "_done.json").read_bytes()
    run(pool.path, d, cfg)  # finished: nothing to do
    assert (d / "_done.json").read_bytes() == record
    assert (d / "proxy_1" / "_done.json").stat().st_mtime_ns != stamp[1]


def test_adam_preconditioned_featurize_reads_each_proxys_optimizer_state(tmp_path):
    """precondition=adam scales by each proxy's saved AdamW second moment (dsdm.sketch); a proxy without one is named
    before any store is written."""
    from dsdm.featurize import FeaturizeConfig
    from dsdm.featurize import run as featurize

    pool = _pool(tmp_path / "pool")
    d = run(pool.path, tmp_path / "p", ProxiesConfig(n=2, fraction=0.5, seed=0, train=TRAIN))
    cfg = dict(proj_dim=64, batch_size=4, shard_size=16, device="cpu")
    plain = featurize(pool.path, d, tmp_path / "plain", FeaturizeConfig(**cfg))
    adam = featurize(pool.path, d, tmp_path / "adam", FeaturizeConfig(**cfg, precondition="adam"))
    for m in range(2):
        a, b = (np.load(s / f"proxy_{m}" / "features.npy").astype(np.float64) for s in (plain, adam))
        assert a.shape == b.shape and np.isfinite(b).all() and not np.allclose(a, b, rtol=0.05)
    assert json.loads((adam / "manifest.json").read_text())["featurize"]["precondition"] == "adam"
    assert "precondition" not in json.loads((plain / "manifest.json").read_text())["featurize"]  # old stores' key

    (d / "proxy_1" / "optimizer_v.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"proxy_1/optimizer_v\.safetensors not found.*--force"):
        featurize(pool.path, d, tmp_path / "refused", FeaturizeConfig(**cfg, precondition="adam"))
    assert not (tmp_path / "refused").exists()


def test_a_snapshot_is_the_model_after_its_step_and_leaves_the_final_unchanged(tmp_path):
    """TrainConfig.snapshots: with a constant learning rate the first s steps of a longer run are an s-step run
    (the data order depends on the step only), so snapshot_0.5 of a 6-step run must be bitwise the 3-step model,
    with its optimizer state; and saving it must not change the final weights."""
    from dsdm.train import SECOND_MOMENTS_FILE, TrainConfig, train

    pool = _pool(tmp_path / "pool")
    flat = dict(preset="micro", batch_size=4, device="cpu", warmup_fraction=0.0, final_lr_fraction=1.0, seed=3)
    long = train(pool, None, TrainConfig(**flat, steps=6, snapshots=[0.5]), tmp_path / "long")
    short = train(pool, None, TrainConfig(**flat, steps=3), tmp_path / "short")
    plain = train(pool, None, TrainConfig(**flat, steps=6), tmp_path / "plain")
    for name in ("model.safetensors", SECOND_MOMENTS_FILE, "config.json", "tokenizer.json"):
        if (short / name).exists():
            assert (long / "snapshot_0.5" / name).read_bytes() == (short / name).read_bytes(), name
    assert (long / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    assert (long / "model.safetensors").read_bytes() != (short / "model.safetensors").read_bytes()
    # runs without snapshots keep the completion key they had before the setting existed
    assert "snapshots" not in json.loads((plain / "_done.json").read_text())["config"]["train"]
    with pytest.raises(ValueError, match="snapshots"):
        TrainConfig(snapshots=[1.0])
    # fractions that land on one step (or on the last) would enter an ensemble twice: refused before training
    with pytest.raises(ValueError, match="step 3, as snapshot 0.5"):
        train(pool, None, TrainConfig(**flat, steps=6, snapshots=[0.5, 0.51]), tmp_path / "twice")
    with pytest.raises(ValueError, match="the final model"):
        train(pool, None, TrainConfig(**flat, steps=6, snapshots=[0.95]), tmp_path / "last")


def test_a_run_killed_after_its_snapshot_resumes_to_the_same_files_and_a_fresh_start_clears_old_ones(
    tmp_path, monkeypatch
):
    import dsdm.train as T

    pool = _pool(tmp_path / "pool")
    cfg = T.TrainConfig(preset="micro", batch_size=4, device="cpu", steps=8, checkpoint_every=2, snapshots=[0.5])
    ref = T.train(pool, None, cfg, tmp_path / "ref")
    real, saves = T._save_checkpoint, {"n": 0}

    def kill_after_step_6(*a, **k):  # checkpoints at steps 2, 4, 6: the snapshot (step 4) is behind the kill
        real(*a, **k)
        saves["n"] += 1
        if saves["n"] == 3:
            raise KeyboardInterrupt("simulated kill")

    run_dir = tmp_path / "run"
    (run_dir / "snapshot_0.25").mkdir(parents=True)  # left by an earlier configuration of this directory
    monkeypatch.setattr(T, "_save_checkpoint", kill_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        T.train(pool, None, cfg, run_dir)
    assert not (run_dir / "snapshot_0.25").exists() and (run_dir / "snapshot_0.5" / "model.safetensors").exists()
    monkeypatch.setattr(T, "_save_checkpoint", real)
    T.train(pool, None, cfg, run_dir)
    for name in ("model.safetensors", "snapshot_0.5/model.safetensors", "snapshot_0.5/optimizer_v.safetensors"):
        assert (run_dir / name).read_bytes() == (ref / name).read_bytes(), name


def test_snapshots_are_ensemble_members_after_the_finals(tmp_path):
    """proxy.snapshots: the manifest lists the finals first, then each snapshot level (latest first), so the
    featurized members 0..M-1 are bitwise the stores of the same proxies without snapshots (same projection seeds)."""
    from dsdm.featurize import FeaturizeConfig
    from dsdm.featurize import run as featurize

    pool = _pool(tmp_path / "pool")
    train = {**TRAIN, "steps": 4}
    plain = run(pool.path, tmp_path / "plain", ProxiesConfig(n=2, fraction=0.5, train=train))
    snap = run(pool.path, tmp_path / "snap", ProxiesConfig(n=2, fraction=0.5, train=train, snapshots=[0.25, 0.5]))
    manifest = json.loads((snap / "manifest.json").read_text())
    assert manifest["models"] == [
        "proxy_0", "proxy_1", "proxy_0/snapshot_0.5", "proxy_1/snapshot_0.5", "proxy_0/snapshot_0.25",
        "proxy_1/snapshot_0.25",
    ]  # fmt: skip
    assert "snapshots" not in json.loads((plain / "_done.json").read_text())["config"]["proxies"]
    cfg = FeaturizeConfig(proj_dim=64, batch_size=4, shard_size=16, device="cpu")
    fp, fs = featurize(pool.path, plain, tmp_path / "fp", cfg), featurize(pool.path, snap, tmp_path / "fs", cfg)
    assert json.loads((fs / "manifest.json").read_text())["num_proxies"] == 6
    for m in range(2):  # so score.num_proxies = M scores the finals alone, as the store without snapshots does
        for name in ("features.npy", "gram.npy", "q.npy"):
            assert (fp / f"proxy_{m}" / name).read_bytes() == (fs / f"proxy_{m}" / name).read_bytes(), name
    # a member's store names its model unless it is proxy_<m> (whose old stores must stay valid): a store must not
    # pass for another model's after the proxies were retrained with another n or snapshots
    records = [json.loads((fs / f"proxy_{m}" / "_done.json").read_text())["config"] for m in (0, 2)]
    assert "model" not in records[0] and records[1]["model"] == "proxy_0/snapshot_0.5"
    members = [np.load(fs / f"proxy_{m}" / "features.npy") for m in range(6)]
    assert all(not np.array_equal(members[0], b) for b in members[1:])
    # the proxies must be finished before they are featurized (a retrain may be rewriting them)
    (snap / "_done.json").unlink()
    with pytest.raises(ValueError, match="not finished"):
        featurize(pool.path, snap, tmp_path / "unfinished", cfg)
    with pytest.raises(ValueError, match="proxy.snapshots"):
        ProxiesConfig(train={"snapshots": [0.5]})

"""The device-side options of the sketches and the store, on CPU (dsdm.sketch, dsdm.featurize; issue 15 item 2):
the SRHT plan built once equals the per-batch one, the device-generated i.i.d. matrix is exactly what the features
use and is recorded so scoring refuses to mix, bf16 features stay within the stated tolerance of float32, the
float32-per-shard Gram stays within its error bound of float64, and several targets scored in one pass equal each
target scored alone. The CUDA versions are in tests/test_gpu.py. Run: .venv/bin/python -m pytest -q tests/test_sketch.py
"""

import json

import numpy as np
import pytest
import torch
from test_featurize import TinyGPT, batch, exact_grads

from dsdm import datamodel as D
from dsdm import featurize as F
from dsdm import sketch as S
from dsdm.model import build_model

# Tolerances stated in docs/benchmarks.md "GPU": per-example relative error of the features against float32
# (measured on CPU autocast: 0.3-0.5% for bf16 on micro and nano; TF32 has 3 more mantissa bits).
BF16_FEATURE_RTOL = 0.02
GRAM_FP32_RTOL = 1e-5  # |K32 - K64|_ij / sqrt(K_ii K_jj), float32 per shard (measured <= 8e-7 at 4096 rows)


def test_srht_plan_is_built_once_and_gives_the_per_batch_features(monkeypatch):
    model, (tokens, score) = TinyGPT(), batch()
    calls = []
    real = S.srht_plan
    monkeypatch.setattr(S, "srht_plan", lambda *a: calls.append(a) or real(*a))
    sk = S.make_sketch(model, "dense", 64, 0, 3, dense_projection="srht")
    g1, _ = sk.sketch(tokens, score)
    g2, _ = sk.sketch(tokens, score)
    assert len(calls) == 1  # in __init__, not per batch
    grads = S.per_example_grads(model, sk.params, tokens, score)
    assert torch.equal(g1, g2) and torch.equal(g1, S.srht_project(grads, 64, 0, 3, sk.chunk))  # plan=None: rebuilt


def test_device_rng_dense_equals_exact_gradients_times_its_matrix():
    model, (tokens, score) = TinyGPT(), batch()
    names = sorted(n for n, _ in model.named_parameters())
    ref = exact_grads(model, tokens, score, names)
    G = torch.stack([torch.cat([r[n].flatten() for n in names]) for r in ref])
    k = 48
    sk = S.make_sketch(model, "dense", k, 0, 1, dense_rng="device")
    g, _ = sk.sketch(tokens, score)
    block = 1 << 24
    P = torch.cat(
        [
            S.device_signs(min(s + block // k, p.numel()) - s, k, "cpu", 0, 1, n, b)
            for n, p in sorted(sk.params.items())
            for b, s in enumerate(range(0, p.numel(), block // k))
        ]
    )
    assert set(P.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(g, G @ P / k**0.5, rtol=1e-4, atol=1e-6)
    iid = S.make_sketch(model, "dense", k, 0, 1).sketch(tokens, score)[0]
    assert not torch.allclose(g, iid)  # another matrix than the CPU PCG64 stream
    assert S.projection_rng("pcg64", "cpu") == "pcg64" and S.projection_rng("device", "cpu") == "torch-cpu"


def test_store_made_with_a_device_generator_is_not_scored_elsewhere(tmp_path):
    cfg = F.FeaturizeConfig(projector="dense", dense_rng="device")
    assert F._rng_record(cfg, "cpu") == {"projection_rng": "torch-cpu"}
    assert F._rng_record(F.FeaturizeConfig(projector="dense"), "cpu") == {}  # old stores keep their key
    assert "dense_rng" not in F._cfg_dict(F.FeaturizeConfig()) and F._cfg_dict(cfg)["dense_rng"] == "device"
    manifest = {"featurize": F._cfg_dict(cfg), "sketch_version": S.SKETCH_VERSION, "num_proxies": 0}
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "projection_rng": "torch-cuda:NVIDIA H200"}))
    with pytest.raises(ValueError, match="torch-cuda:NVIDIA H200.*torch-cpu"):
        D.load_features(tmp_path, "cpu")
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "projection_rng": "torch-cpu"}))
    assert D.load_features(tmp_path, "cpu")[1] == []


@pytest.mark.parametrize("projector, projection", [("factorized", "rademacher"), ("dense", "srht")])
def test_bf16_features_are_within_tolerance_of_float32(projector, projection):
    model = build_model("micro", 257, 32, seed=0)
    tokens = torch.randint(0, 257, (8, 32), generator=torch.Generator().manual_seed(0))
    score = S.pool_score_mask(torch.ones_like(tokens, dtype=torch.bool))
    out = {}
    for precision in ("float32", "bf16", "tf32"):
        sk = S.make_sketch(model, projector, 512, 0, 0, dense_projection=projection, precision=precision)
        out[precision] = sk.sketch(tokens, score)
    g32, g16 = out["float32"][0].double(), out["bf16"][0].double()
    rel = (g16 - g32).norm(dim=1) / g32.norm(dim=1)
    assert 0 < rel.max() < BF16_FEATURE_RTOL, rel  # > 0: bf16 did run
    assert torch.equal(out["tf32"][0], out["float32"][0])  # TF32 is a CUDA setting: no effect on CPU
    assert torch.backends.cuda.matmul.allow_tf32 is False  # restored


def _store_pool(path, n=37, T=12, vocab=23):
    from dsdm.pool import Pool, PoolWriter

    rng = np.random.default_rng(0)
    w = PoolWriter(path, vocab_size=vocab)
    for i in range(n):
        w.add(rng.integers(0, vocab, size=rng.integers(4, T + 1)), doc_id=f"d{i}", source="s")
    return Pool(w.close({"seq_len": T, "eos_id": 0}, {}))


def test_float32_gram_per_shard_is_within_its_bound_of_float64(tmp_path):
    pool = _store_pool(tmp_path / "pool")
    base = dict(proj_dim=256, batch_size=5, shard_size=16, device="cpu", storage_dtype="float32")
    a = F.featurize_proxy(pool, TinyGPT(), tmp_path / "a", F.FeaturizeConfig(**base), proxy=0, device="cpu")
    b = F.featurize_proxy(pool, TinyGPT(), tmp_path / "b", F.FeaturizeConfig(**base, gram="float32"), 0, "cpu")
    assert np.load(a / "features.npy").tobytes() == np.load(b / "features.npy").tobytes()
    k64, k32 = np.load(a / "gram.npy"), np.load(b / "gram.npy")
    scale = np.sqrt(np.outer(np.diag(k64), np.diag(k64))) + 1e-30
    err = np.abs(k32 - k64) / scale
    assert 0 < err.max() < GRAM_FP32_RTOL, err.max()  # > 0: it did accumulate in float32
    # the bound at scale: 4096 rows of float16 features, 2048 dims, 16-row batches (a 4x larger shard than default)
    f = (np.random.default_rng(0).standard_normal((4096, 2048)) * np.linspace(0.1, 10, 2048)).astype(np.float16)
    t, acc = torch.from_numpy(f.astype(np.float32)), torch.zeros(2048, 2048)
    for s in range(0, 4096, 16):
        acc.addmm_(t[s : s + 16].T, t[s : s + 16])
    ref = f.astype(np.float64).T @ f.astype(np.float64)
    assert np.max(np.abs(acc.double().numpy() - ref) / np.sqrt(np.outer(np.diag(ref), np.diag(ref)))) < GRAM_FP32_RTOL


def test_auto_batch_size_off_cuda_is_the_old_default():
    assert F.auto_batch_size(None, None, "cpu") == 16
    with pytest.raises(ValueError, match="batch_size"):
        F.FeaturizeConfig(batch_size=-1)


def test_several_targets_in_one_pass_equal_each_target_alone(tmp_path, monkeypatch):
    from test_experiment import build_micro_data

    from dsdm.cli import main

    build_micro_data(tmp_path, n_docs=48)
    pool_dir, run = tmp_path / "pool", tmp_path / "run"
    train = ["--set", "train.preset=micro", "--set", "train.steps=5", "--set", "train.batch_size=8"]
    assert main(["proxies", "train", "--pool", str(pool_dir), "--out", str(run / "proxies"), "--n", "2"] + train) == 0
    feat = ["featurize", "--pool", str(pool_dir), "--proxies", str(run / "proxies"), "--out", str(run / "features")]
    assert main(feat + ["--proj-dim", "64"]) == 0
    tasks = {t: str(tmp_path / "tasks" / t) for t in ("cooking", "sports", "finance")}
    targets = {"a": [tasks["cooking"]], "b": [tasks["sports"], tasks["finance"]], "mix": list(tasks.values())}
    cfg = D.ScoreConfig()
    calls = []
    real = D.stream_scores
    monkeypatch.setattr(D, "stream_scores", lambda *a, **k: calls.append(a[1].shape[1]) or real(*a, **k))
    together = D.score_targets(run / "features", targets, cfg, "cpu")
    assert calls == [3, 3]  # one pass over each of the 2 proxies' stores, for the 3 distinct tasks
    monkeypatch.setattr(D, "stream_scores", real)
    for name, specs in targets.items():
        alone, names = D.score_tasks(run / "features", specs, cfg, "cpu")
        np.testing.assert_allclose(together[name][0], alone, rtol=1e-10, atol=1e-12)
        assert together[name][1] == names

"""Featurizer maths against exact references: output function, dense = exact per-example gradients x P, factorized =
exact Kronecker projection of the per-layer gradients, JL inner products, store resume. Run:
    .venv/bin/python -m pytest -q tests/test_featurize.py
"""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from dsdm import featurize as F


class TinyGPT(nn.Module):
    """One pre-LN block with eager causal attention; every projection an nn.Linear; untied LM head."""

    def __init__(self, vocab=23, d=16, seq=12, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        B, T = tokens.shape
        x = self.wte(tokens) + self.wpe(torch.arange(T, device=tokens.device))
        q, k, v = self.qkv(self.ln1(x)).chunk(3, -1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + self.proj(att @ v)
        x = x + self.fc2(torch.relu(self.fc(self.ln2(x))))
        return self.head(self.lnf(x))


def batch(B=5, T=12, vocab=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 9:] = False  # a padded row
    score = F.pool_score_mask(mask)
    score[2, :6] = False  # a "target": only the continuation is scored
    return tokens, score


def exact_grads(model, tokens, score, names, output="margin"):
    """Loop of torch.autograd.grad, one example at a time: the reference."""
    params = dict(model.named_parameters())
    out = []
    for b in range(tokens.shape[0]):
        f, _ = F.output_and_q(model(tokens[b : b + 1]), tokens[b : b + 1], score[b : b + 1], output=output)
        gs = torch.autograd.grad(f[0], [params[n] for n in names], allow_unused=True)
        out.append({n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, gs)})
    return out


def test_output_function_matches_log_odds():
    logits = torch.randn(2, 6, 9, dtype=torch.float64)
    tokens = torch.randint(0, 9, (2, 6))
    score = torch.ones(2, 6, dtype=torch.bool)
    score[:, 0] = False
    score[1, :3] = False
    f, q = F.output_and_q(logits, tokens, score)
    p = logits[:, :-1].softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    w = score[:, 1:].double()
    f_ref = ((torch.log(p) - torch.log1p(-p)) * w).sum(1) / w.sum(1)
    q_ref = ((1 - p) * w).sum(1) / w.sum(1)
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.double(), q_ref, rtol=1e-5, atol=1e-6)


def test_logp_output_is_minus_the_mean_continuation_nll_with_its_gradient():
    """output="logp" (ScoreConfig.target_output): f = -(mean cross-entropy over the scored tokens), and d f / d logits
    is that of torch's cross_entropy (float64), on both margin paths."""
    tokens, score = batch(B=4, T=10, vocab=23)
    base = torch.randn(4, 10, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref_logits = base.clone().requires_grad_(True)
    w = score[:, 1:].double()
    nll = torch.nn.functional.cross_entropy(ref_logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    f_ref = -(nll * w).sum(1) / w.sum(1)
    f_ref.sum().backward()
    for fast in (False, True):
        logits = base.clone().requires_grad_(True)
        f, _ = F.output_and_q(logits, tokens, score, fast_backward=fast, output="logp")
        f.sum().backward()
        torch.testing.assert_close(f.double(), f_ref.detach(), rtol=1e-5, atol=1e-6)  # margins are float32
        torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="output function"):
        F.output_and_q(base, tokens, score, output="loss")


def test_fast_backward_is_bitwise_plain_autograd():
    """The factorized sketch's hand-written margin backward gives exactly autograd's f, Q and d f / d logits."""
    tokens, score = batch(B=4, T=10, vocab=23)
    base = torch.randn(4, 10, 23, generator=torch.Generator().manual_seed(3))
    out = []
    for fast in (False, True):
        logits = base.clone().requires_grad_(True)
        f, q = F.output_and_q(logits, tokens, score, fast_backward=fast)
        (f * torch.arange(1.0, 5.0)).sum().backward()
        out.append((f.detach(), q, logits.grad))
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_rademacher_is_seeded_and_distinct():
    a, b, c = F.rademacher(50, 8, 0, 0, "w", 0), F.rademacher(50, 8, 0, 0, "w", 0), F.rademacher(50, 8, 0, 1, "w", 0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("output", ["margin", "logp"])
def test_dense_equals_exact_gradients_times_projection(output):
    model = TinyGPT()
    tokens, score = batch()
    k = 64
    sk = F.make_sketch(model, "dense", k, seed=3, proxy=1)
    sk.chunk = 2  # gradients in vmap chunks of 2, projected together
    sk.output = output
    feats, q = sk.sketch(tokens, score)
    names = sorted(sk.params)
    for p in model.parameters():
        p.requires_grad_(True)
    ref = exact_grads(model, tokens, score, names, output)
    G = torch.stack([torch.cat([r[n].flatten() for n in names]) for r in ref])  # (B, p)
    P = F.dense_matrix({n: tuple(sk.params[n].shape) for n in names}, k, 3, 1, block_elems=1 << 24)
    torch.testing.assert_close(feats, G @ P / math.sqrt(k), rtol=1e-4, atol=1e-5)
    # small blocks regenerate the same rows in more pieces: a different P, but the same exact identity holds
    assert q.shape == (tokens.shape[0],) and torch.all((q > 0) & (q < 1))


def test_fwht_is_the_sylvester_hadamard_matrix():
    import scipy.linalg

    g = torch.Generator().manual_seed(0)
    for m in (0, 1, 5, 11):
        x = torch.randn(3, 1 << m, generator=g, dtype=torch.float64)
        H = torch.from_numpy(scipy.linalg.hadamard(1 << m)).double()
        for radix_bits in (1, 4, 6):  # 1 = plain butterflies; larger = grouped matmuls, the same transform
            torch.testing.assert_close(F.fwht(x, radix_bits), x @ H.T, rtol=1e-12, atol=1e-9)


def test_dense_srht_equals_exact_gradients_times_its_matrix():
    """srht features = exact per-example gradients x P, P built entry by entry from the definition D_i (-1)^popcount(
    i & S_j), independent of the fast transform; and the projection is seeded."""
    model = TinyGPT()
    tokens, score = batch()
    k = 64
    sk = F.make_sketch(model, "dense", k, seed=3, proxy=1, dense_projection="srht")
    sk.chunk = 2  # the transform runs over chunks of 2 examples: must not matter
    feats, _ = sk.sketch(tokens, score)
    names = sorted(sk.params)
    for p in model.parameters():
        p.requires_grad_(True)
    ref = exact_grads(model, tokens, score, names)
    G = torch.stack([torch.cat([r[n].flatten() for n in names]) for r in ref]).double()  # (B, p)
    P = F.srht_matrix(G.shape[1], k, 3, 1).double()
    assert set(P.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(feats.double(), G @ P / math.sqrt(k), rtol=1e-4, atol=1e-5)
    assert not torch.equal(P, F.srht_matrix(G.shape[1], k, 3, 2))


def test_srht_inner_products_are_as_good_as_iid_rademacher():
    """JL quality on exact gradients (an untrained TinyGPT, all parameters): the relative Gram error of the SRHT over
    8 seeds is of the same size as an i.i.d. ±1 matrix of the same k (both ~ sqrt(2 / k)), and unbiased: the mean of
    the 8 sketched Grams is closer to the exact one than any single sketch."""
    model = TinyGPT()
    tokens, score = batch(B=6)
    sk = F.make_sketch(model, "dense", 8, 0, 0)
    names = sorted(sk.params)
    for p in model.parameters():
        p.requires_grad_(True)
    ref = exact_grads(model, tokens, score, names)
    G = torch.stack([torch.cat([r[n].flatten() for n in names]) for r in ref]).double()
    K, k = G @ G.T, 256
    errs, iid_errs, grams = [], [], []
    for seed in range(8):
        g = F.srht_project({"all": G}, k, seed, 0).double()
        grams.append(g @ g.T)
        errs.append(((grams[-1] - K).norm() / K.norm()).item())
        P = F.rademacher(G.shape[1], k, seed, "iid-ref").double() / math.sqrt(k)
        iid_errs.append((((G @ P) @ (G @ P).T - K).norm() / K.norm()).item())
    assert np.mean(errs) < 0.3 and np.mean(errs) < 2 * np.mean(iid_errs), (errs, iid_errs)
    assert ((torch.stack(grams).mean(0) - K).norm() / K.norm()).item() < min(errs)


@pytest.mark.parametrize("output", ["margin", "logp"])
def test_factorized_equals_kronecker_projection_of_exact_layer_grads(output):
    model = TinyGPT()
    tokens, score = batch()
    sk = F.make_sketch(model, "factorized", 256, seed=0, proxy=0)
    sk.output = output
    feats, q = sk.sketch(tokens, score)
    for p in model.parameters():
        p.requires_grad_(True)
    names = [n for n, _ in model.named_parameters()]
    ref = exact_grads(model, tokens, score, names, output)
    expected = []
    for r in ref:
        parts = []
        for (lname, lin), (p_out, p_in) in zip(sk.linears, sk.proj):
            G = r[f"{lname}.weight"]  # (d_out, d_in)
            if lin.bias is not None:
                G = torch.cat([G, r[f"{lname}.bias"][:, None]], 1)  # bias = weight of a constant-1 input
            parts.append((p_out.T @ G @ p_in).flatten())
        expected.append(torch.cat(parts))
    torch.testing.assert_close(feats, torch.stack(expected), rtol=1e-4, atol=1e-5)
    assert feats.shape[1] == sk.dim <= 256


def _planted_moments(model, seed=5):
    """A positive second moment per parameter, far from rank 1 (log-uniform over 4 decades)."""
    g = torch.Generator().manual_seed(seed)
    return {n: 10 ** (-8 + 4 * torch.rand(p.shape, generator=g)) for n, p in model.named_parameters()}


def _layer_grad(r, lname, lin):
    G = r[f"{lname}.weight"]  # (d_out, d_in)
    return G if lin.bias is None else torch.cat([G, r[f"{lname}.bias"][:, None]], 1)


def test_factorized_adam_preconditioning_is_the_rank1_fit_of_v_on_exact_layer_grads():
    # analytic reference: each layer's exact gradient times V1^-1/4 elementwise, V1 = r c^T / S the rank-1 fit of
    # its (weight | bias) second moments, projected by the same unscaled side matrices
    model = TinyGPT()
    tokens, score = batch()
    moments = _planted_moments(model)
    plain = F.make_sketch(model, "factorized", 256, seed=0, proxy=0)
    sk = F.make_sketch(model, "factorized", 256, seed=0, proxy=0, second_moments=moments)
    feats = sk.sketch(tokens, score)[0]
    for p in model.parameters():
        p.requires_grad_(True)
    ref = exact_grads(model, tokens, score, [n for n, _ in model.named_parameters()])
    expected = []
    for r in ref:
        parts = []
        for (lname, lin), (p_out, p_in) in zip(plain.linears, plain.proj):
            V = _layer_grad(moments, lname, lin).double()
            fit = V.sum(1, keepdim=True) * V.sum(0, keepdim=True) / V.sum()
            G = _layer_grad(r, lname, lin).double() * fit.pow(-0.25)
            parts.append((p_out.double().T @ G @ p_in.double()).flatten())
        expected.append(torch.cat(parts))
    torch.testing.assert_close(feats.double(), torch.stack(expected), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(feats, plain.sketch(tokens, score)[0], rtol=0.1)  # the preconditioner acts


def test_adam_preconditioning_dense_is_exact_and_factorized_agrees_when_v_is_rank_one():
    # dense: exact gradients times v^-1/4 elementwise, times its P; factorized with every side exact (a budget that
    # covers every layer) and a planted rank-1 v per Linear: the same Gram as the exact preconditioned gradients
    model = TinyGPT(d=8, vocab=11)
    tokens, score = batch(B=4, vocab=11)
    g = torch.Generator().manual_seed(7)
    moments = {}
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        r = 10 ** (-6 + 2 * torch.rand(lin.out_features, generator=g))
        c = 10 ** (-6 + 2 * torch.rand(lin.in_features + (lin.bias is not None), generator=g))
        v = r[:, None] * c[None, :]  # exactly rank 1
        moments[f"{name}.weight"] = v[:, : lin.in_features]
        if lin.bias is not None:
            moments[f"{name}.bias"] = v[:, -1]
    others = {n: torch.full(p.shape, 1e-4) for n, p in model.named_parameters() if n not in moments}
    moments.update(others)
    dense = F.make_sketch(model, "dense", 64, 3, 1, dense_params="linear", second_moments=moments)
    dense.chunk = 2
    fd = dense.sketch(tokens, score)[0]
    fact = F.make_sketch(model, "factorized", 1 << 16, 0, 0, second_moments=moments).sketch(tokens, score)[0]
    names = sorted(dense.params)
    for p in model.parameters():
        p.requires_grad_(True)
    ref = exact_grads(model, tokens, score, names)
    G = torch.stack([torch.cat([(r[n] * moments[n].pow(-0.25)).flatten() for n in names]) for r in ref])
    P = F.dense_matrix({n: tuple(dense.params[n].shape) for n in names}, 64, 3, 1, block_elems=1 << 24)
    torch.testing.assert_close(fd, G @ P / math.sqrt(64), rtol=1e-4, atol=1e-5)
    Gd = G.double()
    torch.testing.assert_close(fact.double() @ fact.double().T, Gd @ Gd.T, rtol=1e-4, atol=1e-6)


def test_adam_preconditioning_of_a_tied_lm_head_uses_the_embeddings_second_moment():
    # GPT ties lm_head.weight to transformer.wte.weight: one parameter, one v (saved under the wte name only)
    from dsdm.model import build_model
    from dsdm.sketch import adafactor_sides

    model = build_model("micro", 64, 16, seed=0)
    moments = _planted_moments(model)
    assert "lm_head.weight" not in moments and model.lm_head.weight is model.transformer.wte.weight
    fact = F.make_sketch(model, "factorized", 256, 0, 0, second_moments=moments)
    plain = F.make_sketch(model, "factorized", 256, 0, 0)
    i = [n for n, _ in fact.linears].index("lm_head")
    out_scale, in_scale = adafactor_sides(moments["transformer.wte.weight"], None)
    torch.testing.assert_close(fact.proj[i][0], out_scale[:, None] * plain.proj[i][0])
    torch.testing.assert_close(fact.proj[i][1], in_scale[:, None] * plain.proj[i][1])
    dense = F.make_sketch(model, "dense", 8, 0, 0, dense_params="linear", second_moments=moments)
    torch.testing.assert_close(dense.scales["lm_head.weight"], moments["transformer.wte.weight"].pow(-0.25))


def test_second_moments_of_another_model_are_refused():
    model = TinyGPT()
    moments = _planted_moments(TinyGPT(d=8))
    with pytest.raises(ValueError, match="belongs to another model"):
        F.make_sketch(model, "factorized", 256, 0, 0, second_moments=moments)
    moments = _planted_moments(model)
    del moments["qkv.bias"]
    with pytest.raises(ValueError, match="no second moment for parameter 'qkv.bias'"):
        F.make_sketch(model, "dense", 8, 0, 0, second_moments=moments)


def test_factorized_inner_products_match_exact_within_jl_error():
    model = TinyGPT(d=16)
    tokens, score = batch(B=6)
    dense = F.make_sketch(model, "dense", 8, 0, 0, dense_params="linear")  # only for the parameter set
    names = sorted(dense.params)
    for p in model.parameters():
        p.requires_grad_(True)
    ref = exact_grads(model, tokens, score, names)
    G = torch.stack([torch.cat([r[n].flatten() for n in names]) for r in ref]).double()
    K = G @ G.T
    errs, dense_errs = [], []
    for seed in range(4):
        sk = F.make_sketch(model, "factorized", 1024, seed, 0)  # ~200 dims per layer: every layer is projected
        assert all(ko < lin.out_features or ki < lin.in_features for (_, lin), (ko, ki) in zip(sk.linears, sk.dims))
        g = sk.sketch(tokens, score)[0].double()
        errs.append(((g @ g.T - K).norm() / K.norm()).item())
        P = F.rademacher(G.shape[1], sk.dim, seed, "dense-ref").double() / math.sqrt(sk.dim)
        dense_errs.append((((G @ P) @ (G @ P).T - K).norm() / K.norm()).item())
    # JL: a dense sketch of the same dim has relative Gram error ~ sqrt(2 / dim) ~ 0.05; a Kronecker sketch is
    # noisier (product of two sketches); we ask for the same order of magnitude and a clearly useful estimate.
    assert np.mean(errs) < 0.3 and np.mean(errs) < 4 * np.mean(dense_errs), (errs, dense_errs)
    assert len(set(np.round(errs, 6))) == 4  # not trivially exact: seeds give different sketches


def test_factorized_is_exact_when_the_budget_covers_every_layer():
    model = TinyGPT(d=8, vocab=11)
    tokens, score = batch(B=4, vocab=11)
    sk = F.make_sketch(model, "factorized", 1 << 16, 0, 0)
    g = sk.sketch(tokens, score)[0].double()
    dense = F.make_sketch(model, "dense", 8, 0, 0, dense_params="linear")
    names = sorted(dense.params)
    for p in model.parameters():
        p.requires_grad_(True)
    ref = exact_grads(model, tokens, score, names)
    G = torch.stack([torch.cat([r[n].flatten() for n in names]) for r in ref]).double()
    torch.testing.assert_close(g @ g.T, G @ G.T, rtol=1e-4, atol=1e-6)


def test_store_resume_is_bitwise_identical(tmp_path):
    from dsdm.pool import Pool, PoolWriter

    rng = np.random.default_rng(0)
    w = PoolWriter(tmp_path / "pool", vocab_size=23)
    for i in range(13):
        w.add(rng.integers(0, 23, size=rng.integers(4, 13)), doc_id=f"d{i}", source="s")
    pool = Pool(w.close({"seq_len": 12, "eos_id": 0}, {}))
    cfg = F.FeaturizeConfig(proj_dim=128, batch_size=3, shard_size=4, device="cpu")
    fresh = F.featurize_proxy(pool, TinyGPT(), tmp_path / "a", cfg, proxy=0, device="cpu")
    # interrupted run: two shards finished, a third half-written (rows filled, no gram file), then resumed
    part = tmp_path / "b"
    F.featurize_proxy(pool, TinyGPT(), part, cfg, proxy=0, device="cpu", shards=[(0, 4), (8, 12)])
    feats = np.load(part / "features.npy", mmap_mode="r+")
    feats[4:6] = 7.0
    feats.flush()
    assert not (part / "gram.npy").exists()
    F.featurize_proxy(pool, TinyGPT(), part, cfg, proxy=0, device="cpu")
    for name in ("features.npy", "q.npy", "done.npy", "gram.npy"):
        assert np.load(fresh / name).tobytes() == np.load(part / name).tobytes(), name
    assert np.load(fresh / "done.npy").all()
    f = np.load(fresh / "features.npy").astype(np.float64)
    np.testing.assert_allclose(np.load(fresh / "gram.npy"), f.T @ f, rtol=1e-10, atol=1e-12)


def test_a_store_partly_filled_with_other_settings_is_refused(tmp_path):
    """Resuming a half-filled store with another projection seed would keep its rows beside rows of the new seed and
    sum both into one Gram: refused, naming the changed key. The same settings resume."""
    pool = _small_pool(tmp_path / "pool", 13)
    cfg = F.FeaturizeConfig(proj_dim=128, batch_size=3, shard_size=4, device="cpu")
    F.featurize_proxy(pool, TinyGPT(), tmp_path / "s", cfg, proxy=0, device="cpu", shards=[(0, 4)])
    other = F.FeaturizeConfig(proj_dim=128, batch_size=3, shard_size=4, device="cpu", seed=1)
    with pytest.raises(ValueError, match="other settings .changed: featurize.seed"):
        F.featurize_proxy(pool, TinyGPT(), tmp_path / "s", other, proxy=0, device="cpu")
    F.featurize_proxy(pool, TinyGPT(), tmp_path / "s", cfg, proxy=0, device="cpu")
    assert np.load(tmp_path / "s" / "done.npy").all()


def _small_pool(path, n):
    from dsdm.pool import Pool, PoolWriter

    rng = np.random.default_rng(0)
    w = PoolWriter(path, vocab_size=23)
    for i in range(n):
        w.add(rng.integers(0, 23, size=rng.integers(4, 13)), doc_id=f"d{i}", source="s")
    return Pool(w.close({"seq_len": 12, "eos_id": 0}, {}))


@pytest.mark.parametrize("storage", ["float16", "float32"])
def test_gram_partials_are_per_group_and_a_pure_function_of_the_stored_rows(tmp_path, storage):
    """29 rows, shards of 4 (8 shards), groups of 3 shards: at most ceil(8 / 3) = 3 partials on disk, one per group
    whose shards are all done; a run killed mid-group (a group's first shard done, its second half-written) resumes
    to the uninterrupted run's bits; gram.npy is bitwise the group-ordered sum recomputed here from features.npy,
    and within 1e-12 of the old per-shard, per-batch reduction (the order changed: with float32 rows the bits differ;
    float16 products are exact in float64, so short sums of them often agree bitwise)."""
    pool = _small_pool(tmp_path / "pool", 29)
    cfg = F.FeaturizeConfig(proj_dim=128, batch_size=3, shard_size=4, gram_group=3, device="cpu", storage_dtype=storage)
    fresh = F.featurize_proxy(pool, TinyGPT(), tmp_path / "a", cfg, proxy=0, device="cpu")
    assert not (fresh / "grams").exists()  # summed into gram.npy, then deleted

    part = tmp_path / "b"
    F.featurize_proxy(pool, TinyGPT(), part, cfg, 0, "cpu", shards=[(0, 4), (4, 8), (8, 12), (12, 16), (28, 29)])
    assert [p.name for p in (part / "grams").iterdir()] == ["gram_0000000000_0000000012.npy"]  # group 0 only
    F.featurize_proxy(pool, TinyGPT(), part, cfg, 0, "cpu", shards=[(16, 20)])  # group 1 still lacks rows 20-24
    feats = np.load(part / "features.npy", mmap_mode="r+")
    feats[20:22] = 7.0  # the killed process had half-written shard (20, 24), never marked done
    feats.flush()
    assert len(list((part / "grams").iterdir())) == 1 <= math.ceil(8 / 3)
    assert not (part / "gram.npy").exists()
    F.featurize_proxy(pool, TinyGPT(), part, cfg, proxy=0, device="cpu")
    for name in ("features.npy", "q.npy", "done.npy", "gram.npy"):
        assert np.load(fresh / name).tobytes() == np.load(part / name).tobytes(), name

    f = np.load(fresh / "features.npy").astype(np.float64)
    grouped = np.zeros((f.shape[1],) * 2)
    for g0 in range(0, 29, 12):
        acc = np.zeros_like(grouped)
        for s0 in range(g0, min(g0 + 12, 29), 4):
            blk = f[s0 : min(s0 + 4, 29)]  # one block per shard (shards are smaller than F._GRAM_BLOCK)
            acc += blk.T @ blk
        grouped += acc
    assert np.load(fresh / "gram.npy").tobytes() == grouped.tobytes()
    old = np.zeros_like(grouped)  # format 1: per shard, batch by batch; shards summed in order
    for s0 in range(0, 29, 4):
        shard = np.zeros_like(grouped)
        for b0 in range(s0, min(s0 + 4, 29), 3):
            b = f[b0 : min(b0 + 3, s0 + 4)]
            shard += b.T @ b
        old += shard
    np.testing.assert_allclose(grouped, old, rtol=1e-12, atol=1e-12 * np.abs(old).max())


def test_a_store_partly_filled_by_format_1_resumes_to_the_format_2_store(tmp_path, capsys):
    """Format 1 kept a Gram file per shard under shards/ and set a shard's done bits after it: resuming such a store
    says so in one line, ignores those files (here deliberately wrong), sums the Grams from the stored rows and ends
    bitwise equal to a fresh run, without shards/. The default gram_group leaves existing completion keys alone."""
    pool = _small_pool(tmp_path / "pool", 9)
    cfg = F.FeaturizeConfig(proj_dim=64, batch_size=3, shard_size=4, gram_group=2, device="cpu")
    fresh = F.featurize_proxy(pool, TinyGPT(), tmp_path / "fresh", cfg, proxy=0, device="cpu")
    old = tmp_path / "old"
    F.featurize_proxy(pool, TinyGPT(), old, cfg, 0, "cpu", shards=[(0, 4), (4, 8)])  # group 0 done, then "format 1":
    for path in (old / "grams").iterdir():
        path.unlink()
    (old / "shards").mkdir()
    for a, b in ((0, 4), (4, 8)):
        np.save(old / "shards" / f"gram_{a:09d}_{b:09d}.npy", np.full((2, 2), 7.0))
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["store_version"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    F.featurize_proxy(pool, TinyGPT(), old, cfg, proxy=0, device="cpu")
    said = [line for line in capsys.readouterr().err.splitlines() if "store format 1" in line]
    assert len(said) == 1 and "resuming it from its done rows" in said[0], said
    for name in ("features.npy", "q.npy", "done.npy", "gram.npy"):
        assert np.load(fresh / name).tobytes() == np.load(old / name).tobytes(), name
    assert not (old / "shards").exists() and not (old / "grams").exists()
    assert json.loads((old / "manifest.json").read_text())["store_version"] == F.STORE_VERSION
    assert "gram_group" not in F._cfg_dict(F.FeaturizeConfig()) and F._cfg_dict(cfg)["gram_group"] == 2


def test_kfac_factor_sums_are_the_projected_token_statistics():
    """FactorizedSketch.factor_sums against statistics collected by independent hooks: per Linear, the sums over the
    positions before each row's last scored token of (P_out delta)(P_out delta)^T and (P_in [x, 1])(P_in [x, 1])^T."""
    model = TinyGPT()
    tokens, score = batch()
    sk = F.make_sketch(model, "factorized", 256, seed=0, proxy=0)
    sums, n = sk.factor_sums(tokens, score)
    for p in model.parameters():
        p.requires_grad_(True)  # the sketch froze them (its gradient starts at the embeddings)
    inputs, grads, handles = {}, {}, []
    for name, lin in sk.linears:

        def fwd(mod, inp, out, name=name):
            inputs[name] = inp[0].detach()
            out.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach()))

        handles.append(lin.register_forward_hook(fwd))
    f, _ = F.output_and_q(model(tokens), tokens, score)
    f.sum().backward()
    for h in handles:
        h.remove()
    last = [max(t for t in range(score.shape[1]) if score[b, t]) for b in range(score.shape[0])]
    rows = [(b, p) for b in range(score.shape[0]) for p in range(last[b])]
    assert n == len(rows)
    for (name, lin), (p_out, p_in) in zip(sk.linears, sk.proj):
        x = inputs[name]
        if lin.bias is not None:
            x = torch.cat([x, torch.ones(x.shape[:-1] + (1,))], -1)
        a = torch.stack([x[b, p] for b, p in rows]).double() @ p_in.double()
        o = torch.stack([grads[name][b, p] for b, p in rows]).double() @ p_out.double()
        S, A = sums[name]
        torch.testing.assert_close(S, o.T @ o, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(A, a.T @ a, rtol=1e-4, atol=1e-6)

"""The trainer's scale features on CPU (dsdm.train; issue 15 item 1): the per-epoch data order equals the per-step
definition, the chunked LM-head cross-entropy equals F.cross_entropy (loss and gradients), gradient accumulation
equals one big step, the prefetching loader yields the same batches, and the default CPU path gives bitwise the
weights of the pre-issue-15 loop (re-implemented here as the reference). Resume after SIGKILL: tests/test_models.py.
Run: .venv/bin/python -m pytest -q tests/test_train.py
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_models import _cfg, _pool

from dsdm.model import build_model
from dsdm.train import (
    PRESET_LR,
    TrainConfig,
    batch_indices,
    batch_stream,
    chunked_lm_loss,
    lm_loss,
    lr_at,
    num_steps,
    param_groups,
    prefetch,
    train,
)


@pytest.mark.parametrize("n, batch, start", [(7, 3, 0), (10, 4, 0), (10, 4, 13), (5, 16, 2), (64, 64, 1)])
def test_batch_stream_equals_batch_indices_across_epochs(n, batch, start):
    idx = np.random.default_rng(n).choice(1000, size=n, replace=False).astype(np.int64)
    stream = batch_stream(idx, start, batch, seed=3)
    for step in range(start, start + 40):  # crosses many epoch boundaries, some batches spanning two or more
        assert next(stream).tolist() == batch_indices(idx, step, batch, seed=3).tolist(), step


def test_batch_stream_draws_each_permutation_once(monkeypatch):
    draws = []
    real = np.random.default_rng

    def counting(seed):
        draws.append(seed)
        return real(seed)

    monkeypatch.setattr(np.random, "default_rng", counting)
    stream = batch_stream(np.arange(100, dtype=np.int64), 0, 10, seed=0)
    for _ in range(35):  # 3.5 epochs
        next(stream)
    assert draws == [(0, 0), (0, 1), (0, 2), (0, 3)]


def _hidden_and_weight(B=3, T=11, C=8, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    w = torch.randn(V, C, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 7:] = False  # padding
    mask[2, 4:] = False
    return h, w, tokens, mask


@pytest.mark.parametrize("chunk", [1, 5, 8, 1000])
def test_chunked_lm_loss_equals_cross_entropy_and_its_gradients(chunk):
    h, w, tokens, mask = _hidden_and_weight()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = lm_loss(h1 @ w1.t(), tokens, mask)  # logits .float(): compare in float32 below
    ref.backward()
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        h2, w2 = h.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
        loss = chunked_lm_loss(h2, w2, tokens, mask, chunk)
        loss.backward()
        if dtype == torch.float64:  # lm_loss upcasts to float32: recompute the reference in float64
            h3, w3 = h.clone().requires_grad_(), w.clone().requires_grad_()
            target = tokens[:, 1:].masked_fill(~mask[:, 1:], -100).flatten()
            r = F.cross_entropy((h3 @ w3.t())[:, :-1].flatten(0, 1), target, ignore_index=-100)
            r.backward()
            ref_l, ref_h, ref_w = r, h3.grad, w3.grad
        else:
            ref_l, ref_h, ref_w = ref, h1.grad, w1.grad
        torch.testing.assert_close(loss.double(), ref_l.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(h2.grad.double(), ref_h.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(w2.grad.double(), ref_w.double(), rtol=tol, atol=tol)


def test_chunked_lm_loss_through_the_model_matches_lm_loss():
    model = build_model("micro", 97, 16, seed=0)
    tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, 9:] = False
    ref = lm_loss(model(tokens), tokens, mask)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = chunked_lm_loss(model.hidden(tokens), model.lm_head.weight, tokens, mask, chunk=6)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)


def _weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


@pytest.mark.parametrize("chunk", [0, 9])
def test_accumulation_of_two_halves_equals_one_step(chunk):
    from dsdm.train import _forward_backward

    model = build_model("micro", 97, 16, seed=0)
    tokens = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[3, 5:] = False  # uneven token counts between the halves: each must divide by the whole step's count
    mask[6, 10:] = False
    cpu = torch.device("cpu")
    grads, losses = [], []
    for accum in (1, 2, 4):
        model.zero_grad(set_to_none=True)
        fwd = model.hidden if chunk else model
        losses.append(_forward_backward(model, fwd, tokens, mask, accum, chunk, cpu, torch.float32))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for loss, g in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(loss, losses[0], rtol=1e-6, atol=1e-7)
        for n in g:
            torch.testing.assert_close(g[n], grads[0][n], rtol=1e-4, atol=1e-7, msg=n)


def test_training_with_accumulation_runs_and_learns(tmp_path):
    pool = _pool(tmp_path / "pool")
    out = train(pool, None, _cfg(batch_size=8, accum_steps=2, loss_chunk=20), tmp_path / "acc")
    curve = [float(r.split(",")[2]) for r in (out / "curve.csv").read_text().splitlines()[1:]]
    assert curve[-1] < curve[0] - 0.5, curve


def _reference_train(pool, cfg: TrainConfig):
    """The training loop of commit 40f62d2 (before issue 15): per-step batch_indices, loss.item() every step."""
    model = build_model(cfg.preset, pool.vocab_size, pool.seq_len, cfg.seed).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    indices = np.arange(len(pool), dtype=np.int64)
    total, losses = num_steps(cfg, pool.seq_len, indices.size), []
    for step in range(total):
        tokens, mask = (
            torch.as_tensor(a) for a in pool.batch(batch_indices(indices, step, cfg.batch_size, cfg.seed), pool.seq_len)
        )
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        loss = lm_loss(model(tokens), tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
    return model, losses, opt


@pytest.mark.parametrize("depth", [0, 2])
def test_default_cpu_path_is_bitwise_the_pre_issue_15_loop(tmp_path, depth):
    pool = _pool(tmp_path / "pool")
    cfg = _cfg(steps=23, log_every=23, prefetch=depth)  # 23 x 4 over 40 examples: 2.3 epochs
    ref_model, losses, ref_opt = _reference_train(pool, cfg)
    out = train(pool, None, cfg, tmp_path / f"run{depth}")
    got = _weights(out)
    for name, t in ref_model.state_dict().items():
        if name != "lm_head.weight":  # tied; saved once as wte
            want = (
                t.t()
                if name.endswith(("c_attn.weight", "attn.c_proj.weight", "c_fc.weight", "mlp.c_proj.weight"))
                else t
            )
            assert torch.equal(got[name], want.contiguous()), name
    # the saved optimizer state: Adam's bias-corrected second moment of every parameter (a tied weight once)
    moments = load_file(str(out / "optimizer_v.safetensors"))
    assert set(moments) == {n for n, _ in ref_model.named_parameters()} and "lm_head.weight" not in moments
    for name, param in ref_model.named_parameters():
        want = ref_opt.state[param]["exp_avg_sq"] / (1 - cfg.beta2**23)
        torch.testing.assert_close(moments[name], want, rtol=1e-6, atol=0), name
    loss_row = (out / "curve.csv").read_text().splitlines()[1].split(",")[2]
    total = 0.0
    for x in losses:
        total += x
    assert loss_row == f"{total / len(losses):.6f}"


def test_prefetch_yields_the_same_items_and_raises_the_producers_error():
    assert list(prefetch(iter(range(50)), 3)) == list(range(50))

    def broken():
        yield 1
        raise RuntimeError("producer failed")

    it = prefetch(broken(), 2)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="producer failed"):
        next(it)


def test_learning_rate_defaults_per_preset():
    for preset in ("micro", "nano", "tiny", "mini"):
        assert TrainConfig(preset=preset).lr == 3e-3  # what every CPU run so far has used
    assert TrainConfig(preset="gpt2-125m").lr == 6e-4 == PRESET_LR["gpt2-125m"]
    assert TrainConfig(preset="gpt2-125m", lr=1e-4).lr == 1e-4
    with pytest.raises(ValueError, match="accum_steps"):
        TrainConfig(batch_size=6, accum_steps=4)


def test_force_retrains_a_finished_run(tmp_path):
    # force=True redoes the run even when its record matches (it returned the old run before); the weights are the
    # same bits, being a pure function of the settings
    pool = _pool(tmp_path / "pool")
    cfg = _cfg(steps=3, log_every=1)
    out = train(pool, None, cfg, tmp_path / "run")
    weights, stamp = (out / "model.safetensors").read_bytes(), (out / "_done.json").stat().st_mtime_ns
    train(pool, None, cfg, out)
    assert (out / "_done.json").stat().st_mtime_ns == stamp
    train(pool, None, cfg, out, force=True)
    assert (out / "_done.json").stat().st_mtime_ns != stamp
    assert (out / "model.safetensors").read_bytes() == weights

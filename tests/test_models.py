"""Models, trainer and evaluator against independent references (dsdm.model, dsdm.train, dsdm.evaluate).

- our GPT's logits equal transformers' GPT2LMHeadModel on the same weights, both ways (save -> HF, HF -> load);
- any other local HF causal LM loads through the wrapper with identical logits;
- training is bitwise deterministic, and a run interrupted after a checkpoint and resumed ends bitwise equal;
- the evaluator scores only continuation tokens: golden values from a hand-built bigram model.
Run: .venv/bin/python -m pytest -q tests/test_models.py
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dsdm.evaluate import bootstrap_ci, continuation_scores, evaluate_task
from dsdm.model import GPT, GPTConfig, build_model, load_model, num_params, save_model, set_attn_impl
from dsdm.pool import Pool, PoolWriter
from dsdm.tasks import Task, TaskExample
from dsdm.train import TrainConfig, batch_indices, lr_at, num_steps, train

transformers = pytest.importorskip("transformers")


def _tokens(vocab=97, B=3, T=16, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_logits_equal_transformers_gpt2_after_save(tmp_path):
    model = build_model("micro", vocab_size=97, seq_len=16, seed=3)
    save_model(model, tmp_path / "m")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_model(tmp_path / "m")(x), model(x), rtol=0, atol=0)
    assert num_params(model) == hf.num_parameters()


def test_transformers_gpt2_loads_into_our_gpt(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=20, n_embd=24, n_layer=2, n_head=3)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert isinstance(ours, GPT)  # so the factorized featurizer sees nn.Linear layers
    x = _tokens(vocab=61, T=20)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def test_other_hf_causal_lm_is_wrapped(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "llama")
    model = load_model(tmp_path / "llama")
    x = _tokens(vocab=50, T=12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="local directories only"):
        load_model(tmp_path / "gpt2")


def test_sdpa_and_eager_attention_agree_and_init_is_seeded():
    a = build_model("micro", 97, 16, seed=1)
    b = build_model("micro", 97, 16, seed=1)
    c = build_model("micro", 97, 16, seed=2)
    x = _tokens()
    with torch.no_grad():
        y = a(x)
        assert torch.equal(y, b(x)) and not torch.equal(y, c(x))
        set_attn_impl(a, "eager")
        torch.testing.assert_close(a(x), y, rtol=1e-5, atol=1e-6)
    assert a.lm_head.weight is a.transformer.wte.weight


# -----------------------------------------------------------------------------
# trainer


def _pool(path, n=40, T=16, vocab=97, seed=0):
    rng = np.random.default_rng(seed)
    w = PoolWriter(path, vocab_size=vocab)
    for i in range(n):
        # a learnable pattern: arithmetic sequences mod vocab, with a per-example start and stride
        start, stride = rng.integers(0, vocab), rng.integers(1, 4)
        w.add((start + stride * np.arange(rng.integers(T // 2, T + 1))) % vocab, doc_id=f"d{i}", source="s")
    return Pool(w.close({"seq_len": T, "mode": "document", "eos_id": 0}, config={"test": True}))


def _cfg(**over):
    base = dict(preset="micro", steps=30, batch_size=4, lr=1e-2, seed=0, device="cpu", checkpoint_every=7)
    return TrainConfig(**{**base, **over})


def test_training_is_bitwise_deterministic_and_learns(tmp_path):
    pool = _pool(tmp_path / "pool")
    idx = np.arange(0, 40, 2)
    a = train(pool, idx, _cfg(), tmp_path / "a")
    b = train(pool, idx, _cfg(), tmp_path / "b")
    c = train(pool, idx, _cfg(seed=1), tmp_path / "c")
    wa, wb, wc = ((d / "model.safetensors").read_bytes() for d in (a, b, c))
    assert wa == wb and wa != wc
    curve = (a / "curve.csv").read_text().splitlines()[1:]
    first, last = float(curve[0].split(",")[2]), float(curve[-1].split(",")[2])
    assert last < first - 0.5, (first, last)
    assert not (a / "checkpoint").exists()


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    import dsdm.train as T

    pool = _pool(tmp_path / "pool")
    ref = train(pool, None, _cfg(), tmp_path / "ref")
    saves = {"n": 0}
    real = T._save_checkpoint

    def crash_after_second(*a, **k):
        real(*a, **k)
        saves["n"] += 1
        if saves["n"] == 2:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(T, "_save_checkpoint", crash_after_second)
    with pytest.raises(KeyboardInterrupt):
        train(pool, None, _cfg(), tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint" / "state.pt").exists() and not (tmp_path / "run" / "_done.json").exists()
    monkeypatch.setattr(T, "_save_checkpoint", real)
    out = train(pool, None, _cfg(), tmp_path / "run")
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert (out / "curve.csv").read_text() == (ref / "curve.csv").read_text()


def test_finished_run_is_skipped_and_changed_config_refused(tmp_path):
    pool = _pool(tmp_path / "pool")
    out = train(pool, None, _cfg(steps=3), tmp_path / "m")
    stamp = (out / "_done.json").stat().st_mtime_ns
    train(pool, None, _cfg(steps=3), tmp_path / "m")
    assert (out / "_done.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="changed: train.steps"):
        train(pool, None, _cfg(steps=4), tmp_path / "m")


def test_budget_schedule_and_epoch_order():
    cfg = TrainConfig(tokens=1000, batch_size=4, lr=1.0, warmup_fraction=0.1, final_lr_fraction=0.1)
    assert num_steps(cfg, seq_len=16, num_indices=10) == math.ceil(1000 / 64)
    assert num_steps(TrainConfig(batch_size=4), seq_len=16, num_indices=10) == 3  # one epoch
    total = 100
    lrs = [lr_at(s, total, TrainConfig(lr=1.0, warmup_fraction=0.1, final_lr_fraction=0.1)) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    idx = np.array([5, 9, 11, 20, 31], dtype=np.int64)
    stream = np.concatenate([batch_indices(idx, s, 3, seed=4) for s in range(5)])  # 15 = 3 epochs of 5
    for e in range(3):
        assert sorted(stream[5 * e : 5 * e + 5].tolist()) == idx.tolist()
    assert stream[:5].tolist() != stream[5:10].tolist()  # each epoch its own permutation


# -----------------------------------------------------------------------------
# evaluator


class Bigram(nn.Module):
    """logits[b, t] = log P(. | tokens[b, t]) from a fixed table: golden NLLs are sums of table entries."""

    def __init__(self, table):
        super().__init__()
        self.logp = nn.Parameter(torch.log(torch.as_tensor(table, dtype=torch.float64)), requires_grad=False)
        self.config = GPTConfig(vocab_size=len(table), seq_len=64, n_layer=1, n_head=1, d_model=1)

    def forward(self, tokens):
        return self.logp[tokens]


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


WORDS = ["<|endoftext|>", "<unk>", "a", "b", "c", "d"]
TABLE = np.full((6, 6), 0.1)
TABLE[2] = [0.05, 0.05, 0.1, 0.6, 0.1, 0.1]  # after a: b likely
TABLE[3] = [0.05, 0.05, 0.1, 0.1, 0.5, 0.2]  # after b: c likely, then d
TABLE[4] = [0.05, 0.05, 0.7, 0.1, 0.05, 0.05]  # after c: a likely


def test_evaluator_scores_only_the_continuation():
    model, tok = Bigram(TABLE), _word_tokenizer(WORDS)
    exs = [
        TaskExample("a b", "c", id="x0"),  # -log .5, greedy right
        TaskExample("c a a b", "d", id="x1"),  # -log .2, greedy wrong (c is likelier)
        TaskExample("a", "b c a", id="x2"),  # mean of -log .6, .5, .7; greedy right
        TaskExample("b", "c", choices=("d", "c", "a"), answer=1, id="x3"),
        TaskExample("c", "a", choices=("a", "b"), answer=1, id="x4"),  # choice a is likelier: wrong
    ]
    r = evaluate_task(model, tok, Task("toy", exs, exs), split="holdout", batch_size=2, build_mc=False)
    gold = [-math.log(0.5), -math.log(0.2), -(math.log(0.6) + math.log(0.5) + math.log(0.7)) / 3]
    gold += [-math.log(0.5), -math.log(0.7)]
    np.testing.assert_allclose(r["per_example"]["loss"], gold, rtol=1e-6)  # float32 logits
    assert r["per_example"]["correct"] == [True, False, True, True, True]
    assert r["loss"] == pytest.approx(np.mean(gold)) and r["accuracy"] == pytest.approx(0.8)
    assert r["mc_accuracy"] == pytest.approx(0.5) and r["n_choices_examples"] == 2
    lo, hi = r["loss_ci"]
    assert lo <= r["loss"] <= hi


def test_padding_and_batching_do_not_change_scores():
    model = build_model("micro", 97, 16, seed=0)
    tokens = _tokens(T=16, B=6).numpy()
    score = np.zeros_like(tokens, dtype=bool)
    for i, (a, b) in enumerate([(3, 9), (1, 16), (5, 6), (10, 14), (2, 4), (8, 16)]):
        score[i, a:b] = True
        tokens[i, b:] = 0  # padding after the scored span
    together = continuation_scores(model, tokens, score, batch_size=4)
    alone = [continuation_scores(model, tokens[i : i + 1], score[i : i + 1], batch_size=1) for i in range(6)]
    np.testing.assert_allclose(together[0], np.concatenate([a[0] for a in alone]), rtol=1e-5)
    assert together[1].tolist() == [6, 15, 1, 4, 2, 8]


def test_bootstrap_ci_covers_the_mean():
    x = np.random.default_rng(0).normal(2.0, 1.0, 400)
    lo, hi = bootstrap_ci(x)
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.2)


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    """A real SIGKILL of a training process (checkpoint every step), then the same call resumes to equal weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pool = _pool(tmp_path / "pool")
    cfg = dict(steps=120, checkpoint_every=1)
    ref = train(pool, None, _cfg(**cfg), tmp_path / "ref")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from test_models import _cfg; from dsdm.pool import Pool; "
        "from dsdm.train import train; "
        f"train(Pool(sys.argv[2]), None, _cfg(steps={cfg['steps']}, checkpoint_every=1), sys.argv[3])"
    )
    run = tmp_path / "run"
    env = {**os.environ, "DSDM_PROGRESS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(Path(__file__).parent), str(pool.path), str(run)], env=env
    )
    deadline = time.time() + 120
    while not (run / "checkpoint" / "checkpoint.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run / "_done.json").exists(), "the run ended before the kill"
    out = train(pool, None, _cfg(**cfg), run)
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()

"""Train a language model on a selection of the pool at a fixed token budget (docs/method.md §6.2).

Recipe: next-token cross-entropy on the pool's examples (padding never scored), AdamW with β = (0.9, 0.95) and
decoupled weight decay on matrices only (not on biases, LayerNorms or position embeddings — nanoGPT's split),
linear warm-up then cosine decay to `final_lr_fraction` x lr, global-norm gradient clipping, bf16 autocast on GPU.

Budget: steps = ceil(tokens / (batch_size x L)), L the pool's sequence length; "tokens" counts batch slots, i.e.
examples x L, the same unit the experiment runner uses to size selections (k = T / (epochs x L)). The selection is
repeated for as many epochs as that needs; epoch e visits it in a permutation drawn from (seed, e), and batches run
straight across epoch boundaries, so the examples of step s are a pure function of (indices, seed, s, batch_size).

Determinism and resume: the data order is a function of the step, the initial weights of (preset, seed), there is
no dropout in the presets, and a checkpoint holds the weights, the AdamW state and the step — so on CPU a run killed
at any point and resumed gives bitwise the same weights as one that never stopped (tests/test_train.py).

Output directory: config.json + model.safetensors (a GPT-2 checkpoint, dsdm.model), train.json (config, budget,
final loss, wall time), curve.csv (step, tokens, loss, lr), _done.json; checkpoint/ while running.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class TrainConfig:
    preset: str = "nano"
    """Model shape from dsdm.model.PRESETS (micro, nano, tiny, mini, small, medium, gpt2-125m)."""
    init_from: str = ""
    """Instead of a fresh preset: a model directory to continue training (dsdm or any local HF causal LM)."""
    tokens: int = 0
    """Token budget (examples x seq_len). 0 = use `steps`."""
    steps: int = 0
    """Optimizer steps, used when tokens = 0. Both 0 = one epoch over the given indices (how proxies train)."""
    batch_size: int = 16
    """Examples per step."""
    lr: float = 3e-3
    """Peak learning rate (small models tolerate a high one; the 125M preset config uses 6e-4)."""
    warmup_fraction: float = 0.05
    """Fraction of the steps spent in linear warm-up (at least 1 step)."""
    final_lr_fraction: float = 0.1
    """The cosine schedule ends at this fraction of lr."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    seed: int = 0
    """Seeds the initial weights and the data order."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    dtype: str = "auto"
    """Autocast dtype: auto (bf16 on a GPU that supports it, else float32) | float32 | bfloat16 | float16."""
    compile: bool = False
    """torch.compile the model (worth it on GPU for long runs)."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0 = about 10 per run. The checkpoint is the unit of resume."""
    log_every: int = 10
    """Steps between curve.csv rows."""

    def __post_init__(self):
        if self.tokens < 0 or self.steps < 0:
            raise ValueError("tokens and steps must be >= 0")
        if self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("batch_size and lr must be positive")
        if not 0 <= self.warmup_fraction < 1 or not 0 <= self.final_lr_fraction <= 1:
            raise ValueError("warmup_fraction must be in [0, 1) and final_lr_fraction in [0, 1]")


def num_steps(cfg: TrainConfig, seq_len: int, num_indices: int) -> int:
    """Optimizer steps for the budget: ceil(tokens / (batch_size x seq_len)), else cfg.steps, else one epoch over
    the num_indices selected examples, ceil(num_indices / batch_size)."""
    if cfg.tokens:
        return max(1, math.ceil(cfg.tokens / (cfg.batch_size * seq_len)))
    if cfg.steps:
        return cfg.steps
    return max(1, math.ceil(num_indices / cfg.batch_size))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up over max(1, warmup_fraction x total) steps, then cosine from lr to final_lr_fraction x lr."""
    warmup = max(1, int(cfg.warmup_fraction * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = cfg.final_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_indices(indices: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The pool indices of `step`'s batch: positions [step*B, (step+1)*B) of the stream perm_0 ++ perm_1 ++ ...,
    perm_e a permutation of `indices` drawn from (seed, e). (B,) int64."""
    n = indices.shape[0]
    out = np.empty(batch_size, dtype=np.int64)
    pos = step * batch_size
    filled = 0
    while filled < batch_size:
        epoch, offset = divmod(pos + filled, n)
        perm = np.random.default_rng((seed, epoch)).permutation(n)
        take = min(batch_size - filled, n - offset)
        out[filled : filled + take] = indices[perm[offset : offset + take]]
        filled += take
    return out


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens. logits (B, T, V), tokens/mask (B, T) -> scalar."""
    target = tokens[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weights of Linear and token-embedding layers; not biases, LayerNorms or position embeddings."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "wpe" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -----------------------------------------------------------------------------
# IO: the training run (checkpoints, curve, final model)


def _fresh_model(pool, cfg: TrainConfig):
    from dsdm.model import GPT, build_model, load_model

    if cfg.init_from:
        model = load_model(cfg.init_from)
        if isinstance(model, GPT) and model.config.seq_len < pool.seq_len:
            raise ValueError(f"{cfg.init_from}: seq_len {model.config.seq_len} < the pool's {pool.seq_len}")
        return model.train()
    return build_model(cfg.preset, pool.vocab_size, pool.seq_len, cfg.seed).train()


def _save_checkpoint(ckpt: Path, model, opt, step: int, meta: dict) -> None:
    """state.pt (weights, AdamW state, step) then checkpoint.json (step, curve, run key), each atomic. A kill
    between the two leaves a newer state.pt with an older json: resume trusts the step stored in state.pt."""
    from dsdm.io import atomic_path, write_json

    ckpt.mkdir(parents=True, exist_ok=True)
    with atomic_path(ckpt / "state.pt") as tmp:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "meta": meta}, tmp)
    write_json(ckpt / "checkpoint.json", {"step": step, **meta})


def train(pool, indices, cfg: TrainConfig, out_dir: str | Path, force: bool = False) -> Path:
    """Train on pool examples `indices` ((k,) int64; None = the whole pool) for the budget; return out_dir.

    Skips the run if out_dir is already done with this (config, indices, pool); resumes from out_dir/checkpoint/.
    """
    from dsdm.common import autocast, log, progress, resolve_device, resolve_dtype
    from dsdm.config import to_dict
    from dsdm.io import clear_done, is_done, mark_done, write_json
    from dsdm.model import GPT, save_model

    out_dir = Path(out_dir)
    indices = np.arange(len(pool), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or indices.size == 0:
        raise ValueError(f"training indices must be a non-empty 1-D array, got shape {indices.shape}")
    if indices.min() < 0 or indices.max() >= len(pool):
        raise ValueError(f"training indices must lie in [0, {len(pool)}), got [{indices.min()}, {indices.max()}]")
    # device / dtype / compile change speed, not the recipe: they are left out of the completion key.
    recipe = {k: v for k, v in to_dict(cfg).items() if k not in ("device", "dtype", "compile", "log_every")}
    key = {
        "train": recipe,
        "pool": pool.fingerprint,
        "indices_sha256": hashlib.sha256(indices.tobytes()).hexdigest(),
        "num_indices": int(indices.size),
    }
    if is_done(out_dir, key, force=force):
        return out_dir
    if force:
        clear_done(out_dir)
    device, dev_why = resolve_device(cfg.device)
    dtype, dtype_why = resolve_dtype(cfg.dtype, device)
    total = num_steps(cfg, pool.seq_len, indices.size)
    every = cfg.checkpoint_every or max(1, math.ceil(total / 10))
    started = time.time()

    model = _fresh_model(pool, cfg).to(device)
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda"
    )
    ckpt = out_dir / "checkpoint"
    step, curve, loss_sum, loss_n = 0, [], 0.0, 0
    if (ckpt / "state.pt").exists() and not force:
        state = torch.load(ckpt / "state.pt", map_location=device, weights_only=True)
        meta = state["meta"]
        if json.loads(json.dumps(meta["key"])) != json.loads(json.dumps(key)):
            raise ValueError(f"{ckpt} belongs to another run configuration; remove it or pass --force")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, curve, loss_sum, loss_n = state["step"], meta["curve"], meta["loss_sum"], meta["loss_n"]
        log(f"{out_dir}: resuming at step {step}/{total}")
    fwd = torch.compile(model) if cfg.compile else model
    tokens_per_step = cfg.batch_size * pool.seq_len
    log(
        f"train {out_dir.name}: {total} steps x {cfg.batch_size} x {pool.seq_len} tokens "
        f"= {total * tokens_per_step:,} tokens over {indices.size} examples "
        f"({total * cfg.batch_size / indices.size:.2f} epochs); device {dev_why}; dtype {dtype_why}"
    )
    bar = progress(
        total=total * tokens_per_step, initial=step * tokens_per_step, desc=f"train {out_dir.name}", unit="tok"
    )
    model.train()
    while step < total:
        idx = batch_indices(indices, step, cfg.batch_size, cfg.seed)
        tokens, mask = pool.batch(idx, pad_to=pool.seq_len)
        tokens, mask = torch.as_tensor(tokens, device=device), torch.as_tensor(mask, device=device)
        lr = lr_at(step, total, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast(device, dtype):
            loss = lm_loss(fwd(tokens), tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        bar.update(tokens_per_step)
        if step % cfg.log_every == 0 or step == total:
            curve.append({"step": step, "tokens": step * tokens_per_step, "loss": loss_sum / loss_n, "lr": lr})
            bar.set_postfix(loss=f"{loss_sum / loss_n:.3f}")
            loss_sum, loss_n = 0.0, 0
        if step % every == 0 and step < total:
            meta = {
                "key": key,
                "tokens": step * tokens_per_step,
                "curve": curve,
                "loss_sum": loss_sum,
                "loss_n": loss_n,
            }
            _save_checkpoint(ckpt, model, opt, step, meta)
    bar.close()

    if isinstance(model, GPT):
        save_model(model.cpu(), out_dir)
    else:  # a Hugging Face model we continued training
        model.hf.save_pretrained(str(out_dir), safe_serialization=True)
    _write_curve(out_dir / "curve.csv", curve)
    summary = {
        "config": to_dict(cfg),
        "steps": total,
        "tokens": total * tokens_per_step,
        "num_indices": int(indices.size),
        "epochs": total * cfg.batch_size / indices.size,
        "final_loss": curve[-1]["loss"] if curve else None,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "wall_time_s": round(time.time() - started, 3),
    }
    write_json(out_dir / "train.json", summary)
    mark_done(out_dir, key, started=started, steps=total, final_loss=summary["final_loss"])
    shutil.rmtree(ckpt, ignore_errors=True)
    return out_dir


def _write_curve(path: Path, curve: list[dict]) -> None:
    from dsdm.io import atomic_write_text

    lines = ["step,tokens,loss,lr"] + [f"{r['step']},{r['tokens']},{r['loss']:.6f},{r['lr']:.6g}" for r in curve]
    atomic_write_text(path, "\n".join(lines) + "\n")

"""Train a language model on a selection of the pool at a fixed token budget (docs/method.md §6.2).

Recipe: next-token cross-entropy on the pool's examples (padding never scored), AdamW with β = (0.9, 0.95) and
decoupled weight decay on matrices only (not on biases, LayerNorms or position embeddings — nanoGPT's split),
linear warm-up then cosine decay to `final_lr_fraction` x lr, global-norm gradient clipping, bf16 autocast on GPU.

Budget: steps = ceil(tokens / (batch_size x L)), L the pool's sequence length; "tokens" counts batch slots, i.e.
examples x L, the same unit the experiment runner uses to size selections (k = T / (epochs x L)). The selection is
repeated for as many epochs as that needs; epoch e visits it in a permutation drawn from (seed, e), and batches run
straight across epoch boundaries, so the examples of step s are a pure function of (indices, seed, s, batch_size).
Each epoch's permutation is drawn once (batch_stream), so a step costs O(batch) whatever the selection size.

Speed (none of it changes the CPU default's numbers): on CUDA batches are assembled by a background thread
(`prefetch`), pinned and copied with non_blocking; the running loss stays on the device and is read every `log_every`
steps; on CUDA the loss is a chunked cross-entropy through the LM head (chunked_lm_loss: never the fp32 logits of the
whole batch, ~13 GB at 64 x 1024 x 50k); `accum_steps` splits a step into micro-batches with the same mean loss.

Determinism and resume: the data order is a function of the step, the initial weights of (preset, seed), there is
no dropout in the presets, and a checkpoint holds the weights, the AdamW state and the step — so on CPU a run killed
at any point and resumed gives bitwise the same weights as one that never stopped (tests/test_train.py).

Output directory: config.json + model.safetensors (a GPT-2 checkpoint, dsdm.model), optimizer_v.safetensors (AdamW's
bias-corrected second moment per parameter at the end of training: the featurizer's optional Adam preconditioner,
docs/estimator.md "Choices"), train.json (config, budget, final loss), curve.csv (step, tokens, loss, lr),
_done.json; checkpoint/ while running; snapshot_<f>/ (the same files as a model directory) for each fraction of
TrainConfig.snapshots.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class TrainConfig:
    preset: str = "nano"
    """Model shape from dsdm.model.PRESETS (micro, nano, tiny, mini, small, medium, gpt2-125m)."""
    d_model: int = 0
    """The model's width instead of the preset's (0 = the preset's; a multiple of its n_head): the wider models of
    the balanced compute curve (dsdm.experiment BudgetConfig.compute_scaling)."""
    init_from: str = ""
    """Instead of a fresh preset: a model directory to continue training (dsdm or any local HF causal LM)."""
    tokens: int = 0
    """Token budget (examples x seq_len). 0 = use `steps`."""
    steps: int = 0
    """Optimizer steps, used when tokens = 0. Both 0 = one epoch over the given indices (how proxies train)."""
    batch_size: int = 16
    """Examples per step."""
    lr: float | None = None
    """Peak learning rate; unset = the preset's (PRESET_LR: 3e-3 up to mini, GPT-2/nanoGPT recipes above)."""
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
    """torch.compile the model's forward (changes float rounding on CPU; benchmarks/gpu_check.py measures it on GPU)."""
    accum_steps: int = 1
    """Micro-batches per optimizer step (batch_size must be a multiple): the same examples and mean loss as one
    batch, within float rounding, in 1/accum_steps of the activation memory."""
    loss_chunk: int = 0
    """Tokens per chunk of the chunked LM-head cross-entropy (chunked_lm_loss). 0 = auto: 8192 on CUDA, off on
    CPU (one F.cross_entropy over the batch's logits: today's numbers). -1 = off everywhere."""
    prefetch: int = -1
    """Batches assembled ahead by a background thread; 0 = on the main thread; -1 = auto: 2 on CUDA, 0 on CPU
    (on 2 CPU cores the thread competes with torch's and cost 7-20% of nano's tokens/s). Same batches either way."""
    fused_optimizer: bool = False
    """Fused AdamW on CPU too (always fused on CUDA). Opt-in on CPU: it changes float rounding."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0 = about 10 per run. The checkpoint is the unit of resume."""
    log_every: int = 10
    """Steps between curve.csv rows."""
    snapshots: list[float] = field(default_factory=list)
    """Fractions f in (0, 1) of the run after which the model is also saved, to out_dir/snapshot_<f>/ (a model
    directory like out_dir: weights, optimizer second moments, tokenizer) after step max(1, round(f x steps)): the
    checkpoints along training that TracIn/SOURCE-style estimators ensemble over (docs/estimator.md, round 10)."""

    def __post_init__(self):
        if self.lr is None:  # resolved here, so the run's key and train.json record the value actually used
            self.lr = PRESET_LR.get(self.preset, DEFAULT_LR)
        if self.tokens < 0 or self.steps < 0:
            raise ValueError("tokens and steps must be >= 0")
        if self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("batch_size and lr must be positive")
        if self.accum_steps <= 0 or self.batch_size % self.accum_steps:
            raise ValueError(f"accum_steps={self.accum_steps} must be positive and divide batch_size={self.batch_size}")
        if self.loss_chunk < -1 or self.prefetch < -1:
            raise ValueError("loss_chunk and prefetch must be >= -1 (-1: off / auto)")
        if not 0 <= self.warmup_fraction < 1 or not 0 <= self.final_lr_fraction <= 1:
            raise ValueError("warmup_fraction must be in [0, 1) and final_lr_fraction in [0, 1]")
        if any(not 0 < f < 1 for f in self.snapshots) or len(set(self.snapshots)) != len(self.snapshots):
            raise ValueError(f"snapshots must be distinct fractions in (0, 1), got {self.snapshots}")


# Peak learning rate when TrainConfig.lr is unset. The small presets keep the 3e-3 every CPU run has used; above
# them the published recipes for that size: nanoGPT's shakespeare-char (6 x 6 x 384 = our `small`) and Pythia-70M
# (d_model 512, like `medium`) use 1e-3; GPT-3 Small / nanoGPT's GPT-2 124M use 6e-4.
DEFAULT_LR = 3e-3
PRESET_LR = {"small": 1e-3, "medium": 1e-3, "gpt2-125m": 6e-4}


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
    perm_e a permutation of `indices` drawn from (seed, e). (B,) int64.

    The definition, O(n) per call (it redraws the permutation); the trainer uses batch_stream (the same batches)."""
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


def batch_stream(indices: np.ndarray, start_step: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """batch_indices(indices, s, batch_size, seed) for s = start_step, start_step + 1, ... (forever), drawing each
    epoch's permutation once: O(batch_size) per step plus one O(n) draw per epoch, instead of O(n) per step."""
    n = indices.shape[0]
    pos = start_step * batch_size
    epoch, perm = -1, None
    while True:
        out = np.empty(batch_size, dtype=np.int64)
        filled = 0
        while filled < batch_size:
            e, offset = divmod(pos + filled, n)
            if e != epoch:
                epoch, perm = e, np.random.default_rng((seed, e)).permutation(n)
            take = min(batch_size - filled, n - offset)
            out[filled : filled + take] = indices[perm[offset : offset + take]]
            filled += take
        pos += batch_size
        yield out


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over real tokens, mean (or sum). logits (B, T, V), tokens/mask (B, T) -> scalar."""
    target = tokens[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction=reduction
    )


def lm_targets(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with positions 0..T-1: tokens[t+1], or -100 (ignored) at padding and at the last
    position. (B, T) -> (B, T) int64."""
    target = tokens.roll(-1, 1).masked_fill(~mask.roll(-1, 1), -100)
    target[:, -1] = -100
    return target


class _ChunkedHeadCE(torch.autograd.Function):
    """sum_n CE(h_n W^T, y_n) / denom over rows with y_n != -100, chunk rows at a time, gradients computed in the
    forward: dL/dlogits = (softmax - onehot) / denom is known there, so only one chunk's logits ever exist
    (fp32: chunk x V x 4 bytes) and nothing of size N x V is saved for the backward (Liger-style fused linear CE)."""

    @staticmethod
    def forward(ctx, h, weight, target, chunk, denom):  # h (N, C), weight (V, C), target (N,) int64
        acc = torch.promote_types(h.dtype, torch.float32)  # float32, or float64 for float64 inputs
        loss = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s : s + chunk], target[s : s + chunk]
            logits = (hc @ weight.t()).to(acc)  # (chunk, V): under autocast the matmul runs in bf16
            valid = yc != -100
            y = yc.clamp_min(0)
            lse = logits.logsumexp(-1)
            loss += ((lse - logits.gather(1, y[:, None]).squeeze(1)) * valid).sum()
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g.scatter_add_(1, y[:, None], -torch.ones_like(g[:, :1]))
            g.mul_((valid.to(acc) / denom.to(acc))[:, None])
            grad_h[s : s + chunk] = (g.to(hc.dtype) @ weight.to(hc.dtype)).to(h.dtype)
            grad_w += (g.t().to(hc.dtype) @ hc).to(acc)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss / denom.to(acc)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, chunk: int, denom=None
) -> torch.Tensor:
    """lm_loss(hidden @ weight^T, tokens, mask) without materialising the (B, T, V) logits: the LM head and the
    cross-entropy run `chunk` tokens at a time. hidden (B, T, C), weight (V, C) -> scalar. denom: the number of
    scored tokens to divide by (default: this batch's; gradient accumulation passes the whole step's)."""
    target = lm_targets(tokens, mask).flatten()
    denom = (target != -100).sum().clamp_min(1).float() if denom is None else denom
    return _ChunkedHeadCE.apply(hidden.flatten(0, 1), weight, target, chunk, denom)


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
    width = {"d_model": cfg.d_model} if cfg.d_model else {}
    return build_model(cfg.preset, pool.vocab_size, pool.seq_len, cfg.seed, **width).train()


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
    from dsdm.common import log, progress, resolve_device, resolve_dtype
    from dsdm.config import to_dict, without_new_defaults
    from dsdm.io import clear_done, is_done, mark_done, write_json
    from dsdm.model import GPT, load_weights

    out_dir = Path(out_dir)
    indices = np.arange(len(pool), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or indices.size == 0:
        raise ValueError(f"training indices must be a non-empty 1-D array, got shape {indices.shape}")
    if indices.min() < 0 or indices.max() >= len(pool):
        raise ValueError(f"training indices must lie in [0, {len(pool)}), got [{indices.min()}, {indices.max()}]")
    # These change speed or memory (and float rounding), not the recipe: they are left out of the completion key.
    recipe = {k: v for k, v in to_dict(cfg).items() if k not in SPEED_KEYS}
    recipe = without_new_defaults(recipe, {"snapshots": [], "d_model": 0})  # added after models existed
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
    snapshot_steps: dict[int, float] = {}
    for f in sorted(cfg.snapshots):
        s = snapshot_step(f, total)
        if s in snapshot_steps or s >= total:  # the same weights twice would weigh them double in an ensemble
            other = f"snapshot {snapshot_steps[s]}" if s in snapshot_steps else "the final model"
            raise ValueError(f"snapshots: {f} of {total} steps is step {s}, as {other}; use fewer or coarser fractions")
        snapshot_steps[s] = f
    started = time.time()

    model = _fresh_model(pool, cfg).to(device)
    fused = device.type == "cuda" or cfg.fused_optimizer
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    ckpt = out_dir / "checkpoint"
    step, curve, loss_sum, loss_n = 0, [], 0.0, 0
    if (ckpt / "state.pt").exists() and not force:
        state = load_weights(ckpt / "state.pt", map_location=device)  # tensors only: a planted pickle is refused
        meta = state["meta"]
        if json.loads(json.dumps(meta["key"])) != json.loads(json.dumps(key)):
            raise ValueError(f"{ckpt} belongs to another run configuration; remove it or pass --force")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, curve, loss_sum, loss_n = state["step"], meta["curve"], meta["loss_sum"], meta["loss_n"]
        log(f"{out_dir}: resuming at step {step}/{total}")
    else:  # a fresh start: snapshots of an earlier run of this directory are not this run's
        for old in out_dir.glob("snapshot_*"):
            shutil.rmtree(old, ignore_errors=True)
    chunk = cfg.loss_chunk if cfg.loss_chunk else (8192 if device.type == "cuda" else -1)
    chunked = chunk > 0 and isinstance(model, GPT)
    fwd = model.hidden if chunked else model
    fwd = torch.compile(fwd) if cfg.compile else fwd
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
    # The running loss stays on the device (float64: the same additions Python floats did) and is read only when
    # a curve row or a checkpoint needs it, so a step never waits for the GPU.
    loss_acc = torch.tensor(loss_sum, dtype=torch.float64, device=device)
    depth = cfg.prefetch if cfg.prefetch >= 0 else (2 if device.type == "cuda" else 0)
    batches = prefetch(_batches(pool, batch_stream(indices, step, cfg.batch_size, cfg.seed), device), depth)
    try:
        while step < total:
            tokens, mask = next(batches)
            lr = lr_at(step, total, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss = _forward_backward(model, fwd, tokens, mask, cfg.accum_steps, chunk if chunked else 0, device, dtype)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            loss_acc += loss
            loss_n += 1
            bar.update(tokens_per_step)
            if step in snapshot_steps:  # before the checkpoint that follows: a resume never skips one
                _save_model_dir(out_dir / snapshot_name(snapshot_steps[step]), model, opt, cfg, pool)
            if step % cfg.log_every == 0 or step == total:
                mean = loss_acc.item() / loss_n
                curve.append({"step": step, "tokens": step * tokens_per_step, "loss": mean, "lr": lr})
                bar.set_postfix(loss=f"{mean:.3f}")
                loss_acc.zero_()
                loss_n = 0
            if step % every == 0 and step < total:
                meta = {
                    "key": key,
                    "tokens": step * tokens_per_step,
                    "curve": curve,
                    "loss_sum": loss_acc.item(),
                    "loss_n": loss_n,
                }
                _save_checkpoint(ckpt, model, opt, step, meta)
    finally:
        batches.close()
    bar.close()

    _save_model_dir(out_dir, model, opt, cfg, pool)
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
    }  # no wall time here: train.json is byte-identical across re-runs; _done.json records it
    write_json(out_dir / "train.json", summary)
    mark_done(out_dir, key, started=started, steps=total, final_loss=summary["final_loss"])
    shutil.rmtree(ckpt, ignore_errors=True)
    return out_dir


SECOND_MOMENTS_FILE = "optimizer_v.safetensors"


def snapshot_step(fraction: float, total: int) -> int:
    """The step after which TrainConfig.snapshots' `fraction` is saved: max(1, round(fraction x total))."""
    return max(1, round(fraction * total))


def snapshot_name(fraction: float) -> str:
    """The snapshot's directory name under the run's out_dir, e.g. snapshot_0.75."""
    return f"snapshot_{fraction:g}"


def _save_model_dir(out_dir: Path, model, opt, cfg: TrainConfig, pool) -> None:
    """A loadable model directory: AdamW's second moments, then the weights (and the pool's tokenizer beside)."""
    from dsdm.model import GPT, save_model

    save_second_moments(out_dir / SECOND_MOMENTS_FILE, second_moments(model, opt, cfg.beta2))
    if isinstance(model, GPT):
        tokenizer = pool.path / pool.manifest.get("tokenizer_file", "tokenizer.json")  # the ids' tokenizer, beside
        save_model(model, out_dir, eos_id=pool.eos_id, tokenizer_json=tokenizer if tokenizer.exists() else None)
    else:  # a Hugging Face model we continued training
        model.hf.save_pretrained(str(out_dir), safe_serialization=True)


def second_moments(model: torch.nn.Module, opt: torch.optim.Optimizer, beta2: float) -> dict:
    """AdamW's bias-corrected second moment v_hat = exp_avg_sq / (1 - beta2^t), t the parameter's own step count,
    per parameter name of model.named_parameters() (a tied weight once, under its first name): {name: float32 CPU
    tensor of the parameter's shape}. Parameters the optimizer never stepped are left out."""
    out = {}
    for name, param in model.named_parameters():
        state = opt.state.get(param, {})
        if "exp_avg_sq" in state:
            correction = 1.0 - beta2 ** float(state["step"])
            out[name] = (state["exp_avg_sq"].detach().float() / correction).cpu().contiguous()
    return out


def save_second_moments(path: Path, moments: dict) -> None:
    """Write second_moments(...) as safetensors, atomically."""
    from safetensors.torch import save_file

    from dsdm.io import atomic_path

    with atomic_path(path) as tmp:
        save_file(moments, str(tmp))


SPEED_KEYS = ("device", "dtype", "compile", "log_every", "accum_steps", "loss_chunk", "prefetch", "fused_optimizer")


def _forward_backward(model, fwd, tokens, mask, accum: int, chunk: int, device, dtype) -> torch.Tensor:
    """Forward and backward of one optimizer step's batch (B, T) in `accum` micro-batches; returns the step's mean
    loss, detached, float64 on the device. accum = 1 with chunk = 0 is exactly lm_loss(model(tokens)).mean()."""
    from dsdm.common import autocast

    if accum == 1 and not chunk:
        with autocast(device, dtype):
            loss = lm_loss(fwd(tokens), tokens, mask)
        loss.backward()
        return loss.detach().double()
    denom = mask[:, 1:].sum().clamp_min(1).float()  # every micro-batch divides by the whole step's token count
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t, m in zip(tokens.chunk(accum), mask.chunk(accum)):
        with autocast(device, dtype):
            if chunk:
                loss = chunked_lm_loss(fwd(t), model.lm_head.weight, t, m, chunk, denom)
            else:
                loss = lm_loss(fwd(t), t, m, reduction="sum") / denom
        loss.backward()
        total += loss.detach().double()
    return total


def _batches(pool, order: Iterator[np.ndarray], device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, mask) on `device` for each index batch of `order`; pinned and copied non_blocking on CUDA."""
    cuda = device.type == "cuda"
    for idx in order:
        tokens, mask = (torch.from_numpy(a) for a in pool.batch(idx, pad_to=pool.seq_len))
        if cuda:
            tokens, mask = tokens.pin_memory(), mask.pin_memory()
        yield tokens.to(device, non_blocking=cuda), mask.to(device, non_blocking=cuda)


def prefetch(items: Iterator, depth: int):
    """Run the iterator `items` `depth` items ahead in a daemon thread (0: a plain generator on this thread).
    Yields the same items in the same order; an exception in the thread is raised here. close() stops the thread."""
    if depth == 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("ok", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("ok", done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(("err", e))

    thread = threading.Thread(target=work, daemon=True, name="dsdm-prefetch")
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "err":
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()


def _write_curve(path: Path, curve: list[dict]) -> None:
    from dsdm.io import atomic_write_text

    lines = ["step,tokens,loss,lr"] + [f"{r['step']},{r['tokens']},{r['loss']:.6f},{r['lr']:.6g}" for r in curve]
    atomic_write_text(path, "\n".join(lines) + "\n")

"""Sketches: projected per-example gradients of a proxy LM (TRAK, Park et al. 2023, §3; docs/method.md §3.2–3.7).

The pure part of featurizing (dsdm.featurize is the feature store around it). For proxy m and sequence z we keep
g_m(z) = P_m^T grad f(z; theta_m) / sqrt(k) in R^k, where f is the mean per-token
margin log(p/(1-p)) over the scored positions (docs/method.md §3.2) and Q(z) = mean over the same positions of (1 - p)
(the out-to-loss term, §3.3). Two projectors:

* ``dense``: exact TRAK. Per-example gradients of every parameter with torch.func (vmap over grad), multiplied by a
  Rademacher matrix P (p x k, entries ±1) regenerated block by block from (seed, proxy, parameter, block) on the CPU,
  never stored; CPU and GPU see the same matrix. The reference; its cost is dominated by regenerating P. With
  ``dense_projection="srht"`` the same exact gradients go through a subsampled randomized Hadamard transform instead
  (P = D H[:, S], also ±1 entries), O(p log p) per example rather than p x k random signs per batch.
* ``factorized`` (default): LoGra-style Kronecker sketch per ``nn.Linear``. For y = x W^T + b with per-token inputs
  x_t and output gradients delta_t the weight gradient is G = sum_t delta_t x_t^T, and with independent Rademacher
  P_out (k_o x d_out), P_in (k_i x d_in), P_out G P_in^T = sum_t (P_out delta_t)(P_in x_t)^T. Inputs are projected in
  a forward hook, output gradients in a tensor hook, from ONE backward of sum_b f_b (examples are independent, so the
  per-token delta of example b is its own). No weight gradient is ever formed (parameters are frozen; the gradient
  flows from the embedding outputs). The bias is covered by appending a constant 1 to x.
  Covered: the weight and bias of every nn.Linear, including the LM head (a Linear d_model -> V; when tied to the
  token embedding only its output-side use is covered). Not covered: embedding lookups (token, position), LayerNorm.

Adam preconditioning (optional, `second_moments`): Adam moves a parameter by -lr g / sqrt(v), so the first-order
effect of training on z on a target is <grad f(target), V^-1/2 grad f(z)>, V = diag(v) (TrackStar, Chang et al. 2024,
corrects gradients by the optimizer's second moment for this reason). Both sides are scaled by V^-1/4 before the
projection, so the kernel's inner product is that metric. Dense: exactly, elementwise. Factorized: with v of each
Linear's (d_out, d_in + 1) weight-and-bias matrix replaced by its rank-1 Adafactor fit r c^T / S (row sums r, column
sums c, total S), V^-1/4 is a scaling of each side, (r / sqrt S)^-1/4 on the outputs and (c / sqrt S)^-1/4 on the
inputs, folded into the side matrices: the sketch costs the same. v is floored at Adam's eps^2 = 1e-16 per entry.

Scaling: both projectors divide by sqrt(k) (per factor: sqrt(k_o) and sqrt(k_i)), so <g(a), g(b)> is an unbiased
estimate of <grad f(a), grad f(b)>. docs/method.md §3.4 writes 1/sqrt(p) (traker); with a relative ridge (datamodel.py)
the scores do not depend on this constant at all.

Device. Both sketches build their random matrices once per proxy and keep them on the featurize device (factorized:
the side matrices; SRHT: the signs D and the columns S). The i.i.d. dense matrix is regenerated per batch: from the
CPU PCG64 stream by default (the same matrix on every device), or with dense_rng="device" by torch's generator on the
featurize device (fast on a GPU, but another matrix: the store records it and scoring refuses to mix, see
projection_rng). precision="bf16" runs the proxy's forward/backward under bf16 autocast and "tf32" lets float32
matmuls use TF32; the projections and the output function stay float32 (measured errors: docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

# -----------------------------------------------------------------------------
# Output function (docs/method.md §3.2, §3.3)


class _Margin(torch.autograd.Function):
    """m = logit_y - logsumexp_{v != y} logit_v over the last dim, with the backward written out.

    Forward: the same ops as the plain autograd version. Backward: bitwise the gradient autograd builds (its gather and
    scatter branches add exact zeros), in 3 passes over (B, T, V) instead of ~9 (no zero-filled gather/scatter
    gradients to allocate and sum). Plain autograd only: it has no torch.func (vmap) rule, so the dense projector
    keeps the plain version.
    """

    @staticmethod
    def forward(ctx, logits, target):  # logits (..., V) float, target (..., 1) int64
        correct = logits.gather(-1, target).squeeze(-1)
        others = logits.scatter(-1, target, float("-inf"))
        lse = others.logsumexp(-1)
        ctx.save_for_backward(others, lse, target)
        return correct - lse

    @staticmethod
    def backward(ctx, gm):
        others, lse, target = ctx.saved_tensors
        g = (others - lse.unsqueeze(-1)).exp_().mul_((-gm).unsqueeze(-1))  # logsumexp's backward; 0 at the target
        return g.scatter_(-1, target, gm.unsqueeze(-1)), None  # gather's backward: gm at the target


def margins_and_probs(
    logits: torch.Tensor, tokens: torch.Tensor, fast_backward: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position margin m_t = logit_y - logsumexp_{v != y} logit_v and p_t, predicting tokens[:, 1:].

    logits (B, T, V) from tokens (B, T) -> margins (B, T-1), probs (B, T-1), float32. Never through log(1 - p).
    fast_backward: same numbers, cheaper backward (_Margin; not under torch.func transforms). It also scores the last
    position (against a dummy target) and drops it afterwards, so no (B, T-1, V) slice needs a zero-filled gradient.
    """
    if fast_backward:
        target = torch.cat([tokens[:, 1:], tokens[:, :1]], 1)[..., None]  # (B, T, 1); the last one is a dummy
        margin = _Margin.apply(logits.float(), target)[:, :-1]  # (B, T-1)
        return margin, torch.sigmoid(margin)
    logits = logits[:, :-1].float()  # (B, T-1, V)
    target = tokens[:, 1:, None]  # (B, T-1, 1)
    correct = logits.gather(-1, target).squeeze(-1)  # (B, T-1)
    others = logits.scatter(-1, target, float("-inf")).logsumexp(-1)  # (B, T-1)
    margin = correct - others
    prob = torch.sigmoid(margin)  # p = e^m / (1 + e^m) exactly, since m = log(p / (1 - p))
    return margin, prob


OUTPUTS = ("margin", "logp")


def output_and_q(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    score: torch.Tensor,
    fast_backward: bool = False,
    output: str = "margin",
) -> tuple[torch.Tensor, torch.Tensor]:
    """f = mean margin and Q = mean (1 - p) over scored positions. score (B, T) bool marks scored TOKENS (t >= 1).

    Returns f (B,) (differentiable) and Q (B,) (detached). fast_backward: see margins_and_probs. output="logp": f is
    the mean log p = log sigmoid(margin) instead (minus the mean NLL; per token (1 - p) times the margin's gradient),
    the target side's alternative output function (ScoreConfig.target_output).
    """
    if output not in OUTPUTS:
        raise ValueError(f"output function must be one of {OUTPUTS}, got {output!r}")
    margin, prob = margins_and_probs(logits, tokens, fast_backward)
    w = score[:, 1:].to(margin.dtype)  # token t is predicted at position t-1
    n = w.sum(1).clamp_min(1.0)
    per_token = margin if output == "margin" else nn.functional.logsigmoid(margin)
    f = (per_token * w).sum(1) / n
    q = ((1.0 - prob.detach()) * w).sum(1) / n
    return f, q


def pool_score_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pool examples score every real next-token position: mask (B, T) with position 0 cleared."""
    score = mask.clone()
    score[:, 0] = False
    return score


# -----------------------------------------------------------------------------
# Seeded Rademacher blocks, generated on the CPU (device-independent) and never stored


def _block_seed(*keys: object) -> int:
    """A 63-bit seed from any tuple of keys (sha256): independent streams per (seed, proxy, tensor, block)."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# Version of the projection's random numbers. Scoring regenerates the sketch to project target gradients, so pool
# features made with another version would be compared in a different random basis: silently wrong scores.
# 1: torch.randint signs (until 2026-11-23); 2: PCG64 bytes -> 8 signs each (rademacher below).
SKETCH_VERSION = 2

# Row b = the 8 bits of byte b, MSB first, as ±1: one random byte gives 8 signs through one table lookup.
_SIGN_TABLE = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float32) * 2 - 1


def rademacher(rows: int, cols: int, *keys: object) -> torch.Tensor:
    """(rows, cols) float32 matrix of ±1 from a CPU generator seeded by `keys`: the same numbers on every device.

    Each sign is one bit of numpy's PCG64 byte stream (bit 1 -> +1, MSB first, row-major). Regenerating p x k signs
    is the dense projector's main cost; this runs ~3x faster than torch.randint on one CPU thread
    (docs/benchmarks.md "Featurize").
    """
    n = rows * cols
    stream = np.random.Generator(np.random.PCG64(_block_seed(*keys))).bytes((n + 7) // 8)
    signs = _SIGN_TABLE[np.frombuffer(stream, dtype=np.uint8)].reshape(-1)[:n]
    return torch.from_numpy(signs.reshape(rows, cols))


# -----------------------------------------------------------------------------
# Dense projector: exact per-example gradients (torch.func) times a blockwise Rademacher matrix


DENSE_PROJECTIONS = ("rademacher", "srht")


def dense_params(model: nn.Module, which: str = "all") -> dict[str, torch.Tensor]:
    """Parameters the dense projector differentiates: 'all', or 'linear' (nn.Linear weights and biases only)."""
    if which == "all":
        return {n: p.detach() for n, p in model.named_parameters()}
    if which != "linear":
        raise ValueError(f"dense parameter set must be 'all' or 'linear', got {which!r}")
    out = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            for pname, p in mod.named_parameters(recurse=False):
                out[f"{mname}.{pname}" if mname else pname] = p.detach()
    return out


def per_example_grads(
    model: nn.Module, params: dict, tokens: torch.Tensor, score: torch.Tensor, output: str = "margin"
) -> dict:
    """Per-example gradients of f (mean margin, or mean log p: output_and_q). tokens, score: (B, T). Returns
    {name: (B, *param.shape)}.

    Needs an attention path with a vmap batching rule (eager attention on CPU).
    """

    def f_one(p, tok, sc):
        logits = functional_call(model, p, (tok[None],))
        return output_and_q(logits, tok[None], sc[None], output=output)[0][0]

    return vmap(grad(f_one), in_dims=(None, 0, 0))(params, tokens, score)


DENSE_RNGS = ("pcg64", "device")


def device_signs(rows: int, cols: int, device, *keys: object) -> torch.Tensor:
    """(rows, cols) float32 ±1 from torch's generator on `device` seeded by `keys`: generated where it is used (a
    GPU makes p x k signs in milliseconds), but another stream than `rademacher`, and on CUDA possibly another one
    per GPU model, so a store made with it records the device (projection_rng) and is scored only on the same."""
    g = torch.Generator(device=device).manual_seed(_block_seed(*keys))
    return torch.randint(0, 2, (rows, cols), generator=g, device=device, dtype=torch.float32).mul_(2).sub_(1)


def projection_rng(dense_rng: str, device) -> str:
    """The name of the i.i.d. projection's random stream, recorded in a store's manifest: 'pcg64' (the CPU stream,
    device-independent) or 'torch-<device type>[:<GPU name>]'."""
    if dense_rng == "pcg64":
        return "pcg64"
    device = torch.device(device)
    name = f":{torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"torch-{device.type}{name}"


def dense_project(
    grads: dict, k: int, seed: int, proxy: int, block_elems: int = 1 << 24, rng: str = "pcg64"
) -> torch.Tensor:
    """g = P^T grad / sqrt(k) with P regenerated per (parameter, row block). grads {name: (B, ...)} -> (B, k) float32.

    Parameters are taken in sorted name order; each contributes its rows of P, in blocks of <= block_elems entries.
    rng: 'pcg64' (rademacher, on the CPU) or 'device' (device_signs, on the gradients' device).
    """
    out = None
    rows_per_block = max(1, block_elems // k)
    for name in sorted(grads):
        g = grads[name].flatten(1).float()  # (B, n)
        out = torch.zeros(g.shape[0], k, device=g.device) if out is None else out
        for b, start in enumerate(range(0, g.shape[1], rows_per_block)):
            stop = min(start + rows_per_block, g.shape[1])
            if rng == "pcg64":
                p_block = rademacher(stop - start, k, seed, proxy, name, b).to(g.device)  # (rows, k)
            else:
                p_block = device_signs(stop - start, k, g.device, seed, proxy, name, b)
            out += g[:, start:stop] @ p_block
    return out / math.sqrt(k)


# Subsampled randomized Hadamard transform (Ailon & Chazelle 2006): P = D H[:, S], with D a seeded diagonal of ±1 over
# the concatenated gradient (p entries, zero-padded to N = 2^m), H the N x N Sylvester-Hadamard matrix and S k distinct
# seeded columns. Every entry of P is ±1 and E[<P^T a, P^T b>] / k = <a, b>, as with the i.i.d. matrix, but P^T g costs
# one fast transform, O(N log N) per example, instead of regenerating p x k random numbers per batch: the i.i.d.
# matrix's p x k signs dominate the dense projector's time (docs/benchmarks.md "Featurize").


def fwht(x: torch.Tensor, radix_bits: int = 6) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform H_N x along the last dim (N = 2^m), Sylvester order. (..., N) -> same.

    H_N = H_{2^a} (x) H_{2^b} (x) ..., so the transform is a small dense Hadamard matmul along each group of <=
    radix_bits index bits: m / radix_bits matmuls instead of m butterfly passes over memory.
    """
    n = x.shape[-1]
    m = n.bit_length() - 1
    if n != 1 << m:
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    x = x.reshape(-1, n)
    lo = 0
    while lo < m:
        bits = min(radix_bits, m - lo)
        h = _hadamard(1 << bits, x.dtype, x.device)
        if lo == 0:  # lowest bits are contiguous: right-multiply rows
            x = (x.reshape(-1, 1 << bits) @ h).reshape(-1, n)
        else:  # bits [lo, lo + bits): left-multiply the (2^bits, 2^lo) blocks
            x = torch.matmul(h, x.reshape(-1, 1 << bits, 1 << lo)).reshape(-1, n)
        lo += bits
    return x.reshape(*lead, n)


def _hadamard(n: int, dtype, device) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def srht_plan(p: int, k: int, seed: int, proxy: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """D (p,) float32 ±1, S (k,) int64 sorted distinct columns of H_N, and N = 2^ceil(log2 p), all from the seed."""
    n = 1 << max(0, (p - 1).bit_length())
    if k > n:
        raise ValueError(f"srht projection: k = {k} exceeds the padded gradient length {n}; use a smaller proj_dim")
    signs = rademacher(1, p, seed, proxy, "srht", "signs")[0]
    rng = np.random.Generator(np.random.PCG64(_block_seed(seed, proxy, "srht", "columns")))
    cols = torch.from_numpy(np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64))
    return signs, cols, n


def srht_project(grads: dict, k: int, seed: int, proxy: int, chunk: int = 8, plan=None) -> torch.Tensor:
    """g = (H D grad)[S] / sqrt(k) over the concatenated gradient (sorted names). grads {name: (B, ...)} -> (B, k).

    `chunk` examples are transformed at a time: the padded buffer is chunk x N float32 (twice, out of place).
    plan: srht_plan's (signs, cols, N) already on the gradients' device (DenseSketch builds it once per proxy).
    """
    names = sorted(grads)
    sizes = [grads[name][0].numel() for name in names]
    first = grads[names[0]]
    signs, cols, n = srht_plan(sum(sizes), k, seed, proxy) if plan is None else plan
    signs, cols = signs.to(first.device), cols.to(first.device)
    out = []
    for start in range(0, first.shape[0], chunk):
        x = torch.zeros(first[start : start + chunk].shape[0], n, device=first.device)
        offset = 0
        for name, size in zip(names, sizes):
            x[:, offset : offset + size] = grads[name][start : start + chunk].flatten(1)
            offset += size
        x[:, :offset] *= signs
        out.append(fwht(x)[:, cols])
    return torch.cat(out) / math.sqrt(k)


def srht_matrix(p: int, k: int, seed: int, proxy: int) -> torch.Tensor:
    """The (p, k) matrix srht_project uses, unscaled, from the definition H[i, j] = (-1)^popcount(i & j). Tests only."""
    signs, cols, _ = srht_plan(p, k, seed, proxy)
    parity = np.bitwise_count(np.bitwise_and.outer(np.arange(p), cols.numpy())) & 1
    return torch.from_numpy(1.0 - 2.0 * parity).float() * signs[:, None]


def dense_matrix(shapes: dict[str, tuple], k: int, seed: int, proxy: int, block_elems: int = 1 << 24) -> torch.Tensor:
    """The full (p, k) matrix dense_project uses (sorted names, unscaled ±1). For tests on small models only."""
    rows_per_block = max(1, block_elems // k)
    blocks = []
    for name in sorted(shapes):
        n = math.prod(shapes[name])
        for b, start in enumerate(range(0, n, rows_per_block)):
            blocks.append(rademacher(min(start + rows_per_block, n) - start, k, seed, proxy, name, b))
    return torch.cat(blocks)


# -----------------------------------------------------------------------------
# Precision of the proxy's forward/backward (the projections and the output function stay float32)

PRECISIONS = ("float32", "tf32", "bf16")


@contextlib.contextmanager
def compute_precision(precision: str, device):
    """float32: as is. tf32: float32 matmuls/convolutions may use TF32 on CUDA (no effect on CPU). bf16: autocast
    to bfloat16 on `device` (CPU too, where it serves to measure the error)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    if precision == "float32":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# -----------------------------------------------------------------------------
# Factorized projector: per-Linear Kronecker sketch from forward activations and backward output gradients


def split_dims(linears: list[tuple[str, nn.Linear]], k: int) -> list[tuple[int, int]]:
    """(k_o, k_i) per Linear. Each of the L layers gets share = k // L dims; a side whose full size fits is kept exact
    (identity, no projection); otherwise k_i = largest power of 2 <= sqrt(share) and k_o = share // k_i, each capped at
    its layer size. Feature dim = sum k_o * k_i <= k."""
    share = k // len(linears)
    if share < 1:
        raise ValueError(f"proj_dim={k} is smaller than the {len(linears)} Linear layers to cover")
    dims = []
    for _, lin in linears:
        d_in, d_out = lin.in_features + (lin.bias is not None), lin.out_features
        k_i = min(d_in, 2 ** int(math.log2(math.sqrt(share))))
        k_o = min(d_out, share // k_i)
        if k_o == d_out:  # output side exact: give the rest of the share to the input side
            k_i = min(d_in, share // d_out) or 1
        dims.append((k_o, k_i))
    return dims


# Adam's eps (1e-8) squared: the smallest second moment that still changes Adam's step, as a floor per entry of v.
V_FLOOR = 1e-16


def adafactor_sides(v_weight: torch.Tensor, v_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (d_out,), in (d_in [+1],)) scalings whose outer product is V^-1/4 for the rank-1 fit V ~ r c^T / S of one
    Linear's second moments (v_weight (d_out, d_in), v_bias (d_out,) as the constant-1 input's column)."""
    v = v_weight.double()
    if v_bias is not None:
        v = torch.cat([v, v_bias.double()[:, None]], 1)
    r = v.sum(1).clamp_min(V_FLOOR * v.shape[1])
    c = v.sum(0).clamp_min(V_FLOOR * v.shape[0])
    root_s = v.sum().clamp_min(V_FLOOR * v.numel()).sqrt()
    return (r / root_s).pow(-0.25).float(), (c / root_s).pow(-0.25).float()


def moments_by_param(model: nn.Module, second_moments: dict) -> dict[int, torch.Tensor]:
    """{id(parameter): v} for every parameter of `model` named in `second_moments` (dsdm.train.second_moments), so a
    tied weight finds its one v under any of its names. A parameter of the model without a v is an error."""
    out = {}
    for name, param in model.named_parameters():
        if name not in second_moments:
            raise ValueError(f"the optimizer state has no second moment for parameter {name!r}")
        if tuple(second_moments[name].shape) != tuple(param.shape):
            raise ValueError(
                f"second moment of {name!r} has shape {tuple(second_moments[name].shape)}, not "
                f"{tuple(param.shape)}: it belongs to another model"
            )
        out[id(param)] = second_moments[name]
    return out


def _side(d: int, kk: int, *keys: object) -> torch.Tensor:
    """(d, kk) projection of one side: identity when kk == d (exact), else Rademacher / sqrt(kk)."""
    return torch.eye(d) if kk == d else rademacher(d, kk, *keys) / math.sqrt(kk)


class FactorizedSketch:
    """Kronecker sketch of the per-example gradient of every nn.Linear of `model` (see the module docstring).

    sketch(tokens, score) -> (features (B, dim) float32, Q (B,) float32). Projection matrices are built once from
    (seed, proxy, layer name) and kept (they are small: k_o x d_out + k_i x d_in per layer). second_moments: Adam's v
    per parameter name (module docstring, "Adam preconditioning"), folded into the side matrices.
    """

    def __init__(
        self,
        model: nn.Module,
        k: int,
        seed: int,
        proxy: int,
        device: torch.device | str = "cpu",
        precision="float32",
        second_moments: dict | None = None,
    ):
        self.model, self.device, self.precision = model, torch.device(device), precision
        self.output = "margin"  # the output function differentiated (output_and_q); scoring sets it per side
        self.linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not self.linears:
            raise ValueError("the factorized projector needs a model with nn.Linear layers; use --projector dense")
        self.embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if not self.embeddings:
            raise ValueError("the factorized projector starts the backward at nn.Embedding outputs; none found")
        self.dims = split_dims(self.linears, k)
        self.dim = sum(ko * ki for ko, ki in self.dims)
        moments = None if second_moments is None else moments_by_param(model, second_moments)
        self.proj = []  # per layer: P_out^T (d_out, k_o), P_in^T (d_in [+1 for bias], k_i), JL-scaled
        for (name, lin), (ko, ki) in zip(self.linears, self.dims):
            d_in = lin.in_features + (lin.bias is not None)
            p_out = _side(lin.out_features, ko, seed, proxy, name, "out")
            p_in = _side(d_in, ki, seed, proxy, name, "in")
            if moments is not None:
                v_bias = None if lin.bias is None else moments[id(lin.bias)]
                out_scale, in_scale = adafactor_sides(moments[id(lin.weight)], v_bias)
                p_out, p_in = out_scale[:, None] * p_out, in_scale[:, None] * p_in
            self.proj.append((p_out.to(device), p_in.to(device)))

    def sketch(self, tokens: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts, outs, q = self._projected(tokens, score)
        feats = [torch.einsum("bto,bti->boi", o, a).flatten(1) for o, a in zip(outs, acts)]  # (B, k_o*k_i) each
        return torch.cat(feats, 1), q

    def factor_sums(self, tokens: torch.Tensor, score: torch.Tensor) -> tuple[dict, int]:
        """K-FAC's factors in the projected space, summed over the positions that can carry gradient (each row's
        positions before its last scored token): {layer name: (S (k_o, k_o), A (k_i, k_i)) float64}, S = sum_t o_t
        o_t^T with o_t = P_out delta_t, A = sum_t a_t a_t^T with a_t = P_in x_t (the bias's constant 1 included), and
        the number of positions (docs/estimator.md round 12)."""
        acts, outs, _ = self._projected(tokens, score)
        idx = torch.arange(score.shape[1], device=score.device)
        last = torch.where(score, idx, torch.full_like(idx, -1)).amax(1)  # (B,) last scored token, -1 if none
        valid = idx[None, :] < last[:, None]  # position p predicts token p + 1
        sums = {}
        for (name, _), a, o in zip(self.linears, acts, outs):
            a, o = a[valid].detach().double(), o[valid].detach().double()  # (n, k_i), (n, k_o)
            sums[name] = (o.T @ o, a.T @ a)
        return sums, int(valid.sum())

    def _projected(self, tokens: torch.Tensor, score: torch.Tensor):
        """One forward and one backward of sum_b f_b: per Linear the projected inputs (B, T, k_i) and output
        gradients (B, T, k_o), and Q (B,)."""
        acts: list[torch.Tensor | None] = [None] * len(self.linears)
        outs: list[torch.Tensor | None] = [None] * len(self.linears)
        handles = []

        def fwd_hook(i, mod, inp, out):
            x = inp[0].float()  # (B, T, d_in)
            if mod.bias is not None:
                x = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], -1)
            with torch.autocast(self.device.type, enabled=False):  # the projection stays float32 under bf16
                acts[i] = x @ self.proj[i][1]  # (B, T, k_i)

            def bwd(gy, i=i):
                outs[i] = gy.float() @ self.proj[i][0]  # (B, T, k_o)

            out.register_hook(bwd)

        def emb_hook(mod, inp, out):
            return out.detach().requires_grad_(True)  # gradient starts here; parameters stay frozen

        for i, (_, lin) in enumerate(self.linears):
            handles.append(lin.register_forward_hook(partial(fwd_hook, i)))
        for emb in self.embeddings:
            handles.append(emb.register_forward_hook(emb_hook))
        try:
            with torch.enable_grad():
                with compute_precision(self.precision, self.device):
                    logits = self.model(tokens)
                f, q = output_and_q(logits, tokens, score, fast_backward=True, output=self.output)
                f.sum().backward()
        finally:
            for h in handles:
                h.remove()
        return acts, outs, q


class DenseSketch:
    """Exact per-example gradients of `params` ('all' or 'linear') times a seeded ±1 matrix P (p, k).

    projection 'rademacher' (exact TRAK): i.i.d. P, regenerated for every batch; the whole batch is projected at once
    while gradients are computed in vmap chunks of `chunk` examples, because generating P costs p x k random signs per
    call whatever the batch, so a large batch (featurize.batch_size) amortizes it. projection 'srht': P = D H[:, S]
    (srht_project), applied by a fast transform, O(p log p) per example.
    """

    def __init__(
        self,
        model: nn.Module,
        k: int,
        seed: int,
        proxy: int,
        params: str = "all",
        chunk: int = 8,
        projection: str = "rademacher",
        rng: str = "pcg64",
        precision: str = "float32",
        second_moments: dict | None = None,
    ):
        if projection not in DENSE_PROJECTIONS:
            raise ValueError(f"dense projection must be one of {DENSE_PROJECTIONS}, got {projection!r}")
        if rng not in DENSE_RNGS:
            raise ValueError(f"dense rng must be one of {DENSE_RNGS}, got {rng!r}")
        self.model, self.k, self.seed, self.proxy, self.chunk = model, k, seed, proxy, chunk
        self.output = "margin"  # the output function differentiated (output_and_q); scoring sets it per side
        self.params = dense_params(model, params)
        self.scales = None  # Adam preconditioning: V^-1/4 per parameter entry, exact (module docstring)
        if second_moments is not None:
            moments = moments_by_param(model, second_moments)
            originals = dict(model.named_parameters(remove_duplicate=False))  # self.params holds detached copies
            self.scales = {
                n: moments[id(originals[n])].to(p.device).double().clamp_min(V_FLOOR).pow(-0.25).float()
                for n, p in self.params.items()
            }
        self.projection, self.rng, self.precision = projection, rng, precision
        self.dim = k
        self.plan = None
        if projection == "srht":  # D and S once per proxy, on the model's device (not per batch)
            device = next(iter(self.params.values())).device
            signs, cols, n = srht_plan(sum(p.numel() for p in self.params.values()), k, seed, proxy)
            self.plan = signs.to(device), cols.to(device), n

    def sketch(self, tokens: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.params}
        for start in range(0, tokens.shape[0], self.chunk):
            with compute_precision(self.precision, tokens.device):
                grads = per_example_grads(
                    self.model,
                    self.params,
                    tokens[start : start + self.chunk],
                    score[start : start + self.chunk],
                    self.output,
                )
            for n, g in grads.items():
                parts[n].append(g)
        with torch.no_grad():
            q = output_and_q(self.model(tokens), tokens, score)[1]
        grads = {n: torch.cat(v).float() for n, v in parts.items()}
        if self.scales is not None:
            grads = {n: g * self.scales[n] for n, g in grads.items()}
        if self.projection == "srht":
            return srht_project(grads, self.k, self.seed, self.proxy, self.chunk, self.plan), q
        return dense_project(grads, self.k, self.seed, self.proxy, rng=self.rng), q


def make_sketch(
    model: nn.Module,
    projector: str,
    k: int,
    seed: int,
    proxy: int,
    device="cpu",
    dense_params="all",
    dense_projection="rademacher",
    dense_rng="pcg64",
    precision="float32",
    second_moments: dict | None = None,
):
    """'factorized' -> FactorizedSketch, 'dense' -> DenseSketch. The model's parameters are frozen in place.
    second_moments: Adam's v per parameter name (dsdm.train.second_moments) to precondition with, or None."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # no dropout: features are a deterministic function of (weights, tokens)
    if projector == "factorized":
        return FactorizedSketch(model, k, seed, proxy, device, precision, second_moments)
    if projector == "dense":
        from dsdm.model import set_attn_impl

        set_attn_impl(model, "eager")  # vmap has no batching rule for SDPA's backward on CPU
        return DenseSketch(
            model,
            k,
            seed,
            proxy,
            dense_params,
            projection=dense_projection,
            rng=dense_rng,
            precision=precision,
            second_moments=second_moments,
        )
    raise ValueError(f"projector must be 'factorized' or 'dense', got {projector!r}")


def feature_layout(sketch) -> list[tuple[str, int, int]]:
    """Column blocks of a sketch's features: [(name, start, stop)]. Factorized: one block per nn.Linear, in the order
    the features are concatenated (named_modules order, k_o * k_i columns each); dense: one block ("all", 0, k), since
    its projection mixes every parameter into every column. Scoring uses it for per-layer kernels and dropped layers."""
    if isinstance(sketch, FactorizedSketch):
        blocks, start = [], 0
        for (name, _), (ko, ki) in zip(sketch.linears, sketch.dims):
            blocks.append((name, start, start + ko * ki))
            start += ko * ki
        return blocks
    return [("all", 0, sketch.dim)]


def featurize_batches(sketch, batches, device) -> tuple[np.ndarray, np.ndarray]:
    """Run `sketch` over (tokens, score) numpy batches -> features (n, dim) float32, Q (n,) float32."""
    feats, qs = [], []
    for tokens, score in batches:
        g, q = sketch.sketch(torch.as_tensor(tokens, device=device), torch.as_tensor(score, device=device))
        feats.append(g.detach().float().cpu().numpy())
        qs.append(q.detach().float().cpu().numpy())
    return np.concatenate(feats), np.concatenate(qs)

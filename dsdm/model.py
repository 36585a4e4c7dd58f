"""A small GPT (nanoGPT spirit) for proxies and evaluation models, and loading of any local Hugging Face causal LM.

Shapes: B batch, T sequence length, C = d_model, H heads, V vocabulary. `model(tokens (B, T) int64) -> logits
(B, T, V) float`: every model this module returns has that one forward contract, whatever it wraps, so the trainer,
evaluator and featurizer never care where a model came from.

Architecture = GPT-2 (pre-LN blocks, learned positions, GELU-tanh MLP, biases, LM head tied to the token embedding),
and the parameter names are GPT-2's (`transformer.h.0.attn.c_attn`, ...). Only the weight layout differs: GPT-2's
Conv1D stores (in, out), we use nn.Linear (out, in), because the factorized featurizer (dsdm.featurize) hooks
nn.Linear layers. `save_model` transposes, so a saved model is a plain GPT-2 checkpoint (`config.json` +
`model.safetensors`) that `transformers.AutoModelForCausalLM.from_pretrained(dir)` loads, and `load_model` reads any
GPT-2 checkpoint (ours or a downloaded one) back into this class. Given the pool's tokenizer, `save_model` also writes
it beside the weights (`tokenizer.json` + `tokenizer_config.json`, for `AutoTokenizer`) and puts its EOS id in
config.json as bos/eos/pad id (GPT-2's defaults, 50256, would name a token outside a small vocabulary).

Untrusted files: weights are read from safetensors, or from a torch pickle with `weights_only=True` only
(`load_weights`); a pickle holding anything but tensors and plain containers is refused with a one-line error.

Attention runs through torch SDPA (flash / memory-efficient kernels on GPU). `attn_impl="eager"` is the explicit
softmax(QK^T)V path: torch.func.vmap has no batching rule for SDPA's backward on CPU, so the dense (exact per-example
gradient) featurizer switches to it.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# name -> (n_layer, n_head, d_model). Parameter counts at V = 4096, T = 128 are in the comments (weights tied);
# `dsdm models presets` prints them for any vocabulary.
PRESETS: dict[str, tuple[int, int, int]] = {
    "micro": (1, 2, 32),  # ~0.15M: unit tests and smoke runs
    "nano": (2, 2, 64),  # ~0.37M: the CPU demo's proxies and evaluation models
    "tiny": (4, 4, 128),  # ~1.3M
    "mini": (4, 4, 192),  # ~2.6M: "a ~2M-parameter model" of the models issue
    "small": (6, 6, 384),  # ~12M
    "medium": (8, 8, 512),  # ~27M
    "gpt2-125m": (12, 12, 768),  # GPT-2 small shape (124M at V = 50257, T = 1024)
}


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    """V: token ids are < vocab_size (the pool's tokenizer vocabulary)."""
    seq_len: int = 128
    """Maximum sequence length (GPT-2's n_positions)."""
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    """C; must be divisible by n_head."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches (0 in every shipped preset: the runs are short)."""
    attn_impl: str = "sdpa"
    """sdpa | eager. Same numbers up to float rounding; eager is for torch.func transforms (dense featurizer)."""

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"attn_impl must be sdpa or eager, got {self.attn_impl!r}")


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # x -> q, k, v
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H = self.cfg.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, C/H)
        p = self.cfg.dropout if self.training else 0.0
        if self.cfg.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)  # (B, H, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            att = F.dropout(att.masked_fill(causal, float("-inf")).softmax(-1), p, self.training)
            y = att @ v
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.c_proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2-shaped decoder. forward(tokens (B, T) int64) -> logits (B, T, V) float32 (or the autocast dtype)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(cfg.vocab_size, cfg.d_model),
                "wpe": nn.Embedding(cfg.seq_len, cfg.d_model),
                "drop": nn.Dropout(cfg.dropout),
                "h": nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                "ln_f": nn.LayerNorm(cfg.d_model),
            }
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(tokens))  # (B, T, V)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm's output (B, T, C), before the LM head (dsdm.train's chunked loss applies the head)."""
        B, T = tokens.shape
        if T > self.config.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's seq_len={self.config.seq_len}")
        pos = torch.arange(T, device=tokens.device)
        x = self.transformer.drop(self.transformer.wte(tokens) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)


def init_weights(model: GPT, seed: int) -> GPT:
    """GPT-2 initialization from a private generator: N(0, 0.02), residual output projections N(0, 0.02/sqrt(2L)),
    zero biases, unit LayerNorms. Parameters are visited in named_parameters() order, so the result depends only
    on (config, seed) — not on the global RNG or on what ran before."""
    g = torch.Generator().manual_seed(int(seed))
    resid_std = 0.02 / math.sqrt(2 * model.config.n_layer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                p.fill_(1.0)
            else:
                std = resid_std if name.endswith("c_proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def build_model(preset: str, vocab_size: int, seq_len: int, seed: int = 0, **overrides) -> GPT:
    """A freshly initialized GPT of a named preset (see PRESETS); overrides set other GPTConfig fields."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    n_layer, n_head, d_model = PRESETS[preset]
    shape = {"n_layer": n_layer, "n_head": n_head, "d_model": d_model, **overrides}
    return init_weights(GPT(GPTConfig(vocab_size=vocab_size, seq_len=seq_len, **shape)), seed)


def flops_per_token(n_layer: int, d: int, vocab: int, seq_len: int) -> tuple[float, float]:
    """Training FLOPs per token, forward + backward (Kaplan et al. 2020's 6N + attention): (body, LM head)."""
    return 6.0 * (12 * n_layer * d * d + n_layer * seq_len * d), 6.0 * vocab * d


def preset_flops_per_token(preset: str, vocab: int, seq_len: int, d_model: int = 0) -> float:
    """Training FLOPs per token of a preset, or of the preset at width d_model (0 = its own)."""
    n_layer, _, d0 = PRESETS[preset]
    return sum(flops_per_token(n_layer, d_model or d0, vocab, seq_len))


def width_for_flops(preset: str, vocab: int, seq_len: int, factor: float) -> int:
    """The d_model (a multiple of the preset's n_head) whose training FLOPs per token are closest, in ratio, to
    `factor` x the preset's: how the compute curve grows its model (docs/experiments.md "The compute curve").
    Depth and heads stay the preset's; factor 1 gives the preset's own width."""
    n_head = PRESETS[preset][1]
    if factor <= 0:
        raise ValueError(f"FLOPs factor must be positive, got {factor}")

    def per_token(d: int) -> float:
        return preset_flops_per_token(preset, vocab, seq_len, d)

    target = factor * per_token(0)
    # per_token grows with d: walk up from the smallest width to the first at or above the target, then take the
    # nearer (in log ratio) of it and the one below
    d = n_head
    while per_token(d) < target:
        d += n_head
    below = max(n_head, d - n_head)
    return min((below, d), key=lambda w: abs(math.log(per_token(w) / target)))


def num_params(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def set_attn_impl(model: nn.Module, impl: str) -> bool:
    """Switch a dsdm GPT to 'sdpa' or 'eager' attention in place. False (and no change) for other models."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, GPTConfig):
        cfg.attn_impl = impl
        cfg.__post_init__()
        return True
    return False


class HFCausalLM(nn.Module):
    """Wraps a transformers causal LM so that forward(tokens) returns logits like GPT (no attention mask needed:
    right padding never influences earlier positions of a causal model)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=tokens, use_cache=False).logits


# -----------------------------------------------------------------------------
# IO: GPT-2 checkpoints (config.json + model.safetensors) and any local Hugging Face causal LM

_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # Conv1D layout


def hf_gpt2_config(cfg: GPTConfig, eos_id: int | None = None) -> dict:
    """The transformers GPT2Config (as JSON) describing `cfg`; dsdm's own fields ride along under `dsdm`. `eos_id`
    (the pool tokenizer's end-of-document id) is also the bos and pad id, as in GPT-2; None when unknown, so nobody
    inherits GPT2Config's default 50256."""
    return {
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.seq_len,
        "n_ctx": cfg.seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": "float32",
        "dsdm": asdict(cfg),
    }


def save_model(
    model: GPT,
    out_dir: str | Path,
    extra: dict | None = None,
    *,
    eos_id: int | None = None,
    tokenizer_json: str | Path | None = None,
) -> Path:
    """Write `model` as a GPT-2 checkpoint: out_dir/config.json + model.safetensors (atomically, weights first).

    With the pool's `tokenizer_json` and `eos_id`, the tokenizer is saved beside it (save_tokenizer_files) and
    config.json names eos_id as bos/eos/pad id."""
    from safetensors.torch import save_file

    from dsdm.io import atomic_path, write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight; transformers re-ties it on load
        t = t.detach().to("cpu", torch.float32)
        state[name] = (t.t() if name.endswith(_TRANSPOSED) else t).contiguous()
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    if tokenizer_json is not None:
        if eos_id is None:
            raise ValueError("save_model: a tokenizer needs its eos_id (the pool's, pool.eos_id)")
        save_tokenizer_files(tokenizer_json, eos_id, model.config.seq_len, out_dir)
    write_json(out_dir / "config.json", {**hf_gpt2_config(model.config, eos_id), **(extra or {})})
    return out_dir


def save_tokenizer_files(tokenizer_json: str | Path, eos_id: int, seq_len: int, out_dir: Path) -> None:
    """tokenizer.json (copied) + tokenizer_config.json: what `AutoTokenizer.from_pretrained(out_dir)` needs to build
    a PreTrainedTokenizerFast with the pool's EOS as eos, bos and pad token."""
    from dsdm.io import atomic_path, write_json

    vocab = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    eos = next((t["content"] for t in vocab.get("added_tokens", []) if t["id"] == eos_id), None)
    if eos is None:
        eos = next((tok for tok, i in vocab.get("model", {}).get("vocab", {}).items() if i == eos_id), None)
    if eos is None:
        raise ValueError(f"{tokenizer_json}: no token has the pool's eos id {eos_id}; is it the pool's tokenizer?")
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        shutil.copyfile(tokenizer_json, tmp)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos,
        "eos_token": eos,
        "pad_token": eos,
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False,
    }
    write_json(out_dir / "tokenizer_config.json", config)


def load_weights(path: Path, map_location="cpu") -> dict:
    """torch.load(path, weights_only=True): tensors and plain containers only. A pickle that would build any other
    object (and so could run code) is refused with a one-line ValueError naming the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: refused, the pickle holds more than tensors ({first}); load only files you trust, "
            "as safetensors (model.safetensors) or a plain state dict"
        ) from None


def _gpt_config_from_hf(hf: dict) -> GPTConfig | None:
    """A GPTConfig if `hf` (config.json) is a GPT-2 this class reproduces exactly, else None."""
    if hf.get("model_type") != "gpt2":
        return None
    if hf.get("activation_function", "gelu_new") != "gelu_new" or hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        return None
    if (
        not hf.get("scale_attn_weights", True)
        or hf.get("scale_attn_by_inverse_layer_idx")
        or hf.get("reorder_and_upcast_attn")
    ):
        return None
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12 or not hf.get("tie_word_embeddings", True):
        return None
    own = hf.get("dsdm", {})
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        seq_len=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        d_model=hf["n_embd"],
        dropout=own.get("dropout", 0.0),
        attn_impl=own.get("attn_impl", "sdpa"),
    )


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a model directory offline, on CPU, in eval mode. forward(tokens) -> logits either way:

    - a GPT-2 checkpoint (written by save_model, or any GPT-2 in transformers format with safetensors or
      pytorch_model.bin weights) -> our GPT, with nn.Linear layers the factorized featurizer can hook;
    - any other local transformers causal LM directory -> HFCausalLM(AutoModelForCausalLM.from_pretrained(path)).
    """
    from dsdm.io import read_json

    path = Path(path)
    if not (path / "config.json").exists():
        hint = " (models are loaded from local directories only; hub names cannot be downloaded here)"
        if not path.exists():
            raise FileNotFoundError(f"model directory {path} does not exist{hint}")
        raise FileNotFoundError(f"{path}/config.json not found: not a model directory{hint}")
    cfg = _gpt_config_from_hf(read_json(path / "config.json"))
    weights = path / "model.safetensors"
    if cfg is not None and (weights.exists() or (path / "pytorch_model.bin").exists()):
        if weights.exists():
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = load_weights(path / "pytorch_model.bin")
        model = GPT(cfg)
        own = {}
        for name, t in state.items():
            name = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # GPT-2's stored causal-mask buffers
            own[name] = t.t() if name.endswith(_TRANSPOSED) else t
        own.setdefault("lm_head.weight", own.get("transformer.wte.weight"))
        missing, unexpected = model.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: weights do not match a GPT-2 of this shape (missing {missing}, unexpected {unexpected})"
            )
        model.lm_head.weight = model.transformer.wte.weight
        return model.to(dtype).eval()
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ValueError(f"{path} is not a GPT-2 checkpoint; loading other models needs `pip install dsdm[hf]`") from e
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: transformers could not load it as a causal LM offline: {first}") from e
    return HFCausalLM(hf).eval()

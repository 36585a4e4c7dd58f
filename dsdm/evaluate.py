"""Evaluate a language model on tasks: continuation log-probability, greedy accuracy, multiple choice
(docs/method.md §6).

Per example (context c, continuation y = y_1..y_m), with the context and continuation tokenized separately
(dsdm.tasks.encode_example, the lm-eval convention):
- loss = -(1/m) Σ_j log p(y_j | c, y_<j): the mean per-token NLL of the continuation, the paper's log-probability
  metric. A task's `loss` is the mean over examples (each example weighs the same, whatever its length), with a
  percentile-bootstrap confidence interval over examples.
- correct = every y_j is the argmax of the model's next-token distribution given c, y_<j. With teacher forcing this
  is exactly "greedy decoding from c reproduces y", so no generation loop is needed. `accuracy` = mean; reported for
  every task, meaningful for short continuations (answers, last words).
- multiple choice (examples with `choices` + `answer`): each choice is scored as a continuation of the context and
  the one with the lowest mean NLL is the prediction; `mc_accuracy` = fraction predicted right.
Only continuation tokens are ever scored: context tokens, padding and the first position never enter the sums.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def continuation_scores(
    model, tokens: np.ndarray, score: np.ndarray, device="cpu", batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher-forced scoring. tokens, score: (n, T) int64 / bool, score[t] = "predict token t and count it".

    Returns nll_sum (n,) float64 (summed NLL of the scored tokens), n_scored (n,) int64, greedy_ok (n,) bool.
    Rows are processed in order of length so that little padding is computed; results come back in input order.
    """
    model.eval()
    n = tokens.shape[0]
    lengths = score.shape[1] - np.argmax(score[:, ::-1], axis=1)  # last scored position + 1
    order = np.argsort(-lengths, kind="stable")
    nll, cnt, ok = np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        width = int(lengths[rows].max())
        t = torch.as_tensor(tokens[rows, :width], device=device)
        s = torch.as_tensor(score[rows, 1:width], device=device)
        row, pos = s.nonzero(as_tuple=True)  # scored (row, position) pairs; position i predicts token i+1
        # normalize only the scored positions: a full (b, T, V) log_softmax costs more than the model itself
        logits = model(t)[row, pos].float()  # (m, V)
        target = t[:, 1:][row, pos]
        logp = logits.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1).double()
        miss = (logits.argmax(-1) != target).double()
        b = len(rows)
        nll[rows] = torch.zeros(b, dtype=torch.float64, device=device).index_add_(0, row, -logp).cpu().numpy()
        cnt[rows] = s.sum(1).cpu().numpy()
        ok[rows] = (torch.zeros(b, dtype=torch.float64, device=device).index_add_(0, row, miss) == 0).cpu().numpy()
    return nll, cnt, ok


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (n,) over resampled examples."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return (float(values.mean()), float(values.mean())) if values.size else (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def model_max_len(model) -> int:
    """Longest input the model accepts: our GPT's seq_len, a HF config's n_positions / max_position_embeddings."""
    cfg = getattr(model, "config", None)
    for name in ("seq_len", "n_positions", "max_position_embeddings"):
        if isinstance(getattr(cfg, name, None), int):
            return int(getattr(cfg, name))
    return 2048


def default_bos_id(tokenizer) -> int:
    """The id put in front of an empty context: the tokenizer's end-of-text token, else 0."""
    for tok in ("<|endoftext|>", "</s>", "<eos>", "<s>"):
        i = tokenizer.token_to_id(tok)
        if i is not None:
            return int(i)
    return 0


def evaluate_examples(model, tokenizer, examples, device="cpu", batch_size: int = 32, bos_id: int | None = None):
    """Per-example results for a list of TaskExample. Returns a dict of (n,) arrays: loss (mean NLL per continuation
    token), correct (greedy exact match), and, where examples have choices, mc_correct (bool; False elsewhere) and
    has_choices."""
    from dsdm.tasks import encode_examples

    bos_id = default_bos_id(tokenizer) if bos_id is None else bos_id
    max_len = model_max_len(model)
    tokens, _, score = encode_examples(tokenizer, examples, max_len, bos_id)
    nll, cnt, ok = continuation_scores(model, tokens, score, device, batch_size)
    out = {"loss": nll / cnt, "correct": ok}
    has = np.array([ex.choices is not None for ex in examples])
    mc = np.zeros(len(examples), dtype=bool)
    if has.any():
        pairs, owner = [], []
        for i, ex in enumerate(examples):
            for c in ex.choices or ():
                pairs.append((ex, c))
                owner.append(i)
        t, _, s = encode_examples(tokenizer, [ex for ex, _ in pairs], max_len, bos_id, [c for _, c in pairs])
        c_nll, c_cnt, _ = continuation_scores(model, t, s, device, batch_size)
        c_loss, owner = c_nll / c_cnt, np.asarray(owner)
        for i in np.flatnonzero(has):
            mc[i] = int(np.argmin(c_loss[owner == i])) == examples[i].answer  # first of tied minima
    out.update(mc_correct=mc, has_choices=has)
    return out


def evaluate_task(
    model,
    tokenizer,
    task,
    split: str = "holdout",
    max_examples: int | None = None,
    batch_size: int = 32,
    device=None,
    seed: int = 0,
    bos_id: int | None = None,
    n_boot: int = 1000,
) -> dict:
    """Metrics of `model` on one split of a dsdm.tasks.Task.

    Returns {task, split, n, loss, loss_ci [lo, hi], accuracy, accuracy_ci, mc_accuracy (None without choices),
    n_choices_examples, per_example {loss, correct}}. max_examples takes a seeded subsample (same for every model).
    """
    examples = task.split(split)
    if max_examples and len(examples) > max_examples:
        keep = np.sort(np.random.default_rng((seed, 7)).choice(len(examples), max_examples, replace=False))
        examples = [examples[i] for i in keep]
    if not examples:
        raise ValueError(f"task {task.name}: split {split!r} has no examples")
    device = device or next(model.parameters()).device
    r = evaluate_examples(model, tokenizer, examples, device, batch_size, bos_id)
    mc = r["mc_correct"][r["has_choices"]]
    return {
        "task": task.name,
        "split": split,
        "n": len(examples),
        "loss": float(r["loss"].mean()),
        "loss_ci": bootstrap_ci(r["loss"], n_boot, seed=seed),
        "accuracy": float(r["correct"].mean()),
        "accuracy_ci": bootstrap_ci(r["correct"].astype(float), n_boot, seed=seed),
        "mc_accuracy": float(mc.mean()) if mc.size else None,
        "n_choices_examples": int(mc.size),
        "per_example": {"id": [ex.id for ex in examples], "loss": r["loss"].tolist(), "correct": r["correct"].tolist()},
    }


# -----------------------------------------------------------------------------
# IO: `dsdm evaluate`


def run(
    model_dir: str | Path,
    task_specs: list[str],
    out: str | Path,
    tokenizer_path: str | Path | None = None,
    split: str = "holdout",
    max_examples: int = 0,
    batch_size: int = 32,
    device: str = "auto",
) -> dict:
    """Evaluate a model directory on tasks and write one JSON {model, split, tasks: {name: metrics}} atomically.

    The tokenizer is `tokenizer_path` (a tokenizer.json or a pool directory), else model_dir/tokenizer.json."""
    from tokenizers import Tokenizer

    from dsdm.common import log, resolve_device
    from dsdm.io import write_json
    from dsdm.model import load_model
    from dsdm.tasks import load_task

    model_dir = Path(model_dir)
    tok = Path(tokenizer_path) if tokenizer_path else model_dir
    if tok.is_dir():
        tok = tok / "tokenizer.json"
    if not tok.exists():
        raise FileNotFoundError(f"{tok} not found: pass --tokenizer POOL_DIR (or a tokenizer.json) to evaluate with")
    tokenizer = Tokenizer.from_file(str(tok))
    dev, why = resolve_device(device)
    log(f"device {why}")
    model = load_model(model_dir).to(dev)
    results = {}
    for spec in task_specs:
        task = load_task(spec)
        r = evaluate_task(model, tokenizer, task, split, max_examples or None, batch_size, dev)
        results[task.name] = r
        mc = "" if r["mc_accuracy"] is None else f"  mc_accuracy {r['mc_accuracy']:.3f}"
        log(
            f"{task.name} ({split}, n={r['n']}): loss {r['loss']:.4f} [{r['loss_ci'][0]:.4f}, {r['loss_ci'][1]:.4f}]"
            f"  accuracy {r['accuracy']:.3f}{mc}"
        )
    record = {"model": str(model_dir.resolve()), "tokenizer": str(tok.resolve()), "split": split, "tasks": results}
    write_json(out, record)
    return record

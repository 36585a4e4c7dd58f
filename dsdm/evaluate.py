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
- multiple choice: every task has a multiple-choice form (dsdm.tasks.mc_examples: the task's own choices, else
  the answer against distractors drawn from the task, seeded). Each choice is scored as a continuation of the
  context, as lm-evaluation-harness does: `mc_accuracy` (the reported one) takes the choice with the largest summed
  log-probability (lm-eval's `acc`); `mc_accuracy_norm` divides each choice's log-probability by its length in
  characters first (lm-eval's `acc_norm`). `chance` = mean over examples of 1 / number of choices. Both with a
  percentile-bootstrap CI over examples; ties go to the first choice, as numpy's argmax does in lm-eval.
Only continuation tokens are ever scored: context tokens, padding and the first position never enter the sums.

Known difference from lm-eval's HF backend: lm-eval feeds max_len tokens and scores up to max_len + 1 of
context + continuation (the last token is never an input); dsdm keeps max_len tokens, so an example longer than the
model's context keeps one context token fewer here. Shorter examples score identically (tests/test_evaluate.py).
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
    token), correct (greedy exact match), has_choices (bool) and, where has_choices (False / nan elsewhere):
    mc_correct and mc_correct_norm (bool: summed / per-character log-probability picks the answer), n_choices,
    and choice_logp: per example the (n_choices,) summed log-probability of each choice (None without choices)."""
    from dsdm.tasks import encode_examples

    bos_id = default_bos_id(tokenizer) if bos_id is None else bos_id
    max_len = model_max_len(model)
    tokens, _, score = encode_examples(tokenizer, examples, max_len, bos_id)
    nll, cnt, ok = continuation_scores(model, tokens, score, device, batch_size)
    n = len(examples)
    has = np.array([ex.choices is not None for ex in examples])
    mc, mc_norm, n_choices = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
    if has.any():
        # the answer's summed NLL is the main pass's (same tokens); only the other choices are scored again
        pairs = [
            (i, j) for i in np.flatnonzero(has) for j in range(len(examples[i].choices)) if j != examples[i].answer
        ]
        t, _, s = encode_examples(
            tokenizer, [examples[i] for i, _ in pairs], max_len, bos_id, [examples[i].choices[j] for i, j in pairs]
        )
        wrong_nll, _, _ = continuation_scores(model, t, s, device, batch_size)
        logp = {i: np.zeros(len(examples[i].choices)) for i in np.flatnonzero(has)}
        for (i, j), v in zip(pairs, wrong_nll):
            logp[i][j] = -v
        for i, lp in logp.items():
            ex = examples[i]
            lp[ex.answer] = -nll[i]
            chars = np.array([float(len(c)) for c in ex.choices])
            mc[i] = int(np.argmax(lp)) == ex.answer
            mc_norm[i] = int(np.argmax(lp / chars)) == ex.answer
            n_choices[i] = len(ex.choices)
    return {
        "loss": nll / cnt,
        "correct": ok,
        "has_choices": has,
        "mc_correct": mc,
        "mc_correct_norm": mc_norm,
        "n_choices": n_choices,
        "choice_logp": [logp.get(i) for i in range(n)] if has.any() else [None] * n,
    }


def subsample(examples: list, max_examples: int | None, seed: int = 0) -> list:
    """A seeded subsample of at most max_examples (order kept), the same for every model; all when None or 0."""
    if max_examples and len(examples) > max_examples:
        keep = np.sort(np.random.default_rng((seed, 7)).choice(len(examples), max_examples, replace=False))
        return [examples[i] for i in keep]
    return list(examples)


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
    build_mc: bool = True,
    mc_seed: int = 0,
) -> dict:
    """Metrics of `model` on one split of a dsdm.tasks.Task.

    Returns {task, split, n, loss, loss_ci [lo, hi], accuracy, accuracy_ci, mc_accuracy, mc_ci, mc_accuracy_norm,
    mc_norm_ci, chance, n_mc, n_choices_examples (= n_mc), per_example {id, loss, correct, mc_correct}}; the mc_*
    fields and chance are None when no example has choices. Examples without choices get them from
    dsdm.tasks.mc_examples(task, split, seed=mc_seed) unless build_mc=False (then only the task's own choices count),
    built on the whole split so that an example's choices do not depend on max_examples; max_examples takes a
    seeded subsample (the same for every model).
    """
    from dsdm.tasks import mc_examples

    examples = (mc_examples(task, split, seed=mc_seed) if build_mc else None) or task.split(split)
    examples = subsample(examples, max_examples, seed)
    if not examples:
        raise ValueError(f"task {task.name}: split {split!r} has no examples")
    device = device or next(model.parameters()).device
    r = evaluate_examples(model, tokenizer, examples, device, batch_size, bos_id)
    has = r["has_choices"]
    right, right_norm = r["mc_correct"][has].astype(float), r["mc_correct_norm"][has].astype(float)
    some = bool(has.any())
    return {
        "task": task.name,
        "split": split,
        "n": len(examples),
        "loss": float(r["loss"].mean()),
        "loss_ci": bootstrap_ci(r["loss"], n_boot, seed=seed),
        "accuracy": float(r["correct"].mean()),
        "accuracy_ci": bootstrap_ci(r["correct"].astype(float), n_boot, seed=seed),
        "mc_accuracy": float(right.mean()) if some else None,
        "mc_ci": bootstrap_ci(right, n_boot, seed=seed) if some else None,
        "mc_accuracy_norm": float(right_norm.mean()) if some else None,
        "mc_norm_ci": bootstrap_ci(right_norm, n_boot, seed=seed) if some else None,
        "chance": float((1.0 / r["n_choices"][has]).mean()) if some else None,
        "n_mc": int(has.sum()),
        "n_choices_examples": int(has.sum()),
        "per_example": {
            "id": [ex.id for ex in examples],
            "loss": r["loss"].tolist(),
            "correct": r["correct"].tolist(),
            "mc_correct": [bool(c) if h else None for c, h in zip(r["mc_correct"], has)],
        },
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
    lm_eval_dirs: list[str] | None = None,
) -> dict:
    """Evaluate a model directory on tasks and write one JSON {model, split, tasks: {name: metrics}} atomically.

    The tokenizer is `tokenizer_path` (a tokenizer.json or a pool directory), else model_dir/tokenizer.json.
    `lm_eval_dirs`: task folders from `dsdm tasks export-lm-eval`, run through lm-eval's HF backend on the same
    model and tokenizer (all their examples; max_examples does not apply); results under "lm_eval"."""
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
    if lm_eval_dirs:  # fail before any work when the extra is missing or a folder holds no task
        from dsdm.harness import INSTALL, task_names

        try:
            import lm_eval.models.huggingface  # noqa: F401
        except ImportError:
            raise ImportError(INSTALL) from None
        for d in lm_eval_dirs:
            task_names(d)
    tokenizer = Tokenizer.from_file(str(tok))
    dev, why = resolve_device(device)
    log(f"device {why}")
    model = load_model(model_dir).to(dev)
    results = {}
    for spec in task_specs:
        task = load_task(spec)
        r = evaluate_task(model, tokenizer, task, split, max_examples or None, batch_size, dev)
        results[task.name] = r
        mc = "" if r["mc_accuracy"] is None else f"  mc_accuracy {r['mc_accuracy']:.3f} (chance {r['chance']:.3f})"
        log(
            f"{task.name} ({split}, n={r['n']}): loss {r['loss']:.4f} [{r['loss_ci'][0]:.4f}, {r['loss_ci'][1]:.4f}]"
            f"  accuracy {r['accuracy']:.3f}{mc}"
        )
    record = {"model": str(model_dir.resolve()), "tokenizer": str(tok.resolve()), "split": split, "tasks": results}
    if lm_eval_dirs:
        from dsdm.harness import run_lm_eval

        record["lm_eval"] = run_lm_eval(model_dir, lm_eval_dirs, tok, device=str(dev), batch_size=batch_size)
        for name, m in record["lm_eval"].items():
            log(f"lm-eval {name} (n={m['n']}): " + "  ".join(f"{k} {v:.3f}" for k, v in m.items() if k != "n"))
    write_json(out, record)
    return record

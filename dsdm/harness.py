"""lm-evaluation-harness bridge: export dsdm tasks as lm-eval task folders and run lm-eval's HF backend on a model.

`export_task` writes DIR/<split>.jsonl (context, choices, answer: the multiple-choice form dsdm.evaluate scores,
dsdm.tasks.mc_examples with the same seed) and DIR/dsdm_<name>.yaml, an lm-eval `multiple_choice` task over that
file with `target_delimiter: ""` (the choices carry their leading space, dsdm's whitespace convention) and metrics
acc (summed log-probability) and acc_norm (per character). These are exactly dsdm's `mc_accuracy` and
`mc_accuracy_norm`; tests/test_evaluate.py checks that both tools give the same per-choice log-likelihoods.
A task without a multiple-choice form (text-only rows) is exported as `loglikelihood` over context/continuation
(lm-eval's acc there is greedy exact match, dsdm's `accuracy`). The YAML names the data file by absolute path (lm-eval
resolves relative data files against the working directory): re-export after moving the folder.

`run_lm_eval` loads the model directory with transformers (dsdm saves GPT-2 checkpoints) and the tokenizer from a
tokenizer.json (a pool's or the model's), wrapped as a PreTrainedTokenizerFast with <|endoftext|> as EOS, and runs
lm-eval offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE default to 1). lm-eval is an optional extra:
`pip install 'dsdm[lm-eval]'`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from dsdm.tasks import Task, mc_examples

INSTALL = "lm-eval is not installed; install it with `pip install 'dsdm[lm-eval]'` (or `pip install lm-eval`)"


def task_yaml(name: str, data_file: Path, multiple_choice: bool) -> dict:
    """The lm-eval task config (as a dict) over one local JSONL file used as the test split."""
    cfg = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "num_fewshot": 0,  # dsdm's few-shot tasks carry their examples inside the context
        "doc_to_text": "context",
        "target_delimiter": "",  # the choices / continuation start with their own space
        "metadata": {"version": 1.0, "exported_by": "dsdm tasks export-lm-eval"},
    }
    acc = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
    if multiple_choice:
        norm = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
        return (
            cfg
            | {"output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "answer"}
            | {"metric_list": [acc, norm]}
        )
    ppl = {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}
    return cfg | {"output_type": "loglikelihood", "doc_to_target": "continuation", "metric_list": [ppl, acc]}


def export_task(task: Task, out_dir: str | Path, split: str = "holdout", seed: int = 0) -> Path:
    """Write `task`'s split as an lm-eval task folder (module docstring); returns the YAML path. The task's lm-eval
    name is dsdm_<task name> (lowercase; characters other than letters, digits, '_' become '_')."""
    from dsdm.io import atomic_path

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    examples = mc_examples(task, split, seed=seed)
    mc = examples is not None
    rows = [
        {"id": ex.id, "context": ex.context, "continuation": ex.continuation}
        | ({"choices": list(ex.choices), "answer": ex.answer} if mc else {})
        for ex in (examples if mc else task.split(split))
    ]
    if mc and any(ex.choices is None for ex in examples):
        raise ValueError(f"task {task.name}: some {split} rows have no multiple-choice form; export them apart")
    if not mc and any(not ex.context for ex in task.split(split)):
        raise ValueError(f"task {task.name}: text-only rows (empty context) cannot be exported to lm-eval yet")
    name = "dsdm_" + "".join(c if c.isalnum() or c == "_" else "_" for c in task.name.lower())
    data = out / f"{split}.jsonl"
    with atomic_path(data) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    path = out / f"{name}.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(task_yaml(name, data, mc), sort_keys=False, allow_unicode=True))
    return path


def task_names(task_dir: str | Path) -> list[str]:
    """The lm-eval task names defined by the YAML files of an exported folder."""
    names = []
    for p in sorted(Path(task_dir).glob("*.yaml")):
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and "task" in cfg:
            names.append(str(cfg["task"]))
    if not names:
        raise FileNotFoundError(f"{task_dir}: no lm-eval task YAML; write one with `dsdm tasks export-lm-eval`")
    return names


def hf_tokenizer(tokenizer_json: str | Path):
    """A transformers PreTrainedTokenizerFast over a dsdm tokenizer.json, <|endoftext|> as EOS (and pad)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json))
    eos = "<|endoftext|>" if tok.convert_tokens_to_ids("<|endoftext|>") is not None else None
    if eos is None:
        raise ValueError(f"{tokenizer_json}: no <|endoftext|> token; lm-eval needs an EOS token")
    tok.eos_token = tok.pad_token = eos
    return tok


def run_lm_eval(
    model_dir: str | Path,
    task_dirs: list[str | Path],
    tokenizer_json: str | Path,
    device: str = "cpu",
    batch_size: int = 32,
    limit: int | None = None,
    samples: bool = False,
) -> dict:
    """Run lm-eval's HF backend on a model directory over exported task folders.

    Returns {task name: {metric: value}} (acc, acc_stderr, acc_norm, ... as lm-eval reports them, plus n); with
    samples=True also {"_samples": {task name: [[log-likelihood per choice] per doc, in doc order]}}."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError(INSTALL) from None

    names = [n for d in task_dirs for n in task_names(d)]
    lm = HFLM(
        pretrained=str(model_dir),
        tokenizer=hf_tokenizer(tokenizer_json),
        device=device,
        batch_size=batch_size,
        dtype="float32",
        add_bos_token=False,
    )
    manager = TaskManager(include_path=[str(Path(d).resolve()) for d in task_dirs])
    res = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=samples, bootstrap_iters=1000
    )
    out: dict = {}
    for name in names:
        metrics = {k.split(",")[0]: v for k, v in res["results"][name].items() if isinstance(v, float)}
        out[name] = metrics | {"n": int(res["n-samples"][name]["effective"])}
    if samples:
        out["_samples"] = {
            name: [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(res["samples"][name], key=_doc_id)]
            for name in names
        }
    return out


def _doc_id(sample: dict) -> int:
    return int(sample["doc_id"])

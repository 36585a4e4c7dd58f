"""Model commands: `dsdm train`, `dsdm evaluate`, `dsdm models`. Parsing only; the work is in dsdm.train,
dsdm.evaluate and dsdm.model."""

from __future__ import annotations

import argparse

RAW = argparse.RawDescriptionHelpFormatter


def register(subparsers) -> None:
    from dsdm.cli import add_config_args

    t = subparsers.add_parser(
        "train",
        help="train a language model on the pool (or a selection of it) at a token budget",
        formatter_class=RAW,
        description=(
            "Train a GPT preset (or continue a local model, --set init_from=DIR) on pool examples.\n\n"
            "The selection (--indices, an int64 .npy such as a selection's indices.npy) is repeated for as many\n"
            "epochs as --tokens needs. AdamW (0.9, 0.95), warm-up + cosine, grad clipping, bf16 on GPU.\n"
            "Resumable: rerun the same command after an interruption. Writes under --out: config.json +\n"
            "model.safetensors (GPT-2 format, loadable by transformers), train.json, curve.csv, _done.json.\n\n"
            "example: dsdm train --pool runs/pool --indices runs/sel/indices.npy --tokens 5000000 --out runs/m"
        ),
    )
    t.add_argument("--pool", required=True, metavar="DIR", help="pool directory (dsdm pool build)")
    t.add_argument("--indices", metavar="NPY", help="int64 indices of the examples to train on (default: all)")
    t.add_argument("--tokens", type=int, help="token budget (examples x seq_len)")
    t.add_argument("--preset", help="model preset (dsdm models lists them)")
    t.add_argument("--seed", type=int, help="seed of the initial weights and the data order")
    t.add_argument("--out", required=True, metavar="DIR")
    add_config_args(t)
    t.set_defaults(func=_train)

    e = subparsers.add_parser(
        "evaluate",
        help="continuation loss, greedy accuracy and multiple-choice accuracy of a model on tasks",
        formatter_class=RAW,
        description=(
            "Per task: mean per-token NLL of the continuation given the context (with a bootstrap 95% CI over\n"
            "examples), greedy exact-match accuracy, and multiple-choice accuracy (summed log-probability, as\n"
            "lm-eval's acc; per-character as acc_norm) against its chance level, on the task's own choices or\n"
            "distractors drawn from the task (dsdm.tasks.mc_examples). With --lm-eval, lm-evaluation-harness scores\n"
            "the same model on exported task folders; its acc equals dsdm's mc_accuracy on the same choices.\n"
            "Writes one JSON (--out).\n\n"
            "example: dsdm evaluate --model runs/m --tokenizer runs/pool --task data/demo/tasks/squad_style "
            "--out eval.json\n"
            "         dsdm tasks export-lm-eval data/demo/tasks/kjv_verse --out runs/lm/kjv\n"
            "         dsdm evaluate --model runs/m --tokenizer runs/pool --lm-eval runs/lm/kjv --out eval.json"
        ),
    )
    e.add_argument("--model", required=True, metavar="DIR", help="a dsdm model or any local HF causal LM directory")
    e.add_argument("--task", nargs="+", default=[], metavar="TASK", help="task specs (see dsdm.tasks)")
    e.add_argument(
        "--lm-eval",
        metavar="TASK_DIR[,TASK_DIR...]",
        help="also run lm-evaluation-harness (HF backend, offline) on task folders written by `dsdm tasks "
        "export-lm-eval`; needs the lm-eval extra: pip install 'dsdm[lm-eval]'",
    )
    e.add_argument("--tokenizer", metavar="PATH", help="pool directory or tokenizer.json (default: the model's)")
    e.add_argument("--split", default="holdout", choices=["target", "holdout"])
    e.add_argument("--max-examples", type=int, default=0, help="seeded subsample per task (0 = all)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", required=True, metavar="FILE.json")
    e.set_defaults(func=_evaluate)

    m = subparsers.add_parser("models", help="list model presets with their parameter counts")
    m.add_argument("--vocab", type=int, default=4096, help="vocabulary size to count parameters at")
    m.add_argument("--seq-len", type=int, default=128)
    m.set_defaults(func=_models)


def _train(args) -> int:
    import numpy as np

    from dsdm.cli import config_from_args
    from dsdm.pool import Pool
    from dsdm.train import TrainConfig, train

    cfg = config_from_args(TrainConfig, args, tokens=args.tokens, preset=args.preset, seed=args.seed)
    indices = None if args.indices is None else np.load(args.indices)
    print(train(Pool(args.pool), indices, cfg, args.out, force=args.force))
    return 0


def _evaluate(args) -> int:
    from dsdm.evaluate import run

    lm_dirs = [d for d in (args.lm_eval or "").split(",") if d]
    if not args.task and not lm_dirs:
        print("dsdm evaluate: give --task TASK ... and/or --lm-eval TASK_DIR")
        return 2
    rec = run(
        args.model,
        args.task,
        args.out,
        args.tokenizer,
        args.split,
        args.max_examples,
        args.batch_size,
        args.device,
        lm_eval_dirs=lm_dirs,
    )
    print(f"{'task':24s} {'n':>5s} {'loss':>8s} {'95% CI':>19s} {'acc':>6s} {'mc_acc':>6s} {'chance':>6s}")
    for name, r in rec["tasks"].items():
        mc = "" if r["mc_accuracy"] is None else f"{r['mc_accuracy']:.3f}"
        chance = "" if r["chance"] is None else f"{r['chance']:.3f}"
        ci = f"[{r['loss_ci'][0]:.3f}, {r['loss_ci'][1]:.3f}]"
        print(f"{name:24s} {r['n']:5d} {r['loss']:8.4f} {ci:>19s} {r['accuracy']:6.3f} {mc:>6s} {chance:>6s}")
    for name, m in rec.get("lm_eval", {}).items():
        print(f"lm-eval {name}: " + "  ".join(f"{k} {v:.3f}" for k, v in m.items() if k != "n") + f"  (n={m['n']})")
    print(args.out)
    return 0


def _models(args) -> int:
    import torch

    from dsdm.model import GPT, PRESETS, GPTConfig, num_params

    print(f"{'preset':10s} {'layers':>6s} {'heads':>5s} {'d_model':>7s} {'params':>12s}  (vocab {args.vocab})")
    for name, (n_layer, n_head, d) in PRESETS.items():
        cfg = GPTConfig(vocab_size=args.vocab, seq_len=args.seq_len, n_layer=n_layer, n_head=n_head, d_model=d)
        with torch.device("meta"):
            n = num_params(GPT(cfg))
        print(f"{name:10s} {n_layer:6d} {n_head:5d} {d:7d} {n:12,d}")
    return 0

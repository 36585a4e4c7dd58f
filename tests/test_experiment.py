"""dsdm.experiment: config validation, cell planning (the protocol of method.md §6.2 / §9.2 step 5), every shipped
experiment config loads, and the runner end to end on configs/micro.yaml (a re-run skips every finished cell; the
report renders).

Run: .venv/bin/python -m pytest -q tests/test_experiment.py
"""

import json
from pathlib import Path

import numpy as np
import pytest

from dsdm.experiment import REPO_ROOT, Cell, ExperimentConfig, load_experiment, plan_cells
from dsdm.results import COLUMNS as RESULT_COLUMNS
from dsdm.results import UNTARGETED_NAME
from dsdm.results import read as read_results

CONFIGS = ["demo.yaml", "repro-cpu.yaml", "gpu-125m.yaml", "micro.yaml"]


def _cfg(**over) -> ExperimentConfig:
    from dsdm.config import from_dict

    data = {
        "pool": {"path": "p"},
        "targets": [{"name": "a", "tasks": ["ta"]}, {"name": "mix", "tasks": ["ta", "tb"]}],
        "unseen": ["u"],
        "budget": {"tokens": 64 * 32, "epochs": 4, "compute_multipliers": [1, 2, 4]},
        "seeds": [0, 1],
    }
    data.update(over)
    return from_dict(ExperimentConfig, data)


def test_plan_follows_the_protocol():
    cfg = _cfg(budget={"tokens": 2048, "epochs": 4, "compute_multipliers": [1, 2, 4], "ks": {"a": [4]}})
    cells = plan_cells(cfg, seq_len=64, pool_size=1000)
    assert len(cells) == len(set(cells))
    by = {(c.method, c.target, c.k, c.seed): c for c in cells}
    # random: k = c T / L, one epoch, untargeted, at every compute multiplier
    for mult in (1, 2, 4):
        c = by[("random", UNTARGETED_NAME, 32 * mult, 0)]
        assert c.epochs == 1 and c.tokens == 2048 * mult
    assert by[("semdedup", UNTARGETED_NAME, 32, 1)].epochs == 1
    # targeted: k = T / (4 L) for 4 epochs, the 1-epoch variant k = T / L, and the explicit k (epochs = T / (k L))
    for method in ("dsdm", "dsdm-inverse", "dsir", "classifier"):
        for t in ("a", "mix"):
            assert by[(method, t, 8, 0)].epochs == 4 and by[(method, t, 32, 0)].epochs == 1
        assert by[(method, "a", 4, 1)].epochs == 8 and (method, "mix", 4, 1) not in by
    assert all(c.tokens == 2048 for c in cells if c.method != "random")
    n_targeted = 4 * (2 * 2 + 1) * 2  # methods x (2 k per target + 1 explicit) x seeds
    assert len(cells) == n_targeted + 3 * 2 + 2
    assert Cell("a", "dsdm", 8, 4.0, 0, 2048).name == "dsdm_a_8_e4_s0"


def test_balanced_compute_curve_grows_width_and_tokens_by_root_c():
    """budget.compute_scaling balanced (docs/experiments.md "The compute curve"): at 4x, nano at V = 512, T = 128 has
    FLOPs per token 24 d^2 + 768 d (x 6), which doubles exactly at d = 96 (the root of d^2 + 32 d - 12288), so the
    4x model is d = 96 on 2 T tokens; every other cell is the one the tokens rule plans."""
    from dsdm.model import flops_per_token

    budget = {"tokens": 128 * 1000, "epochs": 4, "compute_multipliers": [1, 2, 4]}
    tokens_rule = plan_cells(_cfg(budget=budget, eval_model={"preset": "nano"}), 128, 10_000)
    cfg = _cfg(budget={**budget, "compute_scaling": "balanced"}, eval_model={"preset": "nano"})
    cells = plan_cells(cfg, 128, 10_000, vocab_size=512)
    curve = {c.compute: c for c in cells if c.method == "random" and c.seed == 0}
    assert (curve[4.0].d_model, curve[4.0].tokens, curve[4.0].k) == (96, 256_000, 2000)
    assert (
        curve[1.0].d_model == 0 and curve[1.0].tokens == 128_000 and curve[1.0].name == "random_untargeted_1000_e1_s0"
    )
    assert curve[4.0].name == "random_untargeted_2000_e1_d96_s0"
    for c in curve.values():  # total training FLOPs are c x the 1x model's, within the rounding of the token count
        per_token = sum(flops_per_token(2, c.d_model or 64, 512, 128)) / sum(flops_per_token(2, 64, 512, 128))
        assert c.tokens * per_token == pytest.approx(c.compute * 128_000, abs=128 * per_token)  # whole examples
        assert abs(np.log(per_token / c.compute**0.5)) < 0.02  # the width takes sqrt(c) of it, to the nearest even d
    assert [c for c in cells if c.compute == 1] == [c for c in tokens_rule if c.compute == 1]
    with pytest.raises(ValueError, match="vocab_size"):
        plan_cells(cfg, 128, 10_000)
    with pytest.raises(ValueError, match="init_from"):
        plan_cells(_cfg(budget=cfg.budget.__dict__, eval_model={"init_from": "m"}), 128, 10_000, vocab_size=512)


@pytest.mark.parametrize("stage", ["featurize", "score", "baselines", "training"])
def test_ray_is_a_requirement_of_any_stage_on_ray(stage):
    """Ray is named before any work whichever stage runs on it; before, only training.executor counted, so a missing
    Ray surfaced after the pool and the proxies, when the features stage started (configs/repro-cpu.yaml)."""
    from dsdm.experiment import requirements

    assert "ray" not in requirements(_cfg())
    assert requirements(_cfg(**{stage: {"executor": "ray"}}))["ray"] == "ray"


def test_plan_refuses_selection_larger_than_the_pool():
    with pytest.raises(ValueError, match="exceeds the pool"):
        plan_cells(_cfg(), seq_len=64, pool_size=20)  # semdedup wants k = T / L = 32
    capped = plan_cells(_cfg(), seq_len=64, pool_size=100)  # random at 4x: the whole pool, repeated
    assert {(c.k, c.epochs) for c in capped if c.method == "random" and c.tokens == 4 * 2048} == {(100, 1.28)}
    with pytest.raises(ValueError, match="raise budget.tokens"):
        plan_cells(_cfg(budget={"tokens": 100}), seq_len=64, pool_size=1000)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"methods": ["random", "bogus"]}, "unknown"),
        ({"budget": {"tokens": 0}}, "budget.tokens"),
        ({"budget": {"tokens": 10, "compute_multipliers": [2, 4]}}, "include 1"),
        ({"budget": {"tokens": 10, "ks": {"nope": [3]}}}, "budget.ks"),
        ({"targets": [{"name": "a", "tasks": []}]}, "at least one task"),
        ({"targets": [{"name": "a", "tasks": ["x"]}, {"name": "a", "tasks": ["y"]}]}, "unique"),
        ({"method_options": {"dsir": {}}, "methods": ["random"]}, "method_options"),
        ({"seeds": [1, 1]}, "seeds"),
        ({"pool": {"path": "p", "inputs": ["x"]}}, "exactly one"),
        ({"budget": {"tokens": 10, "epoch": 4}}, "budget.epoch"),
    ],
)
def test_config_validation_names_the_key(over, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**over)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load(name):
    cfg = load_experiment(REPO_ROOT / "configs" / name, base_dir=REPO_ROOT)
    assert cfg.targets and cfg.methods and cfg.budget.tokens > 0
    assert all(Path(p).is_absolute() for t in cfg.targets for p in t.tasks)


# -----------------------------------------------------------------------------
# End to end on a micro pool built here (three sources, word-level tokenizer) with configs/micro.yaml

TOPICS = {
    "cooking": "recipe flour sugar butter oven bake cake bread salt egg".split(),
    "sports": "football goal match team player score league coach season win".split(),
    "finance": "market stock price trade bank money fund rate invest loan".split(),
}
FILLER = "the a of and to in is was for on with as by it that at".split()


def build_micro_data(root: Path, n_docs: int = 240, seq_len: int = 32) -> None:
    """root/pool (a dsdm pool) and root/tasks/{cooking,sports,finance} (target + holdout JSONL)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dsdm.pool import PoolWriter

    rng = np.random.default_rng(0)
    words = sorted({w for v in TOPICS.values() for w in v} | set(FILLER) | {"[EOS]", "[UNK]"})
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(root / "tokenizer.json"))
    writer = PoolWriter(root / "pool", vocab_size=len(words))
    names = sorted(TOPICS)
    for i in range(n_docs):
        src = names[i % 3]
        text = " ".join(rng.choice(TOPICS[src] + FILLER, size=seq_len).tolist())
        writer.add(np.asarray(tok.encode(text).ids), doc_id=f"{src}-{i}", source=src)
    eos = words.index("[EOS]")
    writer.close({"seq_len": seq_len, "mode": "chunk", "eos_id": eos}, {"micro": True}, root / "tokenizer.json")
    for src in names:
        d = root / "tasks" / src
        d.mkdir(parents=True)
        for split, n in (("target", 24), ("holdout", 16)):
            rows = []
            for _ in range(n):
                ctx = " ".join(rng.choice(TOPICS[src] + FILLER, size=8).tolist())
                rows.append({"context": ctx, "continuation": " " + str(rng.choice(TOPICS[src]))})
            (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_runner_end_to_end_and_rerun_skips(tmp_path, capsys):
    from test_report import check_report

    from dsdm.cli import main

    build_micro_data(tmp_path)
    out = tmp_path / "run"
    cfg_path = REPO_ROOT / "configs" / "micro.yaml"
    cfg = load_experiment(cfg_path, base_dir=tmp_path)
    # through the real CLI, with the data paths resolved against tmp_path via a copy of the config
    resolved = tmp_path / "micro.yaml"
    from dsdm.config import save_config

    save_config(cfg, resolved)
    assert main(["experiment", str(resolved), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "dsdm" in printed

    rows = read_results(out / "results.csv")
    cells = plan_cells(cfg, 32, 240)
    eval_tasks = {"cooking", "sports", "finance"}
    assert len(rows) == len(cells) * len(eval_tasks)
    assert list(rows[0]) == RESULT_COLUMNS
    assert {r["eval_task"] for r in rows} == eval_tasks
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    for c in cells:
        sel = np.load(out / "selections" / c.selection / "indices.npy")
        assert sel.dtype == np.int64 and sel.shape == (c.k,) and np.all(np.diff(sel) > 0)
        assert (out / "eval" / c.name / "metrics.json").exists()
    assert (out / "scores" / "dsdm" / "cooking.npy").exists() and (out / "config.yaml").exists()
    check_report(out)

    # a re-run trains nothing: every cell is cached
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "eval").glob("*/metrics.json")}
    assert main(["experiment", str(resolved), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "eval").glob("*/metrics.json")} == mtimes
    # a changed setting is refused, naming the key
    assert main(["experiment", str(resolved), "--out", str(out), "--set", "method_options.dsir.num_buckets=99"]) == 2

    # DsDm's balanced rule through the runner: --force redoes the dsdm selections (the pool's source column bound by
    # the selection stage), which keep the pool's composition
    from dsdm.pool import Pool
    from dsdm.select import balanced_top_k

    balanced = ["--set", "method_options.dsdm.rule=balanced", "--force"]
    assert main(["experiment", str(resolved), "--out", str(out)] + balanced) == 0
    sources = np.asarray(Pool(tmp_path / "pool").column("source").to_pylist())
    cell = next(c for c in cells if c.method == "dsdm" and c.target == "cooking")
    expected = np.sort(balanced_top_k(np.load(out / "scores" / "dsdm" / "cooking.npy"), sources, cell.k))
    assert np.load(out / "selections" / cell.selection / "indices.npy").tolist() == expected.tolist()

    # the balanced compute curve: its 2x random models are new cells (a wider micro on fewer tokens); every other
    # cell keeps its key and is not redone, and results.csv names each model's width and compute (the 2x models see
    # a whole number of examples once)
    from dsdm.model import load_model, width_for_flops

    done = {p: p.stat().st_mtime_ns for p in (out / "eval").glob("*/metrics.json")}
    scaled = balanced[:2] + ["--set", "budget.compute_scaling=balanced"]
    assert main(["experiment", str(resolved), "--out", str(out)] + scaled) == 0
    assert {p: p.stat().st_mtime_ns for p in done} == done
    width = width_for_flops("micro", Pool(tmp_path / "pool").vocab_size, 32, 2**0.5)
    rows = read_results(out / "results.csv")
    wide = {(r["k"], r["tokens"], r["d_model"]) for r in rows if r["method"] == "random" and r["compute"] == 2.0}
    ((k, tokens, d_model),) = wide
    assert d_model == width != 32 and 2048 < tokens < 2 * 2048 and k == tokens // 32
    assert {(r["compute"], r["d_model"]) for r in rows if r["compute"] != 2.0} == {(1.0, 0)}
    for seed in (0, 1):
        assert load_model(out / "models" / f"random_untargeted_{k}_e1_d{width}_s{seed}").config.d_model == width


def test_task_specs_resolve_against_the_base_keeping_a_name_prefix(tmp_path):
    from dsdm.experiment import resolve_paths

    cfg = _cfg(targets=[{"name": "qa", "tasks": ["name=qa:t/qa.t.jsonl,t/qa.h.jsonl", "/abs/task"]}], unseen=["u"])
    cfg = resolve_paths(cfg, tmp_path)
    assert cfg.targets[0].tasks == [f"name=qa:{tmp_path}/t/qa.t.jsonl,{tmp_path}/t/qa.h.jsonl", "/abs/task"]
    assert cfg.unseen == [str(tmp_path / "u")] and cfg.pool.path == str(tmp_path / "p")


def test_missing_inputs_are_named_with_the_command_that_makes_them(tmp_path):
    """A repro config run before `dsdm data build-demo` used to fail on the first task with 'task file not found',
    naming neither the config key nor the fix."""
    from dsdm.experiment import run

    data = tmp_path / "data-full"
    (data / "tasks" / "present").mkdir(parents=True)
    cfg = _cfg(
        pool={"inputs": [f"{data}/docs/*.parquet"]},
        targets=[{"name": "qa", "tasks": [f"{data}/tasks/qa", f"{data}/tasks/present"]}],
        unseen=[f"{data}/tasks/other"],
    )
    with pytest.raises(FileNotFoundError) as err:
        run(cfg, tmp_path / "run")
    msg = str(err.value)
    assert msg.startswith("3 input(s) of the config not found")
    assert f"pool.inputs: {data}/docs/*.parquet" in msg and f"targets.qa.tasks: {data}/tasks/qa" in msg
    assert f"unseen: {data}/tasks/other" in msg and "present" not in msg
    assert msg.endswith(f"make them with `dsdm data build-demo --out {data}`")
    assert not (tmp_path / "run").exists()  # refused before any work

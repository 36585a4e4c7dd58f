"""The experiment runner's guarantees (docs/runner.md), on the micro experiment of tests/test_experiment.py:

- a changed setting is refused before any work, naming the stage and key, and `--force` recomputes exactly the
  stages it changes and everything downstream (the defect where a changed `score.ridge` was silently ignored);
- every dependency of a config is checked before any work; bad configs and arguments end in one line, exit code 2;
- `dsdm verify` finds and names a flipped byte in a pool, a feature store, a score file and a selection;
- one writer per run directory; an injected ENOSPC leaves no stage marked done;
- a run SIGKILLed at seeded points in every stage (pool build, proxies, featurize, scores, cells, report) resumes to
  the same bytes as a run that never stopped, without redoing finished stages.

Run: .venv/bin/python -m pytest -q tests/test_runner.py
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_experiment import build_micro_data

from dsdm.cli import main
from dsdm.config import load_yaml, save_config
from dsdm.experiment import REPO_ROOT
from dsdm.io import DONE_FILE, read_json, run_lock, verify

MICRO = REPO_ROOT / "configs" / "micro.yaml"
FAST = ["--set", "eval.max_examples=4"]  # the reliability checks need results, not precise ones


def _config(root: Path, build_pool: bool = False, **overrides) -> Path:
    """The micro config resolved against `root`; with build_pool, the pool is built by the run from JSONL files."""
    cfg = load_yaml(MICRO)
    if build_pool:
        cfg["pool"] = {
            "inputs": [str(root / "docs" / "*.jsonl")],
            "build": {"tokenizer": str(root / "tokenizer-eos.json"), "seq_len": 32},
        }
    cfg.update(overrides)
    path = root / ("micro-built.yaml" if build_pool else "micro.yaml")
    save_config(load_experiment_dict(cfg, root), path)
    return path


def load_experiment_dict(data: dict, root: Path):
    from dsdm.config import from_dict
    from dsdm.experiment import ExperimentConfig, resolve_paths

    return resolve_paths(from_dict(ExperimentConfig, data), root)


def _write_docs(root: Path) -> None:
    """The micro pool's documents as JSONL, one file per source, and its tokenizer with an end-of-document token
    (for runs that build their pool)."""
    from tokenizers import Tokenizer

    from dsdm.pool import Pool

    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(root / "tokenizer-eos.json"))
    pool = Pool(root / "pool")
    sources = pool.meta.column("source").to_pylist()
    (root / "docs").mkdir(exist_ok=True)
    for src in sorted(set(sources)):
        rows = [{"text": pool.decode(i).replace("[EOS]", "").strip()} for i in range(len(pool)) if sources[i] == src]
        (root / "docs" / f"{src}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """(data root, a finished run of the micro experiment) shared by the tests, which work on copies of the run."""
    root = tmp_path_factory.mktemp("micro")
    build_micro_data(root)
    _write_docs(root)
    run = root / "ref"
    assert main(["experiment", str(_config(root)), "--out", str(run), *FAST]) == 0
    return root, run


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _mtimes(d: Path) -> dict:
    """Modification times of every file but the run lock (which records the last process that held it)."""
    return {p: p.stat().st_mtime_ns for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def _run_key(stage_dir: Path) -> str:
    return read_json(stage_dir / DONE_FILE)["run"]["key"]


# -----------------------------------------------------------------------------
# Changed settings (issue 14 defect 1)


def test_changed_setting_is_refused_naming_it_and_nothing_is_written(micro, tmp_path, capsys):
    root, ref = micro
    out = _copy(ref, tmp_path / "run")
    before, config = _mtimes(out), (out / "config.yaml").read_text()
    assert main(["experiment", str(_config(root)), "--out", str(out), *FAST, "--set", "score.ridge=0.5"]) == 2
    err = capsys.readouterr().err
    assert "scores/dsdm (score.ridge)" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1
    assert _mtimes(out) == before and (out / "config.yaml").read_text() == config
    assert main(["experiment", str(_config(root)), "--out", str(out), *FAST, "--set", "proxy.fraction=0.6"]) == 2
    assert "proxies (proxy.fraction)" in capsys.readouterr().err


def test_retrained_proxies_are_featurized_again(micro, tmp_path):
    """A changed proxy setting with --force retrains the proxies; the features, whose own settings did not change,
    must be recomputed from the new proxies, not kept (they were kept before: featurize saw the same settings and
    the same proxy paths and reported "nothing to do")."""
    root, ref = micro
    out = _copy(ref, tmp_path / "run")
    args = ["experiment", str(_config(root)), "--out", str(out), *FAST, "--set", "proxy.fraction=0.6", "--force"]
    assert main(args) == 0
    for m in (0, 1):
        new, old = (np.load(d / "features" / f"proxy_{m}" / "features.npy") for d in (out, ref))
        assert new.shape == old.shape and not np.array_equal(new, old), m
    assert not np.array_equal(np.load(out / "scores/dsdm/mix.npy"), np.load(ref / "scores/dsdm/mix.npy"))
    assert verify(out)[0] == []


def test_switching_on_adam_preconditioning_retrains_the_proxies(micro, tmp_path, capsys):
    """Proxies trained before dsdm saved AdamW's second moments have none: with featurize.precondition=adam the
    proxies stage is out of date (refused, naming it), and --force retrains them (same weights, now with the state)."""
    root, ref = micro
    out = _copy(ref, tmp_path / "run")
    for f in out.glob("proxies/proxy_*/optimizer_v.safetensors"):
        f.unlink()  # as an older dsdm left them
    weights = {p.parent.name: p.read_bytes() for p in out.glob("proxies/proxy_*/model.safetensors")}
    args = ["experiment", str(_config(root)), "--out", str(out), *FAST, "--set", "featurize.precondition=adam"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "changed proxies (featurize); features (featurize.precondition)" in err, err
    assert main(args + ["--force"]) == 0
    assert weights and all((out / "proxies" / m / "optimizer_v.safetensors").exists() for m in weights)
    assert {p.parent.name: p.read_bytes() for p in out.glob("proxies/proxy_*/model.safetensors")} == weights
    manifest = read_json(out / "features" / "manifest.json")
    assert manifest["featurize"]["precondition"] == "adam"


def test_force_recomputes_the_changed_stage_and_what_depends_on_it(micro, tmp_path):
    root, ref = micro
    out = _copy(ref, tmp_path / "run")
    keys = {d: _run_key(d) for d in [*out.glob("scores/*"), *out.glob("selections/*"), *out.glob("eval/*")]}
    args = ["experiment", str(_config(root)), "--out", str(out), *FAST, "--set", "score.ridge=0.5", "--force"]
    assert main(args) == 0
    changed = {d.relative_to(out).as_posix() for d, k in keys.items() if _run_key(d) != k}
    dsdm_stages = {n for n in changed if "dsdm" in n}
    assert changed == dsdm_stages  # nothing else was recomputed: random, dsir, classifier, semdedup kept
    assert "scores/dsdm" in changed
    assert any(n.startswith("eval/dsdm-inverse_mix") for n in changed)
    assert load_yaml(out / "config.yaml")["score"]["ridge"] == 0.5
    assert np.any(np.load(out / "scores/dsdm/mix.npy") != np.load(ref / "scores/dsdm/mix.npy"))
    assert verify(out)[0] == []
    # and now the run is consistent again: a plain re-run does nothing
    before = _mtimes(out / "eval")
    assert main(["experiment", str(_config(root)), "--out", str(out), *FAST, "--set", "score.ridge=0.5"]) == 0
    assert _mtimes(out / "eval") == before


def test_changed_task_file_is_a_changed_input(micro, tmp_path, capsys):
    root, ref = micro
    data = tmp_path / "data"
    shutil.copytree(root / "tasks", data / "tasks")
    (data / "pool").symlink_to(root / "pool")
    out = _copy(ref, tmp_path / "run")
    holdout = data / "tasks" / "finance" / "holdout.jsonl"
    rows = holdout.read_text().splitlines()
    holdout.write_text("\n".join(rows[1:]) + "\n")  # one example fewer
    assert main(["experiment", str(_config(data)), "--out", str(out), *FAST]) == 2
    assert "eval_tasks" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Before any work: dependencies, bad configs and arguments


def test_missing_optional_dependency_fails_before_any_work(micro, tmp_path, monkeypatch, capsys):
    import importlib.util

    root, _ = micro
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    out = tmp_path / "run"
    assert main(["experiment", str(_config(root)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "scikit-learn" in err and "dsdm[baselines]" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--set", "budget.epoch=4"], "budget.epoch"),
        (["--set", "seeds=abc"], "seeds"),
        (["--set", "budget.tokens=40"], "raise budget.tokens"),  # k = 40 / (4 x 32) < 1
        (["--set", "budget.tokens=100000"], "exceeds the pool"),
        # SemDeDup keeps ~10% = 24 examples, its 1-epoch cells need k = 64: found at selection before (the repro lost
        # 17 min of pool-sized stages to it), now before any work
        (["--set", "method_options.semdedup.target_keep_fraction=0.1"], "semdedup can select at most 24"),
        (["--set", "unseen=[nowhere]"], "nowhere"),
        (["--set", "methods=[random,bogus]"], "bogus"),
        (["--set", "method_options.dsir.num_bucket=3"], "dsir.num_bucket"),
        (["--set", "featurize.proj_dimm=8"], "featurize.proj_dimm"),
        (["--set", "proxy.train.lr=fast"], "proxy.train.lr"),
        (["--set", "eval_model.preset=nope"], "nope"),
    ],
)
def test_bad_config_is_one_line_exit_2_nothing_written(micro, tmp_path, capsys, args, match):
    root, _ = micro
    out = tmp_path / "run"
    assert main(["experiment", str(_config(root)), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and err.startswith("dsdm experiment: error:")
    assert not out.exists()


def test_task_with_no_examples_is_refused(micro, tmp_path, capsys):
    root, _ = micro
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "target.jsonl").write_text('{"context": "a", "continuation": " b"}\n')
    (empty / "holdout.jsonl").write_text("")
    assert main(["experiment", str(_config(root)), "--out", str(tmp_path / "run"), "--set", f"unseen=[{empty}]"]) == 2
    assert "empty" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_empty_pool_and_bad_k_are_one_line_errors(micro, tmp_path, capsys):
    root, ref = micro
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "empty.jsonl").write_text("")
    shutil.copy(root / "tokenizer-eos.json", tmp_path / "tokenizer-eos.json")
    shutil.copytree(root / "tasks", tmp_path / "tasks")
    out = tmp_path / "run"
    assert main(["experiment", str(_config(tmp_path, build_pool=True)), "--out", str(out)]) == 2
    assert "no examples" in capsys.readouterr().err and not list(out.rglob(DONE_FILE))
    for k in ("0", "-3", "100000"):
        args = ["baseline", "random", "--pool", str(root / "pool"), "--k", k, "--out", str(tmp_path / f"k{k}")]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "--k" in err and len(err.splitlines()) == 1 and not (tmp_path / f"k{k}").exists()


def test_featurize_refuses_proxies_of_another_pool(micro, tmp_path, capsys):
    """A tokenizer/pool mismatch between the pool and the proxies is one line, exit 2."""
    root, ref = micro
    other = tmp_path / "other"
    other.mkdir()
    build_micro_data(other, n_docs=90)
    args = ["featurize", "--pool", str(other / "pool"), "--proxies", str(ref / "proxies"), "--out", str(tmp_path / "f")]
    assert main(args) == 2
    assert "another pool" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# verify, the lock, disk full


def _flip(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "rel",
    [
        "features/proxy_0/features.npy",
        "scores/dsdm/mix.npy",
        "selections/dsir_cooking_16_s0/indices.npy",
        "models/random_untargeted_64_e1_s0/model.safetensors",
        "eval/dsir_cooking_16_e4_s1/metrics.json",
    ],
)
def test_verify_names_a_flipped_byte(micro, tmp_path, rel, capsys):
    _, ref = micro
    out = _copy(ref, tmp_path / "run")
    assert main(["verify", str(out)]) == 0
    _flip(out / rel)
    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert f"{out / rel}: changed" in printed


def test_verify_names_a_flipped_byte_in_the_pool_and_a_missing_file(micro, tmp_path, capsys):
    root, ref = micro
    pool = shutil.copytree(root / "pool", tmp_path / "pool")
    assert verify(pool)[0] == []
    _flip(pool / "tokens.bin", 7)
    problems, checked = verify(pool)
    assert checked >= 4 and problems == [
        f"{pool / 'tokens.bin'}: changed since it was written (sha256 differs from {pool / DONE_FILE})"
    ]
    out = _copy(ref, tmp_path / "run")
    (out / "selections/dsdm_mix_16_s0/indices.npy").unlink()
    problems, _ = verify(out)
    assert any("selections/dsdm_mix_16_s0/indices.npy: missing" in p for p in problems)


def test_a_second_writer_is_refused_with_the_holders_pid(micro, tmp_path, capsys):
    root, ref = micro
    out = _copy(ref, tmp_path / "run")
    with run_lock(out):
        assert main(["experiment", str(_config(root)), "--out", str(out), *FAST]) == 2
    assert f"pid {os.getpid()}" in capsys.readouterr().err
    assert main(["experiment", str(_config(root)), "--out", str(out), *FAST]) == 0  # released with its holder


def _dsdm(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "dsdm", *args], env=full_env, capture_output=True, text=True, timeout=timeout
    )


def _outputs(run: Path) -> dict[str, bytes]:
    """Every file of a run except records, the lock and temp files, with the run's own path masked."""
    out = {}
    for p in sorted(run.rglob("*")):
        if not p.is_file() or p.name in (DONE_FILE, ".lock") or (p.name.startswith(".") and p.name.endswith(".tmp")):
            continue
        if "checkpoint" in p.relative_to(run).parts:
            continue
        data = p.read_bytes()
        if p.suffix in (".json", ".md", ".html", ".yaml"):
            data = data.replace(str(run).encode(), b"<RUN>")
        out[p.relative_to(run).as_posix()] = data
    return out


def _differences(actual: dict[str, bytes], expected: dict[str, bytes]) -> list[str]:
    """The files where two runs' _outputs disagree, each named with how: a short list a failure can print whole."""
    out = []
    for name in sorted(set(actual) | set(expected)):
        a, e = actual.get(name), expected.get(name)
        if a is None or e is None:
            out.append(f"{name}: {'missing' if a is None else 'extra'}")
        elif a != e:
            first = next((i for i, (x, y) in enumerate(zip(a, e)) if x != y), min(len(a), len(e)))
            out.append(f"{name}: differs from byte {first} ({len(a)} vs {len(e)} bytes): {a[first : first + 60]!r}")
    return out


@pytest.fixture(scope="module")
def built(micro, tmp_path_factory):
    """A run that builds its pool (every stage of the pipeline inside the run) and its trace of atomic writes from
    scratch, [(write number, path relative to the run)]: the address space of the fault points."""
    root, _ = micro
    budget = {"tokens": 2048, "epochs": 4, "one_epoch_variant": False, "compute_multipliers": [1, 2]}
    cfg = _config(root, build_pool=True, seeds=[0], budget=budget)  # one seed, fewer cells: every stage kind, faster
    run = tmp_path_factory.mktemp("built") / "ref"
    counter = run.parent / "count"
    r = _dsdm(["experiment", str(cfg), "--out", str(run), *FAST], env={"DSDM_FAULT": f"count={counter}"})
    assert r.returncode == 0, r.stderr[-3000:]
    trace = [line.split("\t", 1) for line in counter.read_text().splitlines()]
    return cfg, run, [(int(n), Path(p).relative_to(run).as_posix()) for n, p in trace]


def test_disk_full_leaves_no_stage_marked_done(built, tmp_path):
    cfg, ref, trace = built
    n_writes = len(trace)
    for i, at in enumerate(np.random.default_rng(1).choice(np.arange(1, n_writes + 1), size=2, replace=False)):
        out = tmp_path / f"run{i}"
        r = _dsdm(["experiment", str(cfg), "--out", str(out), *FAST], env={"DSDM_FAULT": f"enospc@{at}"})
        assert r.returncode == 1 and "No space left on device" in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()[-1]) < 400  # one line, no traceback
        assert verify(out)[0] == [] or not list(out.rglob(DONE_FILE))  # whatever is marked done is whole
        r = _dsdm(["experiment", str(cfg), "--out", str(out), *FAST])
        assert r.returncode == 0, r.stderr[-2000:]
        diffs = _differences(_outputs(out), _outputs(ref))
        assert not diffs, f"enospc@{at}: the re-run differs: {'; '.join(diffs)}"  # one line: the CI log's tail shows it


STAGE_KINDS = ("pool/", "references/", "proxies/", "features/", "scores/", "selections/", "models/", "eval/", "report")


def _kill_points(trace: list[tuple[int, str]]) -> dict[str, int]:
    """{stage kind: a seeded random write number among that stage's writes}: one kill inside every stage kind, from
    the pool build to the report (figures and report.md/html)."""
    rng = np.random.default_rng(0)
    points = {}
    for kind in STAGE_KINDS:
        writes = [
            n for n, p in trace if p.startswith(kind) or (kind == "report" and p.startswith(("report", "figures/")))
        ]
        assert writes, f"the reference run made no write in {kind}"
        points[kind] = int(rng.choice(writes))
    return points


def test_kill_anywhere_resumes_to_the_same_bytes(built, tmp_path):
    cfg, ref, trace = built
    expected = _outputs(ref)
    for kind, at in _kill_points(trace).items():
        out = tmp_path / f"kill{at}"
        r = _dsdm(["experiment", str(cfg), "--out", str(out), *FAST], env={"DSDM_FAULT": f"kill@{at}"})
        assert r.returncode == -9, f"kill@{at} ({kind}): exit {r.returncode}\n{r.stderr[-2000:]}"
        finished = {p: read_json(p)["finished"] for p in out.rglob(DONE_FILE) if "run" in read_json(p)}
        r = _dsdm(["experiment", str(cfg), "--out", str(out), *FAST])
        assert r.returncode == 0, f"resume after kill@{at}:\n{r.stderr[-3000:]}"
        diffs = _differences(_outputs(out), expected)
        assert not diffs, f"kill@{at} ({kind}): the resumed run differs: {'; '.join(diffs)}"
        # finished stages were not redone: their records are the ones written before the kill
        assert {p: read_json(p)["finished"] for p in finished} == finished
        assert verify(out)[0] == []


def test_report_honours_case_study_and_snippet_chars(micro, tmp_path):
    """report.case_study / report.snippet_chars were documented but ignored (issue 14 defect 4)."""
    from dsdm.report import render

    _, ref = micro
    out = _copy(ref, tmp_path / "run")
    cfg = load_yaml(out / "config.yaml")
    cfg["report"] = {"case_study": 2, "snippet_chars": 30}
    (out / "config.yaml").write_text(json.dumps(cfg))
    render(out)
    md = (out / "report.md").read_text()
    section = md.split("## Case study")[1].split("### ")[1]  # the first score folder's top and bottom lists
    items = [ln for ln in section.splitlines() if ln.startswith("- #")]
    assert len(items) == 4  # 2 top + 2 bottom
    assert all(len(ln.split("): ", 1)[1].rstrip("…")) <= 30 for ln in items)


def test_one_pass_scores_equal_each_target_scored_alone(micro, tmp_path):
    """The runner scores every target in one pass over the feature store (scores/dsdm/<target>.npy); each equals
    `dsdm score` run on that target alone (dsdm.datamodel.run)."""
    from dsdm.datamodel import ScoreConfig
    from dsdm.datamodel import run as score_run

    root, ref = micro
    cfg = load_yaml(ref / "config.yaml")
    for target in cfg["targets"]:
        alone = score_run(
            ref / "features", target["tasks"], tmp_path / f"{target['name']}.npy", ScoreConfig(**cfg["score"]), "cpu"
        )
        np.testing.assert_allclose(
            np.load(ref / "scores/dsdm" / f"{target['name']}.npy"), np.load(alone), rtol=1e-5, atol=1e-7
        )

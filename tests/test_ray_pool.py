"""`dsdm pool build` on Ray (executor=ray): one Ray task per input file tokenizes it, the packing and the write stay
in the calling process. The pool must equal the local build's bitwise: tokens.bin, offsets.npy, meta.parquet,
pool.json (skip counts merged across files, sampled-out counts) and tokenizer.json, the same fingerprint and the same
completion key; config.yaml records the executor and is the one file that differs. Also: the first bad document in
input order is raised as the local build raises it, the CLI flags (relative inputs opened from the caller's
directory), `pool.build.executor: ray` in an experiment config, and the one-line error without Ray.

The Ray tests run on a local cluster (ray.init(num_cpus=2)) and skip when Ray is not installed (pip install
'dsdm[ray]'; `make test` installs it). Run:
    .venv/bin/python -m pytest -q tests/test_ray_pool.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_ingest import _jsonl, _mixed_inputs, _texts

from dsdm.ingest import PoolBuildConfig, build_pool, build_settings
from dsdm.pool import Pool
from dsdm.readers import MAX_EXAMPLES_PER_REASON
from dsdm.tokenizer import load_tokenizer, save_tokenizer

try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed: pip install 'dsdm[ray]' (make test does)")

SAME = ("tokens.bin", "offsets.npy", "meta.parquet", "pool.json", "tokenizer.json")  # every file but the records
INPUTS = ["bad1.jsonl", "web.jsonl.gz", "books.parquet", "bad2.jsonl", "notes", "hfds"]  # relative to the root
BAD_LINES = 4  # malformed lines in each of bad1 and bad2: 8 in all, more than MAX_EXAMPLES_PER_REASON


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Six inputs of every kind (JSONL, .jsonl.gz, Parquet, .txt directory, datasets directory), two of them with
    malformed lines and one with a key first met after the metadata pre-scan; and a trained tokenizer file."""
    root = tmp_path_factory.mktemp("ray_pool")
    _mixed_inputs(root)
    for name, seed in (("bad1", 2), ("bad2", 3)):
        rows = [{"text": t, "source": name} for t in _texts(105, seed=seed, words=8)]
        rows[-1]["late_key"] = "x"  # after META_SCAN_LINES: counted in meta_keys_not_kept, not stored
        for i in range(BAD_LINES):
            rows.insert(10 * i + 3, "{not json")
        _jsonl(root / f"{name}.jsonl", rows)
    save_tokenizer(load_tokenizer("train:300", iter(_texts(200, seed=4))), root / "tok.json")
    return root


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _cfg(**kw) -> PoolBuildConfig:
    return PoolBuildConfig(**{"tokenizer": "train:300", "seq_len": 12, "on_error": "skip", "workers": 1, **kw})


def _build(root: Path, out: str, cfg: PoolBuildConfig) -> Path:
    return build_pool([str(root / p) for p in INPUTS], root / out, cfg)


def assert_same_pool(a: Path, b: Path) -> None:
    for name in SAME:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert Pool(a).fingerprint == Pool(b).fingerprint
    done_a, done_b = (json.loads((d / "_done.json").read_text()) for d in (a, b))
    assert done_a["key"] == done_b["key"]
    assert {k: v for k, v in done_a["outputs"].items() if k != "config.yaml"} == {
        k: v for k, v in done_b["outputs"].items() if k != "config.yaml"
    }
    for d in (a, b):  # no part files or half-built store left behind
        assert not (d / ".parts").exists() and not (d / ".building").exists()


def dsdm(*args: str, cwd: Path, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DSDM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    head = ["-c", code] if code else ["-m", "dsdm"]
    return subprocess.run([sys.executable, *head, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


# -----------------------------------------------------------------------------
# Without Ray


def test_executor_settings_are_no_part_of_the_key():
    assert build_settings(_cfg(executor="ray", ray_address="auto", workers=3)) == build_settings(_cfg())
    assert build_settings(_cfg(seq_len=13)) != build_settings(_cfg())
    with pytest.raises(ValueError, match="executor must be local or ray"):
        _cfg(executor="spark")


def test_without_ray_the_build_stops_in_one_line_before_any_work(root, tmp_path):
    """`import ray` fails (sys.modules['ray'] = None): one error line, exit code 2, no output directory."""
    code = "import sys; sys.modules['ray'] = None; from dsdm.cli import main; raise SystemExit(main(sys.argv[1:]))"
    out = tmp_path / "noray"
    job = dsdm("pool", "build", *INPUTS, "--out", str(out), "--executor", "ray", cwd=root, code=code)
    assert job.returncode == 2, job.stderr
    assert job.stderr.strip() == (
        "dsdm pool: error: pool build with executor=ray needs ray, which is not installed: pip install 'dsdm[ray]'"
    )
    assert not out.exists()


# -----------------------------------------------------------------------------
# Ray: a local cluster of 2 CPUs


@needs_ray
@pytest.mark.parametrize(
    "name, settings",
    [
        ("pack", dict(sample_fraction=0.8)),  # sampled-out documents counted by the workers
        ("document", dict(pack=False, min_tokens=16, batch_docs=7)),  # too-short documents, truncation
    ],
)
def test_ray_pool_is_bitwise_the_local_pool(root, cluster, name, settings):
    local = _build(root, f"local_{name}", _cfg(**settings))
    scaled = _build(root, f"ray_{name}", _cfg(**settings, executor="ray"))
    assert_same_pool(local, scaled)
    m = Pool(scaled).manifest
    assert m["skipped"]["malformed_json"] == 2 * BAD_LINES  # counted in two files, merged in input order
    assert (
        m["skipped_examples"]["malformed_json"]
        == [f"{root}/bad1.jsonl:{10 * i + 4}" for i in range(BAD_LINES)]
        + [f"{root}/bad2.jsonl:4"][: MAX_EXAMPLES_PER_REASON - BAD_LINES]
    )
    assert m["meta_keys_not_kept"] == {"late_key": 2}
    if name == "pack":
        assert m["docs"]["sampled_out"] > 0 and len(Pool(scaled)) > 50
    else:
        assert m["docs"]["too_short"] > 0 and m["docs"]["truncated"] > 0


@needs_ray
def test_ray_pool_raises_the_first_bad_document_in_input_order(root, cluster, tmp_path):
    """on_error=raise with bad lines in two files (a tokenizer file: no sample pass finds them first): the same
    one-line error as the local build, naming the first bad line of the first file; nothing left behind."""
    cfg = dict(tokenizer=str(root / "tok.json"), on_error="raise")
    errors = []
    for executor in ("local", "ray"):
        with pytest.raises(ValueError) as e:
            build_pool([str(root / p) for p in INPUTS], tmp_path / executor, _cfg(**cfg, executor=executor))
        errors.append(str(e.value))
        assert not (tmp_path / executor / ".parts").exists() and not (tmp_path / executor / ".building").exists()
    assert errors[1] == errors[0] and errors[0].startswith(f"{root}/bad1.jsonl:4: not valid JSON"), errors


@needs_ray
def test_ray_pool_from_the_cli(root, cluster, monkeypatch):
    """`--executor ray --ray-address auto` joins the running cluster; the inputs are relative to the caller's
    directory, which the workers open them from. A local rerun on the Ray-built pool has nothing to do."""
    flags = ["--tokenizer", "train:300", "--seq-len", "12", "--on-error", "skip", "--workers", "1"]
    job = dsdm("pool", "build", *INPUTS, "--out", "cli_ray", *flags, "--executor", "ray", "--ray-address", "auto",
               cwd=root)  # fmt: skip
    assert job.returncode == 0, job.stderr
    monkeypatch.chdir(root)
    local = build_pool(INPUTS, "cli_local", _cfg())
    assert_same_pool(root / local, root / "cli_ray")
    marker = (root / "cli_ray" / "_done.json").read_bytes()
    again = dsdm("pool", "build", *INPUTS, "--out", "cli_ray", *flags, "--executor", "local", cwd=root)
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr
    assert (root / "cli_ray" / "_done.json").read_bytes() == marker


@needs_ray
def test_experiment_pool_build_executor_ray(root, cluster, tmp_path):
    """`pool: {inputs: ..., build: {executor: ray}}` builds the run's pool on Ray: the same stage key and the same
    bytes as the local build."""
    from test_experiment import build_micro_data

    from dsdm.experiment import REPO_ROOT, Context, load_experiment

    build_micro_data(tmp_path)  # the micro config's tasks
    contexts = {}
    for executor in ("local", "ray"):
        data = yaml.safe_load((REPO_ROOT / "configs" / "micro.yaml").read_text())
        build = {"tokenizer": "train:300", "seq_len": 12, "on_error": "skip", "executor": executor}
        data["pool"] = {"inputs": [str(root / p) for p in INPUTS], "build": build}
        (tmp_path / f"{executor}.yaml").write_text(yaml.safe_dump(data))
        cfg = load_experiment(tmp_path / f"{executor}.yaml", base_dir=tmp_path)
        contexts[executor] = Context(cfg, tmp_path / f"run_{executor}")
    assert contexts["ray"].pool_slice == contexts["local"].pool_slice
    for ctx in contexts.values():
        ctx.build_pool(redo=False)
    assert_same_pool(contexts["local"].pool_dir, contexts["ray"].pool_dir)

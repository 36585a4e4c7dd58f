"""Scale-out of featurize: Ray actors on a local cluster (ray.init(num_cpus=2)), SLURM-style slices of one store in
separate processes + --finalize, the store lock and sparse store files. Every scaled-out store must equal the local
executor's, bitwise; so must DSIR and classifier scores computed chunk by chunk on Ray actors, and DsDm scores whose
pool product runs block by block on Ray actors (`dsdm score`, experiment `score: {executor: ray}`), also when a worker
is killed in the middle of a featurize shard, a score block or a DSIR chunk. Featurize killed at each Gram write
resumes to the same files; slices leave one Gram partial per group. The Ray tests skip when Ray is not installed
(pip install 'dsdm[ray]'; `make test` installs it).
Run:
    .venv/bin/python -m pytest -q tests/test_ray.py
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsdm import featurize as F
from dsdm.io import write_json
from dsdm.model import build_model, save_model
from dsdm.pool import Pool, PoolWriter

try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed: pip install 'dsdm[ray]' (make test does)")

FILES = ("features.npy", "q.npy", "done.npy", "gram.npy")
# 23 rows: 5 shards of 5, Gram groups of 2 shards (rows 0-10, 10-20, 20-23), so slices and actors split groups
CFG = dict(proj_dim=64, batch_size=3, shard_size=5, gram_group=2, device="cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 23-example pool, two saved micro proxies and their manifest, and the local executor's stores."""
    root = tmp_path_factory.mktemp("scale")
    rng = np.random.default_rng(0)
    w = PoolWriter(root / "pool", vocab_size=97)
    for i in range(23):
        w.add(rng.integers(0, 97, size=rng.integers(4, 17)), doc_id=f"d{i}", source="s")
    pool = Pool(w.close({"seq_len": 16, "eos_id": 0}, {}))
    import torch

    for m in range(2):
        torch.manual_seed(m)
        save_model(build_model("micro", vocab_size=97, seq_len=16), root / "proxies" / f"proxy_{m}")
    models = ["proxy_0", "proxy_1"]
    write_json(root / "proxies" / "manifest.json", {"pool_fingerprint": pool.fingerprint, "models": models})
    F.run(root / "pool", root / "proxies", root / "local", F.FeaturizeConfig(**CFG))
    return root


def assert_same_stores(a: Path, b: Path) -> None:
    for m in range(2):
        for name in FILES:
            x, y = np.load(a / f"proxy_{m}" / name), np.load(b / f"proxy_{m}" / name)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), f"proxy_{m}/{name}"


def dsdm(*args: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "DSDM_PROGRESS": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "dsdm", *args], env=env, stderr=subprocess.PIPE, text=True)


def featurize_args(root: Path, out: str) -> list[str]:
    sets = [f"--set={k}={v}" for k, v in CFG.items() if k != "proj_dim"]
    return ["featurize", "--pool", str(root / "pool"), "--proxies", str(root / "proxies"), "--out", str(root / out),
            "--proj-dim", str(CFG["proj_dim"]), *sets]  # fmt: skip


# -----------------------------------------------------------------------------
# Without Ray: slices of one store (a SLURM array), the lock, sparse files


def test_slices_in_separate_processes_then_finalize_equal_one_local_run(setup):
    """Three jobs started together on one store (--shard-index I --num-shards 3), then --finalize: bitwise the
    local run. The jobs race to create the store: the exclusive init must keep one set of arrays. Slices split the
    Gram groups (shards 0 | 1-2 | 3-4 against groups 0-1 | 2-3 | 4): whichever finishes a group's last shard writes
    its partial, at most one per group; --finalize alone sums them and deletes them."""
    jobs = [dsdm(*featurize_args(setup, "sliced"), "--shard-index", str(i), "--num-shards", "3") for i in range(3)]
    for job in jobs:
        assert job.wait(timeout=300) == 0, job.stderr.read()
    for m in range(2):
        store = setup / "sliced" / f"proxy_{m}"
        assert not (store / "gram.npy").exists() and not (store / "_done.json").exists()
        assert len(list((store / "grams").glob("*.npy"))) == 3  # = ceil(5 shards / 2): every group reduced once
    fin = dsdm(*featurize_args(setup, "sliced"), "--finalize")
    assert fin.wait(timeout=300) == 0, fin.stderr.read()
    assert_same_stores(setup / "local", setup / "sliced")
    assert (setup / "sliced" / "_done.json").exists() and not (setup / "sliced" / "proxy_0" / "grams").exists()


def test_finalize_refuses_a_store_with_missing_shards(setup):
    job = dsdm(*featurize_args(setup, "half"), "--shard-index", "0", "--num-shards", "2")
    assert job.wait(timeout=300) == 0, job.stderr.read()
    fin = dsdm(*featurize_args(setup, "half"), "--finalize")
    assert fin.wait(timeout=300) == 2
    err = fin.stderr.read()
    assert "shards are not featurized yet" in err and "--shard-index" in err, err
    assert not (setup / "half" / "proxy_0" / "gram.npy").exists()


def test_featurize_killed_at_each_gram_write_resumes_to_the_same_files(setup, tmp_path):
    """SIGKILL (DSDM_FAULT=kill@N) at each atomic write of proxy_0's Gram partials, gram.npy and record, then a plain
    rerun: every file equals the local run's, and no partial is left behind (they are summed again from the stored
    rows when a kill lost them)."""
    count = tmp_path / "count"
    env = {"DSDM_FAULT": f"count={count}"}
    assert dsdm(*featurize_args(setup, str(tmp_path / "ref")), env=env).wait(timeout=300) == 0
    writes = [int(n) for n, path in (line.split("\t", 1) for line in count.read_text().splitlines())
              if "proxy_0/gram" in path or path.endswith("proxy_0/_done.json")]  # fmt: skip
    assert len(writes) == 3 + 1 + 1, writes  # the 3 group partials, gram.npy, the record
    for n in writes:
        out = tmp_path / f"kill{n}"
        job = dsdm(*featurize_args(setup, str(out)), env={"DSDM_FAULT": f"kill@{n}"})
        assert job.wait(timeout=300) == -9, job.stderr.read()
        job = dsdm(*featurize_args(setup, str(out)))
        assert job.wait(timeout=300) == 0, job.stderr.read()
        assert_same_stores(setup / "local", out)
        assert not list(out.rglob("grams")), n


def test_shard_slices_cover_the_plan_exactly():
    plan = [(i, i + 1) for i in range(7)]
    for n in (1, 2, 3, 7, 9):
        got = [sh for i in range(n) for sh in F.shard_slice(plan, i, n)]
        assert got == plan
    with pytest.raises(ValueError, match="--shard-index"):
        F.shard_slice(plan, 3, 3)


def test_a_second_featurize_on_a_store_being_filled_is_refused_naming_the_holder(setup, tmp_path):
    """A whole-store run holds the store exclusively: another whole-store run, a slice and --finalize are refused
    with the holder's pid; slices share it among themselves."""
    store = tmp_path / "store"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from dsdm.featurize import store_lock\n"
         "with store_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)", str(store)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        for shared in (False, True):
            with pytest.raises(F.StoreBusy, match=f"pid {holder.pid} on .*the whole store"):
                with F.store_lock(store, shared=shared):
                    pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with F.store_lock(store, shared=True), F.store_lock(store, shared=True):  # slices cooperate
        with pytest.raises(F.StoreBusy, match="a shard slice"):
            with F.store_lock(store):
                pass
    with F.store_lock(store):  # the killed holder left no stale lock
        pass


def test_store_files_are_sparse_until_written(tmp_path):
    F.init_store(tmp_path, 4096, 1024, "float16")  # 8 MiB of features
    st = os.stat(tmp_path / "features.npy")
    assert st.st_size > 8 << 20 and st.st_blocks * 512 < 1 << 20, (st.st_size, st.st_blocks)
    assert not np.load(tmp_path / "features.npy", mmap_mode="r")[-1].any()  # unwritten rows read as zeros


# -----------------------------------------------------------------------------
# Ray: a local cluster of 2 CPUs


@pytest.fixture(scope="module")
def cluster():
    # workers import this module (KillOnce) by reference: give them the tests folder on their path
    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


@needs_ray
def test_ray_featurize_is_bitwise_the_local_store(setup, cluster):
    F.run(setup / "pool", setup / "proxies", setup / "ray", F.FeaturizeConfig(**CFG, executor="ray"))
    assert_same_stores(setup / "local", setup / "ray")


@needs_ray
def test_ray_featurize_from_the_cli(setup, cluster):
    """--executor ray --ray-address auto joins the running cluster (the one the fixture started)."""
    job = dsdm(*featurize_args(setup, "ray_cli"), "--executor", "ray", "--ray-address", "auto")
    assert job.wait(timeout=300) == 0, job.stderr.read()
    assert_same_stores(setup / "local", setup / "ray_cli")


class KillOnce(F.ShardWorker):
    """A worker that dies (SIGKILL) in the middle of the shard at rows 5-10, once: rows half-written, no Gram."""

    def run(self, start, stop):
        marker = self.store / "killed"
        if start == 5 and not marker.exists():
            marker.write_text("1")
            feats = np.load(self.store / "features.npy", mmap_mode="r+")
            feats[start : start + 2] = 7.0
            feats.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().run(start, stop)


@needs_ray
def test_a_ray_worker_killed_mid_shard_still_yields_the_local_store(setup, cluster):
    from dsdm.model import load_model
    from dsdm.shards import plan_shards, run_on_actors

    cfg, pool = F.FeaturizeConfig(**CFG, executor="ray"), Pool(setup / "pool")
    store = setup / "killed" / "proxy_0"
    model_dir = setup / "proxies" / "proxy_0"
    sketch = F.build_sketch(load_model(model_dir), cfg, 0, "cpu")
    F.init_store(store, len(pool), sketch.dim, cfg.storage_dtype)
    worker = dict(store=str(store), pool_dir=str(pool.path), model_dir=str(model_dir), cfg=cfg, proxy=0, device="cpu",
                  batch_size=cfg.batch_size)  # fmt: skip
    out = run_on_actors(KillOnce, worker, plan_shards(len(pool), cfg.shard_size), num_cpus=1)
    assert (store / "killed").exists() and out == ["done"] * len(out)  # the shard was retried on a new actor
    F.featurize_proxy(pool, load_model(model_dir), store, cfg, 0, "cpu", model_dir=model_dir)  # reduces the Gram
    for name in FILES:
        assert np.load(setup / "local" / "proxy_0" / name).tobytes() == np.load(store / name).tobytes(), name


@needs_ray
def test_ray_without_a_model_dir_is_refused(setup, cluster):
    from dsdm.model import load_model

    cfg = F.FeaturizeConfig(**CFG, executor="ray")
    with pytest.raises(ValueError, match="model_dir"):
        model = load_model(setup / "proxies" / "proxy_0")
        F.featurize_proxy(Pool(setup / "pool"), model, setup / "nodir", cfg, 0, "cpu")


# -----------------------------------------------------------------------------
# DSIR and the classifier over row ranges: fit here, chunks transformed on Ray actors

BASELINE_CASES = [
    ("dsir", {"num_buckets": 512}),  # text, fast hash
    ("dsir", {"num_buckets": 512, "features": "tokens"}),
    ("classifier", {"n_features": 4096, "min_negatives": 50}),
]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The runner's micro data (a 240-example pool, three tasks) and the cooking target texts."""
    from test_experiment import build_micro_data

    from dsdm.baselines import target_texts
    from dsdm.tasks import load_task

    root = tmp_path_factory.mktemp("baselines")
    build_micro_data(root)
    return root, target_texts([load_task(str(root / "tasks" / "cooking"))])


@needs_ray
@pytest.mark.parametrize("method, params", BASELINE_CASES)
def test_ray_baseline_scores_are_bitwise_the_local_scores(micro, cluster, method, params):
    """Local: one 2,048-example chunk. Ray: 7 chunks of 37 rows on 2 actors, parts put back in row order."""
    from dsdm.baselines import ExecutorConfig, fit_and_score, make

    root, targets = micro
    pool = Pool(root / "pool")
    local, local_info = fit_and_score(make(method, params), pool, targets, 0)
    where = ExecutorConfig(executor="ray", chunk_size=37)
    scaled, info = fit_and_score(make(method, params), pool, targets, 0, where)
    assert scaled.dtype == local.dtype and scaled.shape == (len(pool),)
    assert scaled.tobytes() == local.tobytes() and info == local_info
    assert np.unique(scaled).size > 10  # real scores, not a constant both executors would agree on


@needs_ray
def test_ray_baseline_from_the_cli(micro, cluster, tmp_path):
    """`dsdm baseline dsir --executor ray --ray-address auto` joins the running cluster: the same scores.npy and
    indices.npy as a local run, and the same completion record (where it ran is not a setting of the result)."""
    from dsdm.baselines import run

    root, _ = micro
    common = ["--pool", str(root / "pool"), "--target", str(root / "tasks" / "cooking"), "--k", "20"]
    job = dsdm("baseline", "dsir", *common, "--out", str(tmp_path / "ray"), "--set", "num_buckets=512",
               "--executor", "ray", "--ray-address", "auto", "--chunk-size", "50")  # fmt: skip
    assert job.wait(timeout=300) == 0, job.stderr.read()
    run("dsir", root / "pool", 20, tmp_path / "local", [str(root / "tasks" / "cooking")], params={"num_buckets": 512})
    for name in ("scores.npy", "indices.npy"):
        assert np.load(tmp_path / "ray" / name).tobytes() == np.load(tmp_path / "local" / name).tobytes(), name
    ray_done, local_done = (json.loads((tmp_path / d / "_done.json").read_text()) for d in ("ray", "local"))
    assert ray_done["key"] == local_done["key"] and ray_done["outputs"] == local_done["outputs"]


@needs_ray
def test_experiment_baselines_executor_ray(micro, cluster, tmp_path):
    """`baselines: {executor: ray}` in an experiment config scores DSIR on Ray (bitwise the local scores); a
    fastText classifier, which does not pickle, is refused there in one line; an unknown key fails loudly."""
    from dsdm.baselines import fit_and_score, make
    from dsdm.experiment import REPO_ROOT, Context, check_stage_configs, load_experiment

    root, targets = micro
    micro_yaml = REPO_ROOT / "configs" / "micro.yaml"
    assert load_experiment(micro_yaml, base_dir=root).baselines == {}  # absent: local
    cfg = load_experiment(micro_yaml, ["baselines.executor=ray", "baselines.chunk_size=37"], base_dir=root)
    check_stage_configs(cfg)
    ctx = Context(cfg, tmp_path / "run")
    ctx.baseline_scores("scores/dsir_cooking", "dsir", cfg.targets[0], redo=False)
    local, _ = fit_and_score(make("dsir", {"num_buckets": 512}), Pool(root / "pool"), targets, 0)
    assert np.load(tmp_path / "run" / "scores" / "dsir_cooking" / "scores.npy").tobytes() == local.tobytes()

    cfg.method_options["classifier"] = {"backend": "fasttext", "min_negatives": 50}
    with pytest.raises(ValueError, match=r"^Classifier: the fitted estimator cannot be sent to Ray workers"):
        ctx.baseline_scores("scores/classifier_cooking", "classifier", cfg.targets[0], redo=False)
    bad = load_experiment(micro_yaml, ["baselines.executr=ray"], base_dir=root)
    with pytest.raises(ValueError, match="baselines.executr"):
        check_stage_configs(bad)


# -----------------------------------------------------------------------------
# Evaluation models as Ray tasks (experiment `training: {executor: ray}`)


@needs_ray
def test_experiment_training_executor_ray_is_bitwise_the_local_models_and_resumes(micro, cluster, tmp_path):
    """The runner's models trained as Ray tasks (one per model, 1 CPU = 1 torch thread each, two at once on the
    2-CPU cluster) are bitwise the models a local run trains with 1 thread, with the same stage records, evaluations
    and results.csv. A model deleted afterwards is the only one a re-run trains; a missing key fails loudly."""
    import torch

    from dsdm.experiment import REPO_ROOT, load_experiment, requirements, run

    root, _ = micro
    micro_yaml = REPO_ROOT / "configs" / "micro.yaml"
    small = [
        "methods=[random, dsir]",
        "method_options={dsir: {num_buckets: 512}}",
    ]  # 12 models, no proxies: the training stage is the point
    local_cfg = load_experiment(micro_yaml, small, base_dir=root)
    assert local_cfg.training.executor == "local" and "ray" not in requirements(local_cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each Ray task uses: float reductions then round the same way
    try:
        run(local_cfg, tmp_path / "local")
    finally:
        torch.set_num_threads(threads)
    ray_cfg = load_experiment(micro_yaml, small + ["training.executor=ray"], base_dir=root)
    assert requirements(ray_cfg)["ray"] == "ray"
    run(ray_cfg, tmp_path / "ray")

    models = sorted(p.name for p in (tmp_path / "local" / "models").iterdir())
    assert len(models) == 12 and models == sorted(p.name for p in (tmp_path / "ray" / "models").iterdir())
    weights = {}
    for name in models:
        a, b = (tmp_path / d / "models" / name for d in ("local", "ray"))
        weights[name] = (b / "model.safetensors").read_bytes()
        assert weights[name] == (a / "model.safetensors").read_bytes(), name
        ra, rb = (json.loads((d / "_done.json").read_text())["run"] for d in (a, b))
        assert ra == rb, name
    assert len(set(weights.values())) == len(models)  # twelve different models, not one both executors agree on
    assert (tmp_path / "ray" / "results.csv").read_bytes() == (tmp_path / "local" / "results.csv").read_bytes()

    def stamps(stage: str, file: str) -> dict:
        return {n: (tmp_path / "ray" / stage / n / file).stat().st_mtime_ns for n in models}

    gone, gone_eval = tmp_path / "ray" / "models" / models[3], tmp_path / "ray" / "eval" / models[5]
    metrics = (gone_eval / "metrics.json").read_bytes()
    before = stamps("models", "model.safetensors"), stamps("eval", "metrics.json")
    shutil.rmtree(gone)
    shutil.rmtree(gone_eval)
    run(ray_cfg, tmp_path / "ray")
    assert (gone / "model.safetensors").read_bytes() == weights[models[3]]
    assert (gone_eval / "metrics.json").read_bytes() == metrics
    after = stamps("models", "model.safetensors"), stamps("eval", "metrics.json")
    assert [n for n in models if after[0][n] != before[0][n]] == [models[3]]  # the one model, not its evaluation
    assert [n for n in models if after[1][n] != before[1][n]] == [models[5]]
    with pytest.raises(ValueError, match="training.cpus_per_modle"):
        load_experiment(micro_yaml, ["training.cpus_per_modle=2"], base_dir=root)


# -----------------------------------------------------------------------------
# Proxies side by side: one Ray task per proxy (dsdm.proxies, executor ray)

PROXY_TRAIN = {"preset": "micro", "steps": 6, "batch_size": 4, "device": "cpu", "log_every": 1}


def _tree(d: Path) -> dict[str, bytes]:
    """Every file under d except the records (they hold timestamps), by relative path."""
    return {
        str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file() and f.name != "_done.json"
    }


@needs_ray
def test_ray_proxies_are_bitwise_the_local_1_thread_proxies_and_resume(cluster, tmp_path):
    """3 proxies with a snapshot each as Ray tasks on the 2-CPU cluster (two at once, 1 CPU = 1 torch thread each):
    every file (subsets, weights, optimizer state, snapshots, manifest) is bitwise the local run's with 1 thread, and
    the stage records' keys are equal, so switching the executor recomputes nothing. A proxy deleted afterwards is the
    only one a re-run trains, to the same bytes."""
    import torch
    from test_models import _pool

    from dsdm.proxies import ProxiesConfig, run

    pool = _pool(tmp_path / "pool")
    common = dict(n=3, fraction=0.5, seed=4, train=PROXY_TRAIN, snapshots=[0.5])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each Ray task uses: float reductions then round the same way
    try:
        run(pool.path, tmp_path / "local", ProxiesConfig(**common))
    finally:
        torch.set_num_threads(threads)
    ray_cfg = ProxiesConfig(**common, executor="ray", ray_worker_cpus=1)
    run(pool.path, tmp_path / "ray", ray_cfg)
    local, ray_files = _tree(tmp_path / "local"), _tree(tmp_path / "ray")
    assert local == ray_files and len(local) > 3 * 4
    weights = [local[f"proxy_{m}/model.safetensors"] for m in range(3)]
    assert len(set(weights)) == 3  # three different proxies, not one both executors agree on
    a, b = (json.loads((tmp_path / d / "_done.json").read_text())["key"] for d in ("local", "ray"))
    assert a == b
    stamp = (tmp_path / "local" / "_done.json").stat().st_mtime_ns
    run(pool.path, tmp_path / "local", ray_cfg)  # the local run's record satisfies the Ray config: nothing to do
    assert (tmp_path / "local" / "_done.json").stat().st_mtime_ns == stamp

    gone = tmp_path / "ray" / "proxy_1"
    before = {m: (tmp_path / "ray" / f"proxy_{m}" / "_done.json").stat().st_mtime_ns for m in (0, 2)}
    shutil.rmtree(gone)
    (tmp_path / "ray" / "_done.json").unlink()  # as if the run had died before the stage finished
    run(pool.path, tmp_path / "ray", ray_cfg)
    assert _tree(tmp_path / "ray") == local and (tmp_path / "ray" / "_done.json").exists()
    assert {m: (tmp_path / "ray" / f"proxy_{m}" / "_done.json").stat().st_mtime_ns for m in (0, 2)} == before
    with pytest.raises(ValueError, match="executor must be local or ray"):
        ProxiesConfig(executor="spark")


@needs_ray
def test_experiment_proxy_executor_ray_keeps_the_stage_key(micro, cluster, tmp_path):
    """`proxy: {executor: ray, ...}` in an experiment config names Ray before any work and leaves the proxies
    stage's key (and so every stage downstream) the local one's."""
    from dsdm.experiment import REPO_ROOT, Context, load_experiment, plan, requirements

    root, _ = micro
    micro_yaml = REPO_ROOT / "configs" / "micro.yaml"
    keys = []
    for sets in ([], ["proxy.executor=ray", "proxy.ray_address=auto", "proxy.ray_worker_cpus=1"]):
        cfg = load_experiment(micro_yaml, sets, base_dir=root)
        assert ("ray" in requirements(cfg)) == bool(sets)
        out = tmp_path / str(len(sets))
        out.mkdir()
        keys.append(plan(Context(cfg, out))[2])
    assert keys[0] == keys[1] and "proxies" in keys[0]


# -----------------------------------------------------------------------------
# DsDm scoring: the pool product u = G W, all targets in one pass, over row blocks on Ray actors


def test_score_product_does_not_depend_on_the_blas_thread_count():
    """The CPU pool product runs under a 1-thread BLAS limit: a 2-thread limit outside gives the same bits. Without
    it, OpenBLAS rounds this product differently with 1 and 2 threads (and a block's last rows differently from the
    same rows inside a block), so Ray actors could not reproduce a local run on another core count."""
    from threadpoolctl import threadpool_limits

    from dsdm.datamodel import stream_scores

    rng = np.random.default_rng(0)
    features = rng.standard_normal((20003, 500)).astype(np.float32)
    W = rng.standard_normal((500, 3))
    with threadpool_limits(1, user_api="blas"):
        one = stream_scores(features, W, block=8192)
    with threadpool_limits(2, user_api="blas"):
        two = stream_scores(features, W, block=8192)
    assert one.tobytes() == two.tobytes()
    assert np.allclose(one, features.astype(np.float64) @ W, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def scored(micro):
    """2 proxies (10 steps each) and their factorized feature store of the micro pool, through the CLI, and the
    `dsdm score` arguments for two targets (cooking, sports) scored in one pass."""
    from dsdm.cli import main

    root, _ = micro
    pool, run = root / "pool", root / "dsdm"
    train = ["--set", "train.preset=micro", "--set", "train.steps=10", "--set", "train.batch_size=16"]
    assert main(["proxies", "train", "--pool", str(pool), "--out", str(run / "proxies"), "--n", "2"] + train) == 0
    feat = ["featurize", "--pool", str(pool), "--proxies", str(run / "proxies"), "--out", str(run / "features")]
    assert main(feat + ["--proj-dim", "64", "--set", "batch_size=32"]) == 0
    tasks = [str(root / "tasks" / t) for t in ("cooking", "sports")]
    return run, ["score", "--features", str(run / "features"), "--target", *tasks, "--device", "cpu"]


@needs_ray
@pytest.mark.parametrize("variant", [[], ["--set", "normalize=both", "--set", "kernel=per_layer"]])
def test_ray_score_from_the_cli_is_bitwise_the_local_scores(scored, cluster, tmp_path, variant):
    """`dsdm score --set executor=ray --set ray_address=auto` joins the running cluster: the 240 rows in blocks of 37
    (7 row ranges on 2 actors) give the local run's score file, per-task scores and sidecar, bitwise. With
    normalize=both the unit-norm Gram pass stays in the driver; only the product runs on Ray."""
    run, args = scored
    sets = ["--set", "block=37", *variant]
    local = dsdm(*args, "--out", str(tmp_path / "local.npy"), *sets)
    assert local.wait(timeout=300) == 0, local.stderr.read()
    job = dsdm(*args, "--out", str(tmp_path / "ray.npy"), *sets, "--set", "executor=ray", "--set", "ray_address=auto")
    assert job.wait(timeout=300) == 0, job.stderr.read()
    assert "[dsdm] ray:" in job.stderr.read()  # it joined the cluster (the local run never imports Ray)
    for suffix in (".npy", ".tasks.npy"):
        a, b = np.load(tmp_path / f"local{suffix}"), np.load(tmp_path / f"ray{suffix}")
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), suffix
    assert np.load(tmp_path / "ray.tasks.npy").shape == (240, 2) and np.unique(np.load(tmp_path / "ray.npy")).size > 100
    sidecars = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "ray")]
    assert sidecars[0] == sidecars[1] and "executor" not in sidecars[1]["config"]


@needs_ray
def test_stream_scores_ray_is_the_local_loop_and_refuses_an_in_memory_array(scored, cluster):
    """Row ranges of 37 and of 1 (a block per row: each actor call is a 1-row product, the local loop's too)."""
    from dsdm.datamodel import ScoreConfig, stream_scores, stream_scores_ray

    run, _ = scored
    features = np.load(run / "features" / "proxy_0" / "features.npy", mmap_mode="r")
    W = np.random.default_rng(1).standard_normal((features.shape[1], 3))
    for block in (37, 1):
        got = stream_scores_ray(features, W, ScoreConfig(executor="ray", block=block))
        assert got.tobytes() == stream_scores(features, W, block).tobytes(), block
    with pytest.raises(ValueError, match="reads the feature store from its path"):
        stream_scores_ray(np.asarray(features), W, ScoreConfig(executor="ray"))
    with pytest.raises(ValueError, match="score.executor must be local or ray"):
        ScoreConfig(executor="spark")


@needs_ray
def test_experiment_score_executor_ray_keeps_the_stage_key(micro, scored, cluster, tmp_path):
    """`score: {executor: ray, ray_address: auto, ray_worker_cpus: 1}` in an experiment config: the scores/dsdm stage
    key is the local one (a finished run does not go stale), and the stage's files are bitwise the local stage's."""
    from dsdm.experiment import REPO_ROOT, Context, check_stage_configs, load_experiment, plan

    root, _ = micro
    run, _ = scored
    micro_yaml = REPO_ROOT / "configs" / "micro.yaml"
    ray_sets = ["score.executor=ray", "score.ray_address=auto", "score.ray_worker_cpus=1"]
    keys, outs = [], []
    for name, sets in (("local", []), ("ray", ray_sets)):
        cfg = load_experiment(micro_yaml, ["score.block=37", *sets], base_dir=root)
        check_stage_configs(cfg)
        out = tmp_path / name
        out.mkdir()
        (out / "features").symlink_to(run / "features")
        ctx = Context(cfg, out)
        keys.append(plan(ctx)[2]["scores/dsdm"])
        ctx.estimator_scores("scores/dsdm", redo=False)
        outs.append(out / "scores" / "dsdm")
    assert keys[0] == keys[1]
    for target in ("cooking", "mix"):
        for suffix in (".npy", ".tasks.npy"):
            a, b = (np.load(d / f"{target}{suffix}") for d in outs)
            assert a.tobytes() == b.tobytes(), target + suffix
    bad = load_experiment(micro_yaml, ["score.executor=spark"], base_dir=root)
    with pytest.raises(ValueError, match="score.executor must be local or ray"):
        check_stage_configs(bad)


# -----------------------------------------------------------------------------
# A Ray worker killed in the middle of a scoring task: the actor is restarted and its task retried (run_on_actors:
# max_restarts, max_task_retries), so DsDm and DSIR scores still equal the local ones


def kill_once(base: type, marker: Path, at: int) -> type:
    """`base` (a run_on_actors worker) whose process SIGKILLs itself once, inside its call on the range starting at
    row `at`, before it returns. Defined here, so Ray ships the subclass (and `marker`) by value."""

    class KillOnceWorker(base):
        def run(self, start, stop):
            if start == at and not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return super().run(start, stop)

    return KillOnceWorker


@needs_ray
def test_a_ray_worker_killed_mid_block_still_yields_the_local_dsdm_scores(scored, cluster, tmp_path, monkeypatch):
    from dsdm import datamodel

    run, _ = scored
    features = np.load(run / "features" / "proxy_0" / "features.npy", mmap_mode="r")
    W = np.random.default_rng(2).standard_normal((features.shape[1], 3))
    marker = tmp_path / "killed"
    monkeypatch.setattr(datamodel, "RowBlockWorker", kill_once(datamodel.RowBlockWorker, marker, at=74))
    got = datamodel.stream_scores_ray(features, W, datamodel.ScoreConfig(executor="ray", block=37))
    assert marker.exists()  # a worker died mid-block; its block was redone by a restarted actor
    assert got.tobytes() == datamodel.stream_scores(features, W, 37).tobytes()


@needs_ray
def test_a_ray_worker_killed_mid_chunk_still_yields_the_local_dsir_scores(micro, cluster, tmp_path, monkeypatch):
    import dsdm.baselines as B

    root, targets = micro
    pool = Pool(root / "pool")
    local, local_info = B.fit_and_score(B.make("dsir", {"num_buckets": 512}), pool, targets, 0)
    marker = tmp_path / "killed"
    monkeypatch.setattr(B, "ChunkWorker", kill_once(B.ChunkWorker, marker, at=74))
    where = B.ExecutorConfig(executor="ray", chunk_size=37)
    scaled, info = B.fit_and_score(B.make("dsir", {"num_buckets": 512}), pool, targets, 0, where)
    assert marker.exists()
    assert scaled.tobytes() == local.tobytes() and info == local_info

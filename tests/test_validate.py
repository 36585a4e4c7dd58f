"""dsdm.validate: the LDS and its orientation on planted data, its decompositions (by source, by ensemble size), and
`dsdm validate-lds` end to end on a micro pool through the CLI (proxies -> featurize -> validate-lds).

Run: .venv/bin/python -m pytest -q tests/test_validate.py
"""

import csv
import hashlib
import json

import numpy as np
import pytest

from dsdm.datamodel import ScoreConfig
from dsdm.lds_sweep import SweepConfig, held_out_choice
from dsdm.model import load_model
from dsdm.pool import Pool
from dsdm.select import balanced_top_k, top_k
from dsdm.tasks import encode_examples, load_task
from dsdm.validate import continuation_loss, lds, lds_by_ensemble_size, lds_by_group, rescore, subset_predictions


def _subsets(n=200, count=30, size=50, seed=0):
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n, size, replace=False)) for _ in range(count)]


def test_lds_orientation_helpful_scores_predict_low_loss():
    """Loss = -(sum of true helpfulness) exactly: scores equal to the helpfulness give LDS = +1, negated scores -1."""
    rng = np.random.default_rng(1)
    helpful = rng.normal(size=200)
    subsets = _subsets()
    losses = 10.0 - subset_predictions(helpful, subsets)
    assert lds(subset_predictions(helpful, subsets), losses) == pytest.approx(1.0)
    assert lds(subset_predictions(-helpful, subsets), losses) == pytest.approx(-1.0)
    np.testing.assert_allclose(subset_predictions(helpful, subsets[:1]), [helpful[subsets[0]].sum()])


def test_lds_by_group_separates_composition_from_within_source_noise():
    """Planted: the loss depends only on how many source-'good' examples a subset holds; the scores are the right
    source means plus large within-source noise. 'between' recovers LDS = 1, 'within' carries no signal."""
    rng = np.random.default_rng(2)
    groups = np.array(["good"] * 100 + ["bad"] * 100)
    subsets = _subsets(count=40)
    losses = np.array([-(s < 100).sum() for s in subsets], dtype=float)
    scores = np.where(groups == "good", 0.5, -0.5) + rng.normal(0, 1.0, 200)
    parts = lds_by_group(scores, groups, subsets, losses)
    assert parts["between"] == pytest.approx(1.0)
    assert abs(parts["within"]) < 0.5
    assert lds(subset_predictions(scores, subsets), losses) < 0.9  # the noise hides the signal in the plain LDS


def test_lds_by_ensemble_size_averages_the_first_m_proxies():
    """Four proxies = the truth plus independent noise each: the ensembles of 1, 2, 4 are evaluated, and the LDS of the
    full ensemble equals the LDS computed by hand from the mean of the four."""
    rng = np.random.default_rng(3)
    truth = rng.normal(size=200)
    subsets = _subsets(count=40)
    losses = -subset_predictions(truth, subsets)
    us = [truth + rng.normal(0, 3.0, 200) for _ in range(4)]
    qs = [np.ones(200)] * 4
    by_m = lds_by_ensemble_size(us, qs, subsets, losses)
    assert sorted(by_m) == [1, 2, 4]
    assert by_m[4] == pytest.approx(lds(subset_predictions(np.mean(us, 0), subsets), losses))
    assert by_m[4] > by_m[1]  # averaging independent noise: measured 0.38 -> 0.64 with this seed
    assert sorted(lds_by_ensemble_size(us[:3], qs[:3], subsets, losses)) == [1, 2, 3]


@pytest.mark.filterwarnings("ignore:An input array is constant")  # the planted constant score
def test_held_out_choice_picks_on_one_block_and_reads_the_other():
    """Planted case: task a's losses are exactly minus the subset sums of variant good's scores, task b's of variant
    bad's. The choice on subsets 0-5 picks good for a and bad for b; the reported LDS is the chosen variant's on
    subsets 6-11 (here 1.0), computed directly. A constant score (undefined LDS) never wins, and an identical copy
    listed later loses the tie."""
    rng = np.random.default_rng(0)
    good, bad = rng.normal(size=30), rng.normal(size=30)
    subsets = [rng.choice(30, 10, replace=False) for _ in range(12)]
    loss_a, loss_b = -subset_predictions(good, subsets), -subset_predictions(bad, subsets)
    run = {"subsets": subsets, "tasks": {"a": ("a", loss_a, loss_a + 1), "b": ("b", loss_b, loss_b)}}
    scores = {
        "const": np.zeros((30, 2)),
        "good": np.stack([good, good], 1),
        "bad": np.stack([bad, bad], 1),
        "good_copy": np.stack([good, good], 1),
    }
    chosen = held_out_choice(scores, run, [0, 6])
    assert (chosen["a"][0], chosen["b"][0]) == ("good", "bad")
    _, summary, n_rest = chosen["a"]
    assert n_rest == 6 and summary["lds_target"] == pytest.approx(
        lds(subset_predictions(good, subsets[6:]), loss_a[6:])
    )
    assert summary["lds_target"] == pytest.approx(1.0) and summary["lds_holdout"] == pytest.approx(1.0)
    assert held_out_choice(scores, run, [3, 9])["b"][0] == "bad"  # a block in the middle: the rest is both ends
    with pytest.raises(ValueError, match="outside it"):
        held_out_choice(scores, run, [0, 10])
    with pytest.raises(ValueError, match="choose_on must be"):
        SweepConfig(choose_on=[0, 2])


def test_rescore_gives_other_scores_an_lds_on_the_measured_models(tmp_path):
    """A fake validate-lds directory whose losses follow a known helpfulness h: rescoring h gives a high LDS, -h the
    mirror image, noise ~0; a score file of the wrong length is refused, naming the file."""
    rng = np.random.default_rng(0)
    n, subsets = 200, _subsets()
    h = rng.normal(size=n)
    out = tmp_path / "lds"
    (out / "subsets").mkdir(parents=True)
    losses = []
    for j, s in enumerate(subsets):
        np.save(out / "subsets" / f"subset_{j}.npy", s)
        loss = 8.0 - 0.01 * h[s].sum() + rng.normal(scale=0.005)
        losses.append({"target": loss, "holdout": loss + rng.normal(scale=0.005)})
    (out / "lds.json").write_text(json.dumps({"losses": losses}))
    np.save(out / "scores.npy", np.zeros(n, dtype=np.float32))
    files = {}
    for name, v in {"h": h, "neg": -h, "noise": rng.normal(size=n)}.items():
        files[name] = tmp_path / f"{name}.npy"
        np.save(files[name], v.astype(np.float32))
    rows = {r["scores"]: r for r in rescore(out, [files["h"], files["neg"], files["noise"]])}
    assert rows[str(files["h"])]["lds_target"] > 0.8 and rows[str(files["h"])]["lds_target_p"] < 1e-6
    assert rows[str(files["neg"])]["lds_target"] == pytest.approx(-rows[str(files["h"])]["lds_target"])
    assert abs(rows[str(files["noise"])]["lds_target"]) < 0.5
    np.save(tmp_path / "short.npy", h[:-1])
    with pytest.raises(ValueError, match="short.npy"):
        rescore(out, [tmp_path / "short.npy"])


def _micro_features(tmp_path, proxies: int, steps: int):
    """The micro data (test_experiment.build_micro_data), `proxies` micro proxies trained `steps` steps and their
    k = 64 factorized features under tmp_path/run. -> (pool dir, run dir, the trainer's --set arguments)."""
    from test_experiment import build_micro_data

    from dsdm.cli import main

    build_micro_data(tmp_path)
    pool, run = tmp_path / "pool", tmp_path / "run"
    train = ["--set", "train.preset=micro", "--set", f"train.steps={steps}", "--set", "train.batch_size=16"]
    proxies_args = ["proxies", "train", "--pool", str(pool), "--out", str(run / "proxies"), "--n", str(proxies)]
    assert main(proxies_args + train) == 0
    feat = ["featurize", "--pool", str(pool), "--proxies", str(run / "proxies"), "--out", str(run / "features")]
    assert main(feat + ["--proj-dim", "64", "--set", "batch_size=32"]) == 0
    return pool, run, train


def test_validate_lds_cli_end_to_end(tmp_path, capsys):
    """micro pool -> 2 proxies -> factorized features -> validate-lds with 4 subsets and the sanity arms: lds.json has
    the LDS in [-1, 1], one entry per ensemble size, the by-source split and the three sanity arms. Then `dsdm score`
    refuses the store once its manifest claims an older sketch version."""
    from dsdm.cli import main

    pool, run, train = _micro_features(tmp_path, proxies=2, steps=10)
    lds_args = ["validate-lds", "--pool", str(pool), "--features", str(run / "features")]
    lds_args += ["--target", str(tmp_path / "tasks" / "cooking"), "--out", str(run / "lds")]
    sports = str(tmp_path / "tasks" / "sports")
    more = ["--set", "sanity_fraction=0.2", "--set", f"eval_tasks=[{sports}]"]
    assert main(lds_args + ["--subsets", "4", "--fraction", "0.5"] + train + more) == 0
    assert "LDS" in capsys.readouterr().out
    rec = json.loads((run / "lds" / "lds.json").read_text())
    assert -1 <= rec["lds_target"] <= 1 and 0 <= rec["lds_target_p"] <= 1
    assert sorted(rec["lds_target_by_proxies"]) == ["1", "2"]
    assert rec["lds_target_by_proxies"]["2"] == pytest.approx(rec["lds_target"])
    assert set(rec["lds_target_by_source"]) == {"between", "within"}
    assert set(rec["sanity"]["losses"]) == {"top_k", "random", "bottom_k"}
    assert len(rec["predictions"]) == 4 and len(list((run / "lds" / "subsets").glob("*.npy"))) == 4

    # the measured models can score other score files; the run's own scores give back the run's own LDS
    assert main(["lds-rescore", "--lds", str(run / "lds"), "--scores", str(run / "lds" / "scores.npy")]) == 0
    assert f"| {rec['lds_target']:+.3f} |" in capsys.readouterr().out

    # every model was also evaluated on the sports task; the sweep scores variants on the same models. Its default
    # row reproduces the run's own LDS (same scores, same losses); a variant that changes nothing gives the same row;
    # the ensemble of the first proxy equals lds_target_by_proxies["1"]; DSIR enters as a row.
    assert set(rec["losses_by_task"]) == {"cooking", "sports"} and len(rec["losses_by_task"]["sports"]) == 4
    variants = tmp_path / "variants.yaml"
    same = f"same: {{ridge: {ScoreConfig().ridge!r}}}\n"  # the default ridge, written out
    variants.write_text(f"default: {{}}\n{same}first: {{num_proxies: 1}}\ncos: {{normalize: both}}\n")
    sweep = ["lds-sweep", "--lds", str(run / "lds"), "--features", str(run / "features"), "--variants", str(variants)]
    assert main(sweep + ["--out", str(run / "sweep"), "--set", "regime=micro test", "--set", "device=cpu"]) == 0
    capsys.readouterr()
    rows = {(r["variant"], r["target"]): r for r in csv.DictReader(open(run / "sweep" / "sweep.csv"))}
    assert set(rows) == {(v, t) for v in ("default", "same", "first", "cos", "dsir") for t in ("cooking", "sports")}
    assert float(rows["default", "cooking"]["lds"]) == pytest.approx(rec["lds_target"], abs=1e-4)
    assert float(rows["first", "cooking"]["lds"]) == pytest.approx(rec["lds_target_by_proxies"]["1"], abs=1e-4)
    assert rows["same", "sports"]["lds"] == rows["default", "sports"]["lds"]
    assert rows["default", "sports"]["regime"] == "micro test" and rows["cos", "cooking"]["subsets"] == "4"

    # a slice of the subsets (a held-out confirmation): the run's own predictions and losses on subsets 1..3
    assert main(sweep + ["--out", str(run / "sweep-late"), "--set", "subset_range=[1,4]", "--set", "device=cpu"]) == 0
    late = {(r["variant"], r["target"]): r for r in csv.DictReader(open(run / "sweep-late" / "sweep.csv"))}
    target = [r["target"] for r in rec["losses"]][1:]
    assert float(late["default", "cooking"]["lds"]) == pytest.approx(
        lds(np.array(rec["predictions"][1:]), target), abs=1e-4
    )
    assert late["default", "cooking"]["subsets"] == "3"

    # selection arms: each (variant, task) trains on what the variant keeps; the top-k arm's training indices are
    # exactly top_k of the variant's scores (`dsdm score`, the same code), k = round(0.2 N), and two variants with
    # the same scores share one selection and so one loss; the random reference is the mean of its arms
    arms = ["--set", "topk_fraction=0.2", "--set", "random_arms=2", "--set", "device=cpu"]
    variants.write_text(
        variants.read_text() + "cold: {select: {rule: tempered, temperature: 1.0e-6}}\n"
        "bal: {select: {rule: balanced, by: source}}\n"
    )
    assert main(sweep + ["--out", str(run / "sweep-arms")] + arms) == 0
    printed = capsys.readouterr().out
    rows = {(r["variant"], r["target"]): r for r in csv.DictReader(open(run / "sweep-arms" / "sweep.csv"))}
    d = rows["default", "cooking"]
    delta = float(d["topk_loss"]) - float(d["random_loss"])
    assert f"| default | {float(d['lds']):+.3f} ({float(d['p']):.2g}); Δ {delta:+.3f} |" in printed
    assert f"| random arms: loss ± s.e. | {float(d['random_loss']):.3f} ± " in printed
    n = len(np.load(run / "lds" / "scores.npy"))
    assert {r["k"] for r in rows.values()} == {str(round(0.2 * n))}
    assert rows["same", "sports"]["topk_loss"] == rows["default", "sports"]["topk_loss"]
    assert rows["dsir", "cooking"]["random_loss"] == rows["default", "cooking"]["random_loss"]
    assert float(rows["default", "cooking"]["random_loss_se"]) > 0 and float(rows["cos", "sports"]["topk_loss"]) > 0
    cooking = str(tmp_path / "tasks" / "cooking")
    assert main(["score", "--features", str(run / "features"), "--target", cooking, "--out", str(run / "d.npy")]) == 0
    kept = np.sort(top_k(np.load(run / "d.npy"), round(0.2 * n)))
    arm = f"k{kept.size}_{hashlib.sha256(kept.tobytes()).hexdigest()[:16]}"  # arms are named by their indices
    record = json.loads((run / "sweep-arms" / "arms" / arm / "_done.json").read_text())
    assert record["config"]["indices_sha256"] == hashlib.sha256(kept.tobytes()).hexdigest()
    # the other rules: a near-zero temperature is top-k; balanced keeps each source's share of the pool
    assert rows["cold", "cooking"]["topk_loss"] == rows["default", "cooking"]["topk_loss"]
    sources = np.asarray(Pool(pool).meta.column("source").to_pylist(), dtype=object).astype(str)
    kept = np.sort(balanced_top_k(np.load(run / "d.npy"), sources, round(0.2 * n)))
    arm = f"k{kept.size}_{hashlib.sha256(kept.tobytes()).hexdigest()[:16]}"  # arms are named by their indices
    record = json.loads((run / "sweep-arms" / "arms" / arm / "_done.json").read_text())
    assert record["config"]["indices_sha256"] == hashlib.sha256(kept.tobytes()).hexdigest()
    # arm_seeds = 2: every arm is the mean of two models on the same indices. The first is the one-seed sweep's model
    # (same seed, same bytes), the second another seed; the loss is their mean, recomputed here from the saved models
    (tmp_path / "default.yaml").write_text("default: {}\n")
    two = sweep[:-1] + [str(tmp_path / "default.yaml"), "--out", str(run / "sweep-arms2"), "--set", "baselines=[]"]
    assert main(two + arms + ["--set", "arm_seeds=2"]) == 0
    capsys.readouterr()
    rows2 = {(r["variant"], r["target"]): r for r in csv.DictReader(open(run / "sweep-arms2" / "sweep.csv"))}
    kept = np.sort(top_k(np.load(run / "d.npy"), round(0.2 * n)))
    name = f"k{kept.size}_{hashlib.sha256(kept.tobytes()).hexdigest()[:16]}"
    seeds = [run / "sweep-arms2" / "arms" / name, run / "sweep-arms2" / "arms" / f"{name}_r1"]
    weights = [d / "model.safetensors" for d in (run / "sweep-arms" / "arms" / name, *seeds)]
    assert weights[0].read_bytes() == weights[1].read_bytes() != weights[2].read_bytes()
    p = Pool(pool)
    tok, _, sc = encode_examples(p.tokenizer, load_task(cooking).split("holdout"), p.seq_len, p.eos_id)
    each = [float(continuation_loss(load_model(d), tok, sc, "cpu").mean()) for d in seeds]
    assert float(rows2["default", "cooking"]["topk_loss"]) == pytest.approx(np.mean(each), abs=1e-4)
    assert float(rows["default", "cooking"]["topk_loss"]) == pytest.approx(each[0], abs=1e-4)
    assert main(two + arms + ["--set", "arm_seeds=0"]) == 2
    assert "arm_seeds must be >= 1" in capsys.readouterr().err
    variants.write_text("hot: {select: {rule: tempered, temp: 2}}\n")
    assert main(sweep + ["--out", str(run / "sweep3")] + arms) == 2
    assert "variant hot: select must be" in capsys.readouterr().err
    assert not (run / "sweep3").exists()  # refused before any work

    variants.write_text("bad: {normalise: pool}\n")
    assert main(sweep + ["--out", str(run / "sweep2")]) == 2
    assert "variant bad: normalise" in capsys.readouterr().err

    # features from another version of the random projection are refused, not silently mis-scored
    manifest = json.loads((run / "features" / "manifest.json").read_text())
    (run / "features" / "manifest.json").write_text(json.dumps({**manifest, "sketch_version": 1}))
    score = ["score", "--features", str(run / "features"), "--target", str(tmp_path / "tasks" / "cooking")]
    assert main(score + ["--out", str(run / "s.npy")]) == 2
    assert "sketch version 1" in capsys.readouterr().err


def test_train_seeds_average_replicas_whose_first_is_the_single_seed_model(tmp_path):
    """validate.train_seeds = 2: replica 0 of every subset is bitwise the model of train_seeds = 1 (same seed, same
    subset), replica 1 another seed; a subset's loss is the replicas' mean, each replica's losses are recorded with
    their agreement (docs/estimator.md round 11)."""
    from dsdm.cli import main
    from dsdm.validate import replica_agreement, replica_seed, train_seed

    pool, run, train = _micro_features(tmp_path, proxies=1, steps=6)
    base = ["validate-lds", "--pool", str(pool), "--features", str(run / "features"), "--subsets", "3"]
    base += ["--target", str(tmp_path / "tasks" / "cooking"), "--set", "sanity_fraction=0"] + train
    assert main(base + ["--out", str(run / "one")]) == 0
    assert main(base + ["--out", str(run / "two"), "--set", "train_seeds=2"]) == 0
    one, two = (json.loads((run / d / "lds.json").read_text()) for d in ("one", "two"))
    for j in range(3):
        a, b = (run / d / "models" / f"lds_{j}" / "model.safetensors" for d in ("one", "two"))
        assert a.read_bytes() == b.read_bytes()
        r1 = run / "two" / "models" / f"lds_{j}_r1" / "model.safetensors"
        assert r1.read_bytes() != a.read_bytes()
    replicas = two["losses_by_replica"]["cooking"]
    assert [row["target"] for row in replicas[0]] == [row["target"] for row in one["losses"]]
    for j, row in enumerate(two["losses"]):
        assert row["target"] == pytest.approx((replicas[0][j]["target"] + replicas[1][j]["target"]) / 2)
    assert -1 <= two["replica_agreement"]["cooking"]["target"] <= 1 and "replica_agreement" not in one
    # the sweep reads the LDS against a chosen group of seeds: replica 0 alone is the single-seed run's LDS, replica 1
    # alone is the LDS of the same predictions against replica 1's recorded losses
    (tmp_path / "default.yaml").write_text("default: {}\n")
    sweep = ["lds-sweep", "--lds", str(run / "two"), "--features", str(run / "features"), "--set", "device=cpu"]
    sweep += ["--variants", str(tmp_path / "default.yaml"), "--set", "baselines=[]"]
    for r, expected in (
        (0, one["lds_target"]),
        (1, lds(np.array(two["predictions"]), [x["target"] for x in replicas[1]])),
    ):
        assert main(sweep + ["--out", str(run / f"sweep-r{r}"), "--set", f"replicas=[{r}]"]) == 0
        rows = {(x["variant"], x["target"]): x for x in csv.DictReader(open(run / f"sweep-r{r}" / "sweep.csv"))}
        assert float(rows["default", "cooking"]["lds"]) == pytest.approx(expected, abs=1e-4)
    assert main(sweep + ["--out", str(run / "sweep-r2"), "--set", "replicas=[2]"]) == 2  # only 2 seeds were trained
    one_sweep = [a if a != str(run / "two") else str(run / "one") for a in sweep]  # a single-seed run: replica 0 only
    assert main(one_sweep + ["--out", str(run / "sweep-one-r0"), "--set", "replicas=[0]"]) == 0
    assert main(one_sweep + ["--out", str(run / "sweep-one-r1"), "--set", "replicas=[1]"]) == 2
    # seeds: replica 0 keeps the single-seed rule, the others never reuse another model's seed
    from dsdm.validate import ValidateConfig

    cfg = ValidateConfig(shared_train_seed=False)
    assert replica_seed(cfg, 7, 0) == train_seed(cfg, 7)
    assert len({replica_seed(cfg, j, r) for j in range(50) for r in range(3)}) == 150
    assert replica_agreement(np.array([[1.0, 2.0, 3.0], [1.5, 2.5, 3.5]])) == pytest.approx(1.0)

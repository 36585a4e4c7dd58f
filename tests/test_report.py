"""dsdm.report: aggregation, the equivalent-compute interpolation, and rendering (HTML parses, every image exists).

The rendering test writes a results.csv by hand: it checks the report machinery on a known table, it is not a result.
The end-to-end test in tests/test_experiment.py renders the report of a real micro run.
Run: .venv/bin/python -m pytest -q tests/test_report.py
"""

import csv
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from dsdm.report import aggregate, comparison_table, equivalent_compute, head_to_head_table, main_cells, render
from dsdm.results import COLUMNS as RESULT_COLUMNS
from dsdm.results import UNTARGETED_NAME
from dsdm.results import read as read_results


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables, self.stack = [], 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag == "table":
            self.tables += 1
        if tag not in ("img", "meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>, open: {self.stack[-3:]}"
        self.stack.pop()


def check_report(run_dir: Path) -> _Collector:
    """report.html parses with balanced tags, has tables, and every <img> points at an existing non-empty PNG."""
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], f"unclosed tags {parser.stack}"
    assert parser.tables >= 2 and parser.images
    for src in parser.images:
        png = run_dir / src
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    for src in parser.images:
        assert f"]({src})" in md
    return parser


def test_equivalent_compute_interpolates_in_log_compute():
    curve = [(1.0, 4.0, 0.0), (2.0, 3.0, 0.0), (4.0, 2.5, 0.0)]
    assert equivalent_compute(4.0, curve) == (1.0, "")
    c, flag = equivalent_compute(3.5, curve)  # halfway between 1x and 2x in loss -> 2**0.5
    assert flag == "" and c == pytest.approx(math.sqrt(2))
    c, flag = equivalent_compute(2.75, curve)
    assert flag == "" and c == pytest.approx(2**1.5)
    c, flag = equivalent_compute(2.0, curve)  # better than 4x: extend the last segment (slope 2 doublings / loss)
    assert flag == ">" and c == pytest.approx(2**3)
    c, flag = equivalent_compute(4.5, curve)
    assert flag == "<" and c == pytest.approx(2**-0.5)
    assert math.isnan(equivalent_compute(3.0, curve[:1])[0])


def test_equivalent_compute_is_undefined_where_the_random_curve_does_not_fall():
    """The full pool's algorithmic curve (docs/results/curve-full): 1x 4.375, 2x 4.643, 4x 4.440. Interpolating on
    its rising 1x-2x segment read 4.5 as "1.5x compute", and a loss below 4.440 as beyond 4x: numbers that a curve
    where more random data does not help cannot support."""
    rising = [(1.0, 4.375, 0.0), (2.0, 4.643, 0.0), (4.0, 4.440, 0.0)]
    for loss in (4.5, 4.0, 5.0, 4.375):
        c, flag = equivalent_compute(loss, rising)
        assert math.isnan(c) and flag == "?"
    flat = [(1.0, 4.0, 0.0), (2.0, 4.0, 0.0), (4.0, 3.0, 0.0)]
    assert math.isnan(equivalent_compute(3.5, flat)[0])


def test_compute_curve_reads_the_compute_column_and_falls_back_to_tokens(tmp_path):
    """A balanced curve's 4x model trains on 2 T tokens (a wider model): its multiplier is the compute column, not
    tokens / T. A results.csv from before the column (no d_model, no compute) still reads as tokens / T."""
    from dsdm.report import compute_curve

    rows = [r for r in _table() if r["method"] == "random"]
    balanced = [{**r, "tokens": {1: 4096, 2: 5888, 4: 8192}[r["tokens"] // 4096], "compute": r["tokens"] // 4096,
                 "d_model": 0 if r["tokens"] == 4096 else 96} for r in rows]  # fmt: skip
    _write_csv(tmp_path / "results.csv", balanced)
    curve = compute_curve(read_results(tmp_path / "results.csv"), ["a", "b"])
    assert [c for c, _, _ in curve] == [1.0, 2.0, 4.0]
    assert [round(m, 1) for _, m, _ in curve] == [5.0, 4.6, 4.3]
    with open(tmp_path / "old.csv", "w", newline="") as f:  # the columns of results.csv before d_model and compute
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS[:-2])
        w.writeheader()
        w.writerows(rows)
    old = read_results(tmp_path / "old.csv")
    assert all(r["d_model"] == 0 and math.isnan(r["compute"]) for r in old)
    assert [c for c, _, _ in compute_curve(old, ["a", "b"])] == [1.0, 2.0, 4.0]


def test_curve_table_pairs_each_multiplier_with_1x_by_seed(tmp_path):
    """The table behind issue 12's curve bar: per eval group and multiplier, the model, the loss and its paired
    difference from 1x. _table's random losses are 5.0 / 4.6 / 4.3 + N(0, 0.01) per (seed, task)."""
    from dsdm.report import curve_table

    _write_csv(tmp_path / "results.csv", _table())
    rows = read_results(tmp_path / "results.csv")
    header, out = curve_table(rows, {"a": ["a"], "ab": ["a", "b"]})
    col = {h: i for i, h in enumerate(header)}
    by = {(r[col["eval group"]], r[col["compute"]]): r for r in out}
    assert sorted(by) == [("a", "1x"), ("a", "2x"), ("a", "4x"), ("ab", "1x"), ("ab", "2x"), ("ab", "4x")]
    assert by[("a", "1x")][col["minus 1x (mean ± s.e.)"]] == "" and by[("a", "4x")][col["tokens"]] == "16,384"
    for g in ("a", "ab"):
        for c, drop in (("2x", -0.4), ("4x", -0.7)):
            mean = float(by[(g, c)][col["minus 1x (mean ± s.e.)"]].split(" ± ")[0])
            assert mean == pytest.approx(drop, abs=0.05) and by[(g, c)][col["seeds falling"]] == "2/2"
    assert {r[col["d_model"]] for r in out} == {"as configured"}


def _write_csv(path: Path, rows: list[dict]):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def _table(seed_noise=0.01):
    """A results table for rendering: random at 1x/2x/4x, two targeted methods at two k, 2 seeds, 3 eval tasks."""
    rng = np.random.default_rng(0)
    rows = []
    T, L = 4096, 64
    for seed in (0, 1):
        for mult, base in ((1, 5.0), (2, 4.6), (4, 4.3)):
            k = mult * T // L
            for task in ("a", "b", "u"):
                rows.append(
                    dict(
                        target=UNTARGETED_NAME,
                        method="random",
                        k=k,
                        epochs=1,
                        seed=seed,
                        tokens=mult * T,
                        eval_task=task,
                        loss=base + rng.normal() * seed_noise,
                        accuracy=0.1 * mult,
                    )
                )
        for method, gain in (("dsdm", 0.5), ("dsir", 0.1)):
            for k, epochs in ((T // (4 * L), 4), (T // L, 1)):
                for task in ("a", "b", "u"):
                    rows.append(
                        dict(
                            target="a",
                            method=method,
                            k=k,
                            epochs=epochs,
                            seed=seed,
                            tokens=T,
                            eval_task=task,
                            loss=5.0 - gain * (task == "a") + rng.normal() * seed_noise,
                            accuracy=0.2,
                        )
                    )
    return rows


def test_aggregation_and_main_cells(tmp_path):
    _write_csv(tmp_path / "results.csv", _table())
    rows = read_results(tmp_path / "results.csv")
    main = main_cells(rows)
    assert {(r["method"], r["k"]) for r in main} == {("random", 64), ("dsdm", 16), ("dsir", 16)}
    agg = aggregate(rows)
    m, sd, n = agg[("a", "dsdm", 16, 4.0, 4096, "a")]
    assert n == 2 and m == pytest.approx(4.5, abs=0.05) and sd < 0.05
    header, table = comparison_table(rows)
    assert header[-3:] == ["a", "b", "u"] and table[0][:2] == [UNTARGETED_NAME, "random"]
    # budget.ks adds k = 8 (8 epochs) to target "a" only; target "b" has the protocol sizes: the main cell of "a"
    # stays the protocol's k = 16, shared by every target
    extra = [dict(r, k=8, epochs=8.0) for r in rows if r["method"] == "dsdm" and r["k"] == 16]
    other = [dict(r, target="b") for r in rows if r["target"] == "a"]
    main = main_cells(rows + extra + other)
    assert {(r["target"], r["method"], r["k"]) for r in main if r["method"] == "dsdm"} == {
        ("a", "dsdm", 16),
        ("b", "dsdm", 16),
    }


def test_head_to_head_pairs_seeds():
    """Planted: dsdm is 0.5 nats better than random on its target 'a' and equal on 'u' (noise 0.01): the paired
    delta is -0.5 on 'a' with dsdm winning both seeds; dsir (gain 0.1) loses to dsdm by 0.4."""
    rows = _table()
    header, table = head_to_head_table(rows, {"a": ["a"], "unseen": ["u"]})
    got = {(r[0], r[2]): r for r in table}
    assert set(got) == {("a", "random"), ("a", "dsir"), ("unseen", "random"), ("unseen", "dsir")}
    mean = lambda r: float(r[3].split(" ± ")[0])  # noqa: E731
    assert mean(got[("a", "random")]) == pytest.approx(-0.5, abs=0.05) and got[("a", "random")][4] == "2/2"
    assert mean(got[("a", "dsir")]) == pytest.approx(-0.4, abs=0.05) and got[("a", "dsir")][4] == "2/2"
    assert abs(mean(got[("unseen", "random")])) < 0.05


def test_render_writes_parsable_html_with_existing_images(tmp_path):
    """Rendering test on a hand-written table (not a result): HTML parses, every image exists, tables are filled."""
    _write_csv(tmp_path / "results.csv", _table())
    (tmp_path / "eval_groups.json").write_text(json.dumps({"a": ["a"], "unseen": ["u"]}))
    sel = tmp_path / "selections" / "dsdm_a_16_s0"
    sel.mkdir(parents=True)
    (sel / "selection.json").write_text(json.dumps({"seed": 0, "composition": {"wiki": 10, "books": 6}}))
    (tmp_path / "scores" / "dsdm_a").mkdir(parents=True)
    np.save(tmp_path / "scores" / "dsdm_a" / "scores.npy", np.random.default_rng(0).normal(size=200).astype(np.float32))
    html = render(tmp_path)
    parser = check_report(tmp_path)
    assert {"figures/methods.png", "figures/compute.png", "figures/composition.png"} <= set(parser.images)
    md = (tmp_path / "report.md").read_text()
    # dsdm's target loss 4.5 lies between random 4x (4.3) and 2x (4.6): its equivalent compute is in (2x, 4x)
    line = next(x for x in md.splitlines() if x.startswith("| a | a | dsdm |"))
    c = float(line.split("|")[-2].strip().rstrip("x"))
    assert 2 < c < 4
    assert html == tmp_path / "report.html"


def test_render_refuses_missing_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.csv"):
        render(tmp_path)


def test_mc_table_pools_the_examples_of_every_seed_and_shows_chance(tmp_path):
    """Planted outcomes: dsdm's main cell answers 3 of 4 examples right in seed 0 and 1 of 4 in seed 1, so its MC
    accuracy is 0.5 and the pooled bootstrap CI lies within [0, 1] around it; tasks without an MC form are left out."""
    from dsdm.report import mc_table, reference_rows

    rows = _table()
    for r in rows:
        has_mc = r["eval_task"] != "u"
        r["mc_accuracy"], r["chance"] = (0.5, 0.25) if has_mc else (None, None)
    _write_csv(tmp_path / "results.csv", rows)
    rows = read_results(tmp_path / "results.csv")
    outcomes = {
        ("a", "dsdm", 16, 4.0, 0, 4096, "a"): [True, True, True, False],
        ("a", "dsdm", 16, 4.0, 1, 4096, "a"): [True, False, False, None],  # None: an example without choices
    }
    header, table = mc_table(rows, outcomes)
    assert header[4:] == ["a", "b"] and table[0][:1] == ["chance"] and table[0][4:] == ["0.250", "0.250"]
    line = next(r for r in table if r[:2] == ["a", "dsdm"])
    mean, ci = line[4].split(" ", 1)
    lo, hi = (float(x) for x in ci.strip("[]").split(", "))
    assert float(mean) == 0.5 and 0.0 <= lo < 4 / 7 < hi <= 1.0  # 4 right of 7 pooled examples
    assert line[5] == "0.500"  # no per-example outcomes stored: the mean alone, no invented CI
    refs = {"a": {"unigram": 6.0, "bigram": 5.5}, "b": {"unigram": 6.1, "bigram": 5.6}}
    assert reference_rows(refs, ["a", "b", "u"]) == [
        ["reference", "unigram (pool, add-one)", "", "", "6.000", "6.100", "–"],
        ["reference", "bigram (pool, Kneser-Ney)", "", "", "5.500", "5.600", "–"],
    ]


def test_composition_uses_the_first_seed_whatever_its_value(tmp_path):
    """Seeds [1, 2] (no seed 0) used to give an empty composition figure (issue 14 defect 4)."""
    from dsdm.report import load_artifacts

    for name, seed in (("dsdm_a_16_s1", 1), ("dsdm_a_16_s2", 2), ("random_untargeted_64_s1", 1)):
        d = tmp_path / "selections" / name
        d.mkdir(parents=True)
        (d / "selection.json").write_text(json.dumps({"seed": seed, "composition": {"wiki": seed, "books": 3}}))
    comps, _, _ = load_artifacts(tmp_path)
    assert sorted(comps) == ["dsdm_a_16_s1", "random_untargeted_64_s1"]

"""The experiment report: results.csv (+ selections, scores, pool) -> tables, PNG figures, report.md, report.html.

What it shows (docs/method.md §7, §9.2 steps 6-9):
- the comparison table: method x eval task, holdout loss (mean per-token NLL of the continuation) mean ± s.d. over
  seeds, at the protocol's main cell (targeted: `budget.epochs` epochs; untargeted: 1x compute);
- methods side by side with error bars over seeds, per target; holdout loss vs k per target;
- the compute curve (random data at 1x, 2x, 4x, ... the 1x model's training compute, budget.compute_scaling) and
  each method's equivalent x compute: the multiplier c at which the random curve reaches the method's loss, by
  linear interpolation of log2(c) against loss between the two bracketing curve points; outside the curve the end
  segment is extended and the value is flagged as an extrapolation (">" / "<" in the tables);
- per-source composition of each selection (stacked bars), score histograms per method, and the case study: the top-
  and bottom-ranked pool documents of each method (decoded snippets with their source).

report.html references the PNG files under figures/ by relative path (open it from the run directory); nothing is
fetched from the network.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsdm.baselines import METHODS
from dsdm.common import check_requirements, log
from dsdm.config import from_dict, load_yaml
from dsdm.evaluate import bootstrap_ci
from dsdm.io import atomic_write_text, read_json
from dsdm.pool import Pool
from dsdm.results import UNTARGETED_NAME
from dsdm.results import read as read_results

METHOD_ORDER = ["random", "semdedup", "dsdm", "dsdm-inverse", "dsir", "classifier"]


@dataclass
class ReportSpec:
    case_study: int = 5
    """Top- and bottom-ranked documents shown per method and target."""
    snippet_chars: int = 240
    """Characters of each decoded document shown in the case study."""


REFERENCE = next(m for m, cls in METHODS.items() if cls.reference)  # whose compute curve the others are read on


# -----------------------------------------------------------------------------
# Aggregation (pure)


def mean_sd(values) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def aggregate(rows: list[dict], metric: str = "loss") -> dict[tuple, tuple[float, float, int]]:
    """(target, method, k, epochs, tokens, eval_task) -> (mean, s.d., n seeds) of `metric`."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["target"], r["method"], r["k"], r["epochs"], r["tokens"], r["eval_task"])].append(r[metric])
    return {key: mean_sd(v) for key, v in groups.items()}


def budget_of(rows: list[dict]) -> int:
    """The base token budget T: the smallest token count among the cells."""
    return min(r["tokens"] for r in rows)


def main_cells(rows: list[dict]) -> list[dict]:
    """Rows of the protocol's main comparison: every cell at the base budget T; targeted methods at their default
    `budget.epochs` selection. That k is the smallest k a method has for *every* target: the protocol's sizes
    (T / (epochs L) and T / L) are the same for all targets, while `budget.ks` adds sizes to one target only (a
    target's smaller extra k, i.e. more epochs, must not replace its protocol cell)."""
    T = budget_of(rows)
    at_t = [r for r in rows if r["tokens"] == T]
    ks = defaultdict(set)
    for r in at_t:
        ks[(r["target"], r["method"])].add(r["k"])
    shared = {}
    for (t, m), k in ks.items():
        if t != UNTARGETED_NAME:
            shared[m] = shared[m] & k if m in shared else set(k)
    main_k = {}
    for (t, m), k in ks.items():
        common = k & shared.get(m, set())
        main_k[(t, m)] = min(common or k) if t != UNTARGETED_NAME else max(k)
    return [r for r in at_t if r["k"] == main_k[(r["target"], r["method"])]]


def seed_means(rows: list[dict], tasks: list[str]) -> dict[tuple, list[float]]:
    """(target, method) -> per-seed mean loss over `tasks` (only seeds with every task), in seed order."""
    return {key: [v[s] for s in sorted(v)] for key, v in seed_losses(rows, tasks).items()}


def seed_losses(rows: list[dict], tasks: list[str]) -> dict[tuple, dict[int, float]]:
    """(target, method) -> {seed: mean loss over `tasks`} (only seeds with every task), for paired comparisons."""
    by = defaultdict(dict)
    for r in rows:
        if r["eval_task"] in tasks:
            by[(r["target"], r["method"], r["seed"])][r["eval_task"]] = r["loss"]
    out = defaultdict(dict)
    for (t, m, seed), d in sorted(by.items()):
        if len(d) == len(tasks):
            out[(t, m)][seed] = float(np.mean(list(d.values())))
    return out


def compute_curve(rows: list[dict], tasks: list[str]) -> list[tuple[float, float, float]]:
    """Random-data curve: [(multiplier, mean loss over tasks and seeds, s.d. over seeds)], sorted by multiplier."""
    by_c = curve_rows(rows)
    out = []
    for c, rand in by_c.items():
        per_seed = seed_means(rand, tasks).get((UNTARGETED_NAME, REFERENCE), [])
        if per_seed:
            m, sd, _ = mean_sd(per_seed)
            out.append((c, m, sd))
    return out


def curve_rows(rows: list[dict]) -> dict[float, list[dict]]:
    """The random-data curve's rows by compute multiplier, ascending. The multiplier is results.csv's compute column;
    for runs from before it, tokens / T."""
    T = budget_of(rows)

    def multiplier(r: dict) -> float:
        c = r.get("compute", math.nan)
        return round(float(c), 6) if c is not None and not math.isnan(c) else r["tokens"] / T

    rand = [r for r in rows if r["method"] == REFERENCE and r["target"] == UNTARGETED_NAME]
    return {c: [r for r in rand if multiplier(r) == c] for c in sorted({multiplier(r) for r in rand})}


def curve_table(rows, groups) -> tuple[list[str], list[list[str]]]:
    """The random-data curve per eval group: each multiplier's model (width, tokens), its loss, and its difference
    from 1x paired by seed (mean ± s.e., seeds falling): whether more compute buys a lower loss, the question the
    equivalent-compute figures rest on."""
    by_c = curve_rows(rows)
    header = [
        "eval group",
        "compute",
        "d_model",
        "tokens",
        "loss (mean ± s.d.)",
        "minus 1x (mean ± s.e.)",
        "seeds falling",
    ]
    out = []
    base = by_c.get(1.0, [])
    for g, tasks in groups.items():
        ref = seed_losses(base, tasks).get((UNTARGETED_NAME, REFERENCE), {})
        for c, rand in by_c.items():
            per = seed_losses(rand, tasks).get((UNTARGETED_NAME, REFERENCE), {})
            if not per:
                continue
            mu, sd, _ = mean_sd([per[s] for s in sorted(per)])
            widths = sorted({r.get("d_model") or 0 for r in rand})
            d_model = ", ".join(str(w) if w else "as configured" for w in widths)
            tokens = ", ".join(f"{t:,}" for t in sorted({r["tokens"] for r in rand}))
            seeds = sorted(set(per) & set(ref))
            if c == 1.0 or not seeds:
                diff, falling = "", ""
            else:
                d = np.array([per[s] - ref[s] for s in seeds])
                se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
                diff, falling = fmt(float(d.mean()), se), f"{int((d < 0).sum())}/{d.size}"
            out.append([g, f"{c:g}x", d_model, tokens, fmt(mu, sd), diff, falling])
    return header, out


def equivalent_compute(loss: float, curve: list[tuple[float, float, float]]) -> tuple[float, str]:
    """(c, flag): the compute multiplier at which the random curve reaches `loss`, log-linear in c.

    Inside the curve's loss range: interpolate log2(c) linearly in loss between the bracketing points (flag "").
    Outside: extend the nearest end segment (flag ">" beyond the largest multiplier, "<" below the smallest).
    A curve with fewer than two points, or one whose mean loss does not fall at every larger multiplier, gives
    (nan, "?"): loss -> compute is then no function (random data at more compute is no better), and a number read
    off a rising segment would claim a compute equivalence the measurements contradict."""
    if len(curve) < 2 or math.isnan(loss):
        return math.nan, "?"
    x = np.log2([c for c, _, _ in curve])
    y = np.array([m for _, m, _ in curve])
    if not np.all(np.diff(y) < 0):
        return math.nan, "?"
    for i in range(len(x) - 1):
        lo, hi = sorted((y[i], y[i + 1]))
        if lo <= loss <= hi and y[i] != y[i + 1]:
            t = (loss - y[i]) / (y[i + 1] - y[i])
            return float(2 ** (x[i] + t * (x[i + 1] - x[i]))), ""
    if loss < y.min():  # better than the best random model: extend the last segment
        i, flag = len(x) - 2, ">"
    else:
        i, flag = 0, "<"
    if y[i + 1] == y[i]:
        return math.nan, "?"
    slope = (x[i + 1] - x[i]) / (y[i + 1] - y[i])
    return float(2 ** (x[i] + (loss - y[i]) * slope)), flag


def fmt(m: float, sd: float) -> str:
    return "–" if math.isnan(m) else f"{m:.3f} ± {sd:.3f}"


def ordered(methods) -> list[str]:
    return sorted(set(methods), key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))


def comparison_table(rows: list[dict], metric: str = "loss") -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table: one row per (target, method) main cell, one column per eval task."""
    main = main_cells(rows)
    tasks = sorted({r["eval_task"] for r in main})
    agg = aggregate(main, metric)
    header = ["target", "method", "k", "epochs"] + tasks
    out = []
    rank = {m: i for i, m in enumerate(ordered(k[1] for k in agg))}
    keys = sorted({k[:5] for k in agg}, key=lambda k: (k[0] != UNTARGETED_NAME, k[0], rank[k[1]], k[2]))
    for t, m, k, e, tok in keys:
        cells = [fmt(*agg.get((t, m, k, e, tok, task), (math.nan, math.nan, 0))[:2]) for task in tasks]
        out.append([t, m, str(k), f"{e:g}"] + cells)
    return header, out


REFERENCE_ROWS = (("unigram", "unigram (pool, add-one)"), ("bigram", "bigram (pool, Kneser-Ney)"))


def reference_rows(refs: dict[str, dict[str, float]], tasks: list[str]) -> list[list[str]]:
    """Rows for the loss table: each eval task's loss under the pool's n-gram statistics (dsdm.references)."""
    if not refs:
        return []
    return [
        ["reference", label, "", ""] + [f"{refs[t][key]:.3f}" if t in refs else "–" for t in tasks]
        for key, label in REFERENCE_ROWS
    ]


def mc_table(rows: list[dict], outcomes: dict[tuple, list], seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """Multiple-choice accuracy of the main cells: mean over seeds [95% percentile bootstrap CI over the holdout
    examples of every seed pooled], with a chance row. `outcomes`: (target, method, k, epochs, seed, tokens, task) ->
    per-example correctness (None where an example has no choices). Tasks without an MC form are left out."""
    main = [r for r in main_cells(rows) if not math.isnan(r["mc_accuracy"])]
    tasks = sorted({r["eval_task"] for r in main})
    header = ["target", "method", "k", "epochs"] + tasks
    if not tasks:
        return header, []
    chance = {t: mean_sd([r["chance"] for r in main if r["eval_task"] == t])[0] for t in tasks}
    out = [["chance", "", "", ""] + [f"{chance[t]:.3f}" for t in tasks]]
    agg = aggregate(main, "mc_accuracy")
    seeds = defaultdict(list)  # (target, method, k, epochs, tokens, task) -> the seeds of its rows
    for r in main:
        seeds[(r["target"], r["method"], r["k"], r["epochs"], r["tokens"], r["eval_task"])].append(r["seed"])
    rank = {m: i for i, m in enumerate(ordered(k[1] for k in agg))}
    keys = sorted({k[:5] for k in agg}, key=lambda k: (k[0] != UNTARGETED_NAME, k[0], rank[k[1]], k[2]))
    for t, m, k, e, tok in keys:
        cells = []
        for task in tasks:
            mu = agg.get((t, m, k, e, tok, task), (math.nan,))[0]
            pooled = [
                float(c)
                for s in seeds[(t, m, k, e, tok, task)]
                for c in outcomes.get((t, m, k, e, s, tok, task)) or []
                if c is not None
            ]
            if math.isnan(mu):
                cells.append("–")
            elif len(pooled) > 1:
                lo, hi = bootstrap_ci(np.asarray(pooled), seed=seed)
                cells.append(f"{mu:.3f} [{lo:.3f}, {hi:.3f}]")
            else:
                cells.append(f"{mu:.3f}")
        out.append([t, m, str(k), f"{e:g}"] + cells)
    return header, out


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Fixed-width table for the terminal."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# -----------------------------------------------------------------------------
# Figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reference_lines(ax, refs: dict, tasks: list[str]) -> None:
    """Horizontal lines at the mean over `tasks` of the pool's unigram and bigram references (if known)."""
    for (key, label), style in zip(REFERENCE_ROWS, ("--", "-.")):
        if refs and all(t in refs for t in tasks):
            ax.axhline(float(np.mean([refs[t][key] for t in tasks])), color="grey", ls=style, lw=1, label=label)


def fig_methods(rows, groups, path, refs=None) -> Path | None:
    """Bar chart per target: mean holdout loss over the target's tasks, error bars = s.d. over seeds; grey lines:
    the pool's unigram and bigram references."""
    plt = _plt()
    main = main_cells(rows)
    targets = [t for t in groups if t != "unseen" and groups[t]]
    panels = targets + (["unseen"] if groups.get("unseen") else [])
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        tasks = groups[panel]
        sm = seed_means([r for r in main if r["target"] in (panel, UNTARGETED_NAME) or panel == "unseen"], tasks)
        labels, means, sds = [], [], []
        for (t, m), v in sorted(sm.items(), key=lambda kv: (kv[0][0] != UNTARGETED_NAME, kv[0][0], kv[0][1])):
            if panel != "unseen" and t not in (panel, UNTARGETED_NAME):
                continue
            mu, sd, _ = mean_sd(v)
            labels.append(m if t in (panel, UNTARGETED_NAME) else f"{m}\n[{t}]")
            means.append(mu)
            sds.append(sd)
        ax.bar(range(len(labels)), means, yerr=sds, capsize=3, color="#4c72b0")
        reference_lines(ax, refs, tasks)
        if refs and all(t in refs for t in tasks):
            means = means + [float(np.mean([refs[t][key] for t in tasks])) for key, _ in REFERENCE_ROWS]
            sds = sds + [0.0, 0.0]
            ax.legend(fontsize=6)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        if means:
            lo, hi = min(means) - 2 * max(sds + [0.01]), max(means) + 2 * max(sds + [0.01])
            ax.set_ylim(lo, hi)
        ax.set_title(f"{panel}: {', '.join(tasks)}" if len(tasks) <= 3 else f"{panel} ({len(tasks)} tasks)", fontsize=9)
        ax.set_ylabel("holdout loss (NLL / token)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fig_loss_vs_k(rows, groups, path) -> Path | None:
    """Per target: holdout loss vs selection size k at the fixed budget, one line per targeted method."""
    plt = _plt()
    T = budget_of(rows)
    targets = [t for t in groups if t != "unseen" and groups[t]]
    if not targets:
        return None
    fig, axes = plt.subplots(1, len(targets), figsize=(4.5 * len(targets), 3.4), squeeze=False)
    for ax, t in zip(axes[0], targets):
        sub = [r for r in rows if r["target"] == t and r["tokens"] == T]
        for m in ordered(r["method"] for r in sub):
            pts = []
            for k in sorted({r["k"] for r in sub if r["method"] == m}):
                v = seed_means([r for r in sub if r["method"] == m and r["k"] == k], groups[t]).get((t, m), [])
                if v:
                    pts.append((k, *mean_sd(v)[:2]))
            if pts:
                ks, mu, sd = zip(*pts)
                ax.errorbar(ks, mu, yerr=sd, marker="o", capsize=3, label=m)
        rand = [r for r in rows if r["method"] == "random" and r["tokens"] == T]
        v = seed_means(rand, groups[t]).get((UNTARGETED_NAME, "random"), [])
        if v:
            ax.axhline(mean_sd(v)[0], color="grey", ls="--", label="random (1x)")
        ax.set_xscale("log")
        ax.set_xlabel("selection size k (examples)")
        ax.set_ylabel("holdout loss")
        ax.set_title(f"target {t}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fig_compute(rows, groups, path, refs=None) -> Path | None:
    """Random-data compute curve per eval group, with each method's main-cell loss as a horizontal line."""
    plt = _plt()
    panels = [g for g in groups if groups[g]]
    curves = {g: compute_curve(rows, groups[g]) for g in panels}
    panels = [g for g in panels if len(curves[g]) >= 1]
    if not panels:
        return None
    main = main_cells(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, g in zip(axes[0], panels):
        c, mu, sd = zip(*curves[g])
        ax.errorbar(c, mu, yerr=sd, marker="o", color="black", capsize=3, label="random, c x the 1x compute")
        reference_lines(ax, refs, groups[g])
        sm = seed_means(main, groups[g])
        for i, ((t, m), v) in enumerate(sorted(sm.items())):
            if m == "random" or (g != "unseen" and t not in (g, UNTARGETED_NAME)):
                continue
            ax.axhline(mean_sd(v)[0], ls=":", color=f"C{i % 10}", label=f"{m} [{t}]")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compute multiplier c (training FLOPs / the 1x model's)")
        ax.set_ylabel("holdout loss")
        ax.set_title(f"{g}", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fig_composition(compositions: dict[str, dict[str, int]], path) -> Path | None:
    """Stacked bars: fraction of each selection coming from each pool source."""
    if not compositions:
        return None
    plt = _plt()
    sources = sorted({s for c in compositions.values() for s in c})
    names = list(compositions)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(names) + 2), 4))
    bottom = np.zeros(len(names))
    for i, s in enumerate(sources):
        frac = np.array([compositions[n].get(s, 0) / max(1, sum(compositions[n].values())) for n in names])
        ax.bar(range(len(names)), frac, bottom=bottom, label=s, color=f"C{i % 10}")
        bottom += frac
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("fraction of the selection")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fig_histograms(scores: dict[str, np.ndarray], path) -> Path | None:
    """Histogram of the pool's scores per (method, target) score file."""
    scores = {k: v for k, v in scores.items() if v.dtype != bool and np.isfinite(v).any()}
    if not scores:
        return None
    plt = _plt()
    n = len(scores)
    cols = min(3, n)
    fig, axes = plt.subplots(
        (n + cols - 1) // cols, cols, figsize=(4 * cols, 2.8 * ((n + cols - 1) // cols)), squeeze=False
    )
    for ax, (name, s) in zip(axes.flat, sorted(scores.items())):
        ax.hist(s[np.isfinite(s)], bins=50, color="#55a868")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("score (larger = keep)", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------
# IO


def load_artifacts(out: Path) -> tuple[dict, dict, dict]:
    """(compositions by selection at the smallest seed, score vectors by score folder, eval groups) of a run."""

    records = {p.parent.name: read_json(p) for p in sorted((out / "selections").glob("*/selection.json"))}
    seeds = sorted({r["seed"] for r in records.values() if r.get("seed") is not None})
    comps = {n: r["composition"] for n, r in records.items() if seeds and r.get("seed") == seeds[0]}
    if records and not comps:
        log(f"report: no selection of {out} has a seed and a composition; the composition figure is left out")
    scores = {}
    for d in sorted(p for p in (out / "scores").glob("*") if p.is_dir()):
        for name in ("scores.npy", "keep.npy"):
            if (d / name).exists():
                scores[d.name] = np.load(d / name)
        for f in sorted(d.glob("*.npy")):  # the estimator's one stage: scores/dsdm/<target>.npy per target
            if f.name not in ("scores.npy", "keep.npy") and not f.name.endswith(".tasks.npy"):
                scores[f"{d.name}_{f.stem}"] = np.load(f)
    groups = read_json(out / "eval_groups.json") if (out / "eval_groups.json").exists() else {}
    return comps, scores, groups


def load_evaluations(out: Path) -> tuple[dict, dict]:
    """(n-gram references {task: {unigram, bigram, ...}}, per-example MC outcomes keyed by cell and task)."""

    refs_path = out / "references" / "references.json"
    refs = read_json(refs_path) if refs_path.exists() else {}
    outcomes = {}
    for path in sorted((out / "eval").glob("*/metrics.json")):
        rec = read_json(path)
        c = rec["cell"]
        for task, m in rec["metrics"].items():
            key = (c["target"], c["method"], c["k"], round(float(c["epochs"]), 3), c["seed"], c["tokens"], task)
            outcomes[key] = m.get("mc_correct")
    return refs, outcomes


def report_settings(out: Path) -> tuple[int, int]:
    """(case_study, snippet_chars) from the run's config.yaml `report:` slice (ReportSpec)."""

    cfg = load_yaml(out / "config.yaml") if (out / "config.yaml").exists() else {}
    spec = from_dict(ReportSpec, cfg.get("report") or {}, prefix="report.")
    return spec.case_study, spec.snippet_chars


def case_study(out: Path, scores: dict[str, np.ndarray], n: int, chars: int) -> list[tuple[str, list, list]]:
    """[(score file, top rows, bottom rows)], rows = (rank, pool index, source, score, snippet)."""

    cfg = load_yaml(out / "config.yaml") if (out / "config.yaml").exists() else {}
    pool_dir = (cfg.get("pool") or {}).get("path") or str(out / "pool")
    try:
        pool = Pool(pool_dir)
    except FileNotFoundError:
        return []
    shown = {}  # score file -> (scores, top n indices, bottom n indices worst first, finite count)
    for name, s in sorted(scores.items()):
        if s.dtype == bool or s.shape[0] != len(pool):
            continue
        order = np.argsort(-s, kind="stable")
        finite = order[np.isfinite(s[order])]
        shown[name] = (s, finite[:n], finite[::-1][:n], len(finite))
    # the source of the shown rows only: a few row groups of one column, not the whole metadata table
    rows = np.unique(np.concatenate([np.r_[top, bottom] for _, top, bottom, _ in shown.values()] or [[]]))
    sources = dict(zip(rows.tolist(), pool.column("source", rows.astype(np.int64)).to_pylist()))
    out_rows = []
    for name, (s, top_idx, bottom_idx, count) in shown.items():

        def row(rank, i):
            text = " ".join(pool.decode(int(i)).split())
            return rank, int(i), sources[int(i)], float(s[i]), text[:chars] + ("…" if len(text) > chars else "")

        top = [row(r + 1, i) for r, i in enumerate(top_idx)]
        bottom = [row(count - r, i) for r, i in enumerate(bottom_idx)]
        out_rows.append((name, top, bottom))
    return out_rows


def equivalent_table(rows, groups) -> tuple[list[str], list[list[str]]]:
    """Equivalent x compute of every (target, method) main cell, per eval group."""
    main = main_cells(rows)
    header = ["eval group", "target", "method", "loss", "equivalent x compute"]
    out = []
    for g, tasks in groups.items():
        curve = compute_curve(rows, tasks)
        for (t, m), v in sorted(seed_means(main, tasks).items()):
            if g != "unseen" and t not in (g, UNTARGETED_NAME):
                continue
            mu, sd, _ = mean_sd(v)
            c, flag = equivalent_compute(mu, curve)
            if math.isnan(c):
                cell = "– (the random curve does not fall)" if len(curve) >= 2 else "–"
            else:
                cell = f"{flag}{c:.2f}x"
            out.append([g, t, m, fmt(mu, sd), cell])
    return header, out


def head_to_head_table(rows, groups, method: str = "dsdm") -> tuple[list[str], list[list[str]]]:
    """`method` against every other method at the main cells, per eval group and target, paired by seed.

    Delta = loss(method) - loss(other) per shared seed (negative = `method` is better); the table gives its mean, its
    standard error over seeds and the number of seeds `method` wins. A target is compared on its own holdout group
    (and every target on the "unseen" group); untargeted baselines are compared with every target."""
    main = main_cells(rows)
    header = ["eval group", "target", f"{method} vs", "delta loss (mean ± s.e.)", f"{method} wins (seeds)"]
    out = []
    for g, tasks in groups.items():
        per = seed_losses(main, tasks)
        for t in sorted({t for t, m in per if m == method}):
            if g != "unseen" and t != g:
                continue
            mine = per[(t, method)]
            for other in ordered(m for tt, m in per if tt in (t, UNTARGETED_NAME) and m != method):
                theirs = per.get((t, other)) or per.get((UNTARGETED_NAME, other), {})
                seeds = sorted(set(mine) & set(theirs))
                if not seeds:
                    continue
                d = np.array([mine[s] - theirs[s] for s in seeds])
                se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
                out.append([g, t, other, fmt(float(d.mean()), se), f"{int((d < 0).sum())}/{d.size}"])
    return header, out


def render(out: str | Path) -> Path:
    """Write <out>/report.md, <out>/report.html and <out>/figures/*.png from <out>/results.csv; returns the HTML."""

    check_requirements({"matplotlib": "report"}, "dsdm report")  # before reading anything: the figures need it
    out = Path(out)
    rows = read_results(out / "results.csv")
    if not rows:
        raise ValueError(f"{out}/results.csv has no rows: no cell has finished yet")
    comps, scores, groups = load_artifacts(out)
    refs, outcomes = load_evaluations(out)
    if not groups:
        groups = {"all": sorted({r["eval_task"] for r in rows})}
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    figures = [
        (
            "Holdout loss per method (error bars: s.d. over seeds; grey: the pool's n-gram references)",
            fig_methods(rows, groups, figs / "methods.png", refs),
        ),
        (
            "Holdout loss vs selection size k at a fixed token budget",
            fig_loss_vs_k(rows, groups, figs / "loss_vs_k.png"),
        ),
        (
            "Compute curve: random data at c x the 1x training compute",
            fig_compute(rows, groups, figs / "compute.png", refs),
        ),
        ("Per-source composition of each selection (first seed)", fig_composition(comps, figs / "composition.png")),
        ("Score histograms", fig_histograms(scores, figs / "score_hist.png")),
    ]
    figures = [(title, p) for title, p in figures if p is not None]
    loss_h, loss_r = comparison_table(rows, "loss")
    loss_r = loss_r + reference_rows(refs, loss_h[4:])
    acc_h, acc_r = comparison_table(rows, "accuracy")
    mc_h, mc_r = mc_table(rows, outcomes)
    eq_h, eq_r = equivalent_table(rows, groups)
    curve_h, curve_r = curve_table(rows, groups)
    hh_h, hh_r = head_to_head_table(rows, groups)
    cases = case_study(out, scores, *report_settings(out))
    sections = [
        (
            "Holdout loss (mean per-token NLL of the continuation; mean ± s.d. over seeds; reference rows: the same "
            "loss under the pool's unigram and bigram statistics)",
            loss_h,
            loss_r,
        ),
        ("Multiple-choice accuracy (mean over seeds [95% bootstrap CI over the examples of all seeds])", mc_h, mc_r),
        ("Greedy exact-match accuracy (mean ± s.d. over seeds)", acc_h, acc_r),
        (
            "Random-data compute curve (c x the 1x model's training FLOPs; differences from 1x paired by seed)",
            curve_h,
            curve_r,
        ),
        (
            "Equivalent × compute (random-data curve, log-linear; > / < = extrapolated; only where the random curve "
            "falls at every multiplier)",
            eq_h,
            eq_r,
        ),
        ("DsDm head to head (paired by seed; delta < 0 = DsDm has the lower loss)", hh_h, hh_r),
    ]
    T = budget_of(rows)
    n_models = len({(r["method"], r["target"], r["k"], r["epochs"], r["seed"], r["tokens"]) for r in rows})
    intro = (
        f"Run directory `{out}`: {len(rows)} result rows, {n_models} "
        f"evaluation models, token budget T = {T}. Main cells: targeted methods at their smallest k (most epochs), "
        "untargeted methods at 1x compute. Eval groups: " + "; ".join(f"{g}: {', '.join(t)}" for g, t in groups.items())
    )
    md = ["# DsDm experiment report", "", intro, ""]
    for title, h, r in sections:
        md += [f"## {title}", "", md_table(h, r), ""]
    for title, p in figures:
        md += [f"## {title}", "", f"![{title}](figures/{p.name})", ""]
    md += ["## Case study: top- and bottom-ranked pool documents", ""]
    for name, top, bottom in cases:
        md += [f"### {name}", ""]
        for label, rs in (("top", top), ("bottom", bottom)):
            md += [f"**{label}**", ""] + [f"- #{r[0]} (pool {r[1]}, {r[2]}, score {r[3]:.4g}): {r[4]}" for r in rs]
            md += [""]
    atomic_write_text(out / "report.md", "\n".join(md))

    e = html.escape
    body = [f"<h1>DsDm experiment report</h1><p>{e(intro)}</p>"]
    for title, h, r in sections:
        body.append(f"<h2>{e(title)}</h2>" + html_table(h, r))
    for title, p in figures:
        body.append(f'<h2>{e(title)}</h2><img src="figures/{e(p.name)}" alt="{e(title)}">')
    body.append("<h2>Case study: top- and bottom-ranked pool documents</h2>")
    for name, top, bottom in cases:
        body.append(f"<h3>{e(name)}</h3>")
        for label, rs in (("top", top), ("bottom", bottom)):
            body.append(
                html_table(
                    ["rank", "pool index", "source", "score", f"text ({label})"],
                    [[str(r[0]), str(r[1]), r[2], f"{r[3]:.4g}", r[4]] for r in rs],
                )
            )
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>DsDm experiment report</title>'
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}img{max-width:100%}</style>"
        "</head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    atomic_write_text(out / "report.html", page)
    return out / "report.html"


def html_table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"

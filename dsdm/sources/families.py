"""Target-task families and unseen evaluation tasks built from real text held out of the pool (offline-data.md §7).

Every builder is pure: it takes documents (or facts) and a seeded numpy Generator and returns
(tasks, held_out) where tasks = {task name: {"target": [rows], "holdout": [rows], "info": {...}}} and
held_out = {source: set of hold-out units} that the pool builder removes BEFORE sampling the pool. Each row is a
task JSONL row (dsdm.tasks format) plus a private "_key" (the real-text part used by the leak check; stripped on write).

Families (targets): lambada_style (0-shot last word), jeopardy_style (3-shot closed-book trivia), squad_style
(3-shot extractive cloze; SQuAD-*style*, not SQuAD), algorithmic (0-shot addition / sorting / copying).
Unseen evaluation tasks (never targets): devils_definition, jargon_definition, fortune_completion, kjv_verse,
country_capital (multiple choice).
"""

from __future__ import annotations

import re

import numpy as np

from dsdm.sources.text import clean_control

STOPWORDS = set(
    "the a an and or but if of to in on at by for with from as is was were be been are it its he she they them his her "
    "their this that these those i you we me my your our not no so do did does have has had will would shall should "
    "can could may might must there here what which who whom whose when where why how all any some one two very more "
    "most such than then too also into upon over under out up down off about after before again said mr mrs".split()
)
_SENT = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z])")


def sentences(text: str) -> list[str]:
    """Naive sentence split on . ! ? followed by a capital; whitespace collapsed."""
    return [s.strip() for s in _SENT.split(" ".join(text.split())) if s.strip()]


def split_units(units: list[str], fraction: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Seeded pick of round(fraction * n) units from sorted units, halved into (target units, holdout units)."""
    units = sorted(set(units))
    k = max(2, int(round(fraction * len(units))))
    picked = [units[i] for i in sorted(rng.choice(len(units), size=min(k, len(units)), replace=False))]
    order = rng.permutation(len(picked))
    half = len(picked) // 2
    return sorted(picked[i] for i in order[:half]), sorted(picked[i] for i in order[half:])


def take(rows: list[dict], n: int, rng: np.random.Generator) -> list[dict]:
    """Seeded subsample of at most n rows, original order kept."""
    if len(rows) <= n:
        return rows
    return [rows[i] for i in sorted(rng.choice(len(rows), size=n, replace=False))]


def _task(target, holdout, **info) -> dict:
    return {"target": target, "holdout": holdout, "info": info}


# ---- LAMBADA-style ----------------------------------------------------------------------------------------------


def lambada_examples(text: str, unit: str, window: int = 4, stride: int = 1, max_chars: int = 800) -> list[dict]:
    """Passages of `window` sentences; target = last word, kept if it is a ≥3-letter non-stopword seen earlier."""
    sents = sentences(text)
    out = []
    for i in range(0, max(0, len(sents) - window + 1), stride):
        passage = " ".join(sents[i : i + window])
        m = re.search(r"\s([A-Za-z]+)([.!?;:,'\")\]]*)$", passage)
        if not m or len(passage) > max_chars or len(passage) < 150:
            continue
        word = m.group(1)
        context = passage[: m.start()]
        earlier = set(re.findall(r"[a-z]+", context.lower()))
        if len(word) >= 3 and word.lower() not in STOPWORDS and word.lower() in earlier:
            out.append(
                {"context": context, "continuation": " " + word, "id": f"{unit}#{i}", "_key": context + " " + word}
            )
    return out


def lambada_style(docs: list[dict], rng: np.random.Generator, fraction: float = 0.4, n: int = 1000):
    """Last-word prediction over held-out chapters of Austen and Moby-Dick and held-out Brown fiction files."""
    narrative = [
        d
        for d in docs
        if d["source"] in ("austen", "moby_dick")
        or (
            d["source"] == "brown"
            and d["genre"] in ("fiction", "mystery", "science_fiction", "adventure", "romance", "humor")
        )
    ]
    t_units, h_units = split_units([f"{d['source']}|{d['unit']}" for d in narrative], fraction, rng)
    splits = {}
    for name, units in (("target", set(t_units)), ("holdout", set(h_units))):
        rows = [
            r
            for d in narrative
            if f"{d['source']}|{d['unit']}" in units
            for r in lambada_examples(d["text"], d["unit"])
        ]
        splits[name] = take(rows, n, rng)
    held = _held(t_units + h_units)
    info = dict(
        family="lambada_style",
        num_fewshot=0,
        source="austen, moby_dick, brown (fiction)",
        description="LAMBADA-style last-word prediction; the target word occurs earlier in the passage",
        held_out_units="whole chapters (Austen, Moby-Dick) and whole Brown fiction files",
    )
    return {"lambada_style": _task(splits["target"], splits["holdout"], **info)}, held


def _held(tagged: list[str]) -> dict[str, set[str]]:
    held: dict[str, set[str]] = {}
    for t in tagged:
        src, unit = t.split("|", 1)
        held.setdefault(src, set()).add(unit)
    return held


# ---- Jeopardy-style trivia --------------------------------------------------------------------------------------


def fewshot(rows: list[dict], render, k: int, rng: np.random.Generator) -> list[dict]:
    """Prefix each row's context with k demonstrations drawn (seeded) from the other rows of the same split."""
    out = []
    for i, r in enumerate(rows):
        pool = [j for j in rng.choice(len(rows), size=min(len(rows), k + 1), replace=False) if j != i][:k]
        demos = "".join(render(rows[j]) + rows[j]["continuation"] + "\n\n" for j in pool)
        out.append({**r, "context": demos + r["context"]})
    return out


def jeopardy_style(facts: list[dict], rng: np.random.Generator, n: int = 1000, k: int = 3):
    """Closed-book clue -> answer; facts = [{key, answer, category, clue, source}]; split by answer entity."""
    answers = sorted({f["answer"].lower() for f in facts})
    t_ans, h_ans = split_units(answers, min(1.0, 2.6 * n / max(1, len(answers))), rng)
    render = lambda f: f"Category: {f['category']}\nClue: {f['clue']}\nAnswer:"  # noqa: E731
    splits, held = {}, {}
    for name, ans in (("target", set(t_ans)), ("holdout", set(h_ans))):
        rows = [
            {"context": render(f), "continuation": " " + f["answer"], "id": f["key"], "_key": f["clue"], **{"_f": f}}
            for f in facts
            if f["answer"].lower() in ans
        ]
        rows = take(rows, n, rng)
        for r in rows:
            held.setdefault(r["_f"]["source"], set()).add(r["_f"]["key"])
        splits[name] = fewshot(
            [
                {k2: v for k2, v in r.items() if k2 != "_f"}
                | {"category": r["_f"]["category"], "clue": r["_f"]["clue"]}
                for r in rows
            ],
            render,
            k,
            rng,
        )
        splits[name] = [{k2: v for k2, v in r.items() if k2 not in ("category", "clue")} for r in splits[name]]
    info = dict(
        family="jeopardy_style",
        num_fewshot=k,
        source="wordnet instance synsets, chatterbot-corpus trivia",
        description="Jeopardy-style closed-book trivia: category + clue -> answer (3-shot)",
        held_out_units="the glosses of every WordNet synset used as a clue are removed from the pool",
    )
    return {"jeopardy_style": _task(splits["target"], splits["holdout"], **info)}, held


# ---- SQuAD-style ------------------------------------------------------------------------------------------------


def cloze_examples(text: str, unit: str, max_passage: int = 320) -> list[dict]:
    """Paragraph -> (passage, question sentence with a capitalised word blanked), answer a span of the passage."""
    out = []
    for pi, para in enumerate(re.split(r"\n\s*\n", text)):
        sents = sentences(para)
        for j in range(2, len(sents)):
            passage = " ".join(sents[max(0, j - 3) : j])
            while len(passage) > max_passage and " " in passage and passage.count(". ") > 0:
                passage = passage.split(". ", 1)[1]
            q = sents[j]
            if len(passage) > max_passage or len(q) > 200:
                continue
            words = q.split()
            for w in words[1:]:
                w2 = w.strip(",.;:!?\"'()")
                if (
                    len(w2) >= 4
                    and w2[0].isupper()
                    and w2.isalpha()
                    and w2.lower() not in STOPWORDS
                    and re.search(rf"\b{w2}\b", passage)
                    and not re.search(rf"\b{w2}\b.*\b{w2}\b", q)
                ):
                    question = re.sub(rf"\b{w2}\b", "_____", q, count=1)
                    ctx = f"Passage: {passage}\nQuestion: Which word from the passage fills the blank? {question}"
                    ctx += "\nAnswer:"
                    out.append(
                        {
                            "context": ctx,
                            "continuation": " " + w2,
                            "id": f"{unit}#{pi}.{j}",
                            "_key": passage + " " + q,
                            "_render": ctx,
                        }
                    )
                    break
    return out


def squad_style(docs: list[dict], rng: np.random.Generator, fraction: float = 0.3, n: int = 1000, k: int = 3):
    """Extractive cloze over held-out SOTU speeches and Brown press files (SQuAD-style, span answers)."""
    news = [
        d
        for d in docs
        if d["source"] == "sotu" or (d["source"] == "brown" and d["genre"] in ("news", "editorial", "reviews"))
    ]
    t_units, h_units = split_units([f"{d['source']}|{d['unit']}" for d in news], fraction, rng)
    splits = {}
    for name, units in (("target", set(t_units)), ("holdout", set(h_units))):
        rows = [r for d in news if f"{d['source']}|{d['unit']}" in units for r in cloze_examples(d["text"], d["unit"])]
        rows = take(rows, n, rng)
        rendered = fewshot(rows, lambda r: r["_render"], k, rng)
        splits[name] = [{kk: v for kk, v in r.items() if kk != "_render"} for r in rendered]
    info = dict(
        family="squad_style",
        num_fewshot=k,
        source="sotu, brown (press)",
        description="SQuAD-style extractive cloze: passage + question -> a word span of the passage (3-shot); "
        "not SQuAD",
        held_out_units="whole SOTU speeches and whole Brown press files",
    )
    return {"squad_style": _task(splits["target"], splits["holdout"], **info)}, _held(t_units + h_units)


# ---- algorithmic ------------------------------------------------------------------------------------------------


def algorithmic_row(kind: str, rng: np.random.Generator) -> dict:
    if kind == "addition":
        d = int(rng.integers(2, 6))
        a, b = (int(x) for x in rng.integers(10 ** (d - 1), 10**d, size=2))
        return {"context": f"{a} + {b} =", "continuation": f" {a + b}"}
    xs = [int(x) for x in rng.integers(0, 100, size=int(rng.integers(4, 8)))]
    if kind == "sorting":
        return {"context": f"Sort: {' '.join(map(str, xs))} ->", "continuation": " " + " ".join(map(str, sorted(xs)))}
    letters = "".join(chr(97 + int(x)) for x in rng.integers(0, 26, size=int(rng.integers(4, 9))))
    return {"context": f"Copy: {' '.join(letters)} ->", "continuation": " " + " ".join(letters)}


def algorithmic(rng: np.random.Generator, n: int = 1000):
    """Multi-digit addition, sorting and copying (0-shot), generated; target and holdout never share a context."""
    seen, splits = set(), {}
    for name in ("target", "holdout"):
        rows = []
        while len(rows) < n:
            kind = ("addition", "sorting", "copying")[len(rows) % 3]
            r = algorithmic_row(kind, rng)
            if r["context"] not in seen:
                seen.add(r["context"])
                rows.append({**r, "id": f"{name}-{kind}-{len(rows):05d}", "_key": r["context"] + r["continuation"]})
        splits[name] = rows
    info = dict(
        family="algorithmic",
        num_fewshot=0,
        source="generated (seeded)",
        description="multi-digit addition, sorting and copying of short lists",
        held_out_units="none (generated)",
    )
    return {"algorithmic": _task(splits["target"], splits["holdout"], **info)}, {}


# ---- unseen multiple-choice tasks -------------------------------------------------------------------------------


def multiple_choice(items: list[tuple[str, str, str]], rng: np.random.Generator, n_choices: int = 4) -> list[dict]:
    """items = [(id, context, answer)] -> rows with 4 choices (answer + distractors from other items), seeded order."""
    answers = sorted({a for _, _, a in items})
    out = []
    for item_id, ctx, ans in items:
        others = [a for a in rng.choice(answers, size=min(len(answers), n_choices + 2), replace=False) if a != ans]
        choices = [ans] + others[: n_choices - 1]
        perm = rng.permutation(len(choices))
        choices = [choices[i] for i in perm]
        idx = choices.index(ans)
        # overstrike and BEL from the sources are cleaned only now, after every draw from rng, so the cleaning
        # changes no other task's examples (the draws are shared with the tasks built after this one)
        clean = clean_control(ctx)
        ctx, choices = (clean.strip() if clean != ctx else ctx), [clean_control(c) for c in choices]
        assert len(set(choices)) == len(choices), f"{item_id}: choices {choices} coincide once cleaned"
        out.append(
            {
                "context": ctx,
                "continuation": choices[idx],
                "choices": choices,
                "answer": idx,
                "id": clean_control(item_id),
                "_key": ctx + choices[idx],
            }
        )
    return out


def _mc_task(name, items_by_split, rng, **info):
    return {name: _task(*(multiple_choice(items_by_split[s], rng) for s in ("target", "holdout")), **info)}


def definition_task(name: str, source: str, entries: list[tuple[str, str]], rng, fraction: float, n: int = 1000):
    """Definition -> term (multiple choice) over held-out dictionary entries [(term, definition)]."""
    terms = sorted({t for t, _ in entries})
    t_units, h_units = split_units(terms, fraction, rng)
    by_split = {}
    for split, units in (("target", set(t_units)), ("holdout", set(h_units))):
        items = []
        for term, definition in entries:
            if term in units:
                blanked = re.sub(re.escape(term), "___", definition, flags=re.I)[:400]
                items.append((f"{source}:{term}", f"Definition: {blanked}\nTerm:", " " + term))
        by_split[split] = take(items, n, rng)
    tasks = _mc_task(
        name,
        by_split,
        rng,
        family="unseen_eval",
        num_fewshot=0,
        source=source,
        description=f"definition -> term, multiple choice, held-out {source} entries",
        held_out_units="whole dictionary entries",
    )
    return tasks, {source: {t.lower() for t in t_units + h_units}}


def completion_task(
    name: str, source: str, texts: list[tuple[str, str]], rng, fraction: float, tail: int, n: int = 1000
):
    """Completion of held-out texts [(unit, text)]: context = text minus its last `tail` words; 4 endings."""
    t_units, h_units = split_units([u for u, _ in texts], fraction, rng)
    by_split = {}
    for split, units in (("target", set(t_units)), ("holdout", set(h_units))):
        items = []
        for unit, text in texts:
            words = text.split()
            if unit in units and len(words) >= tail + 5:
                items.append((f"{source}:{unit}", " ".join(words[:-tail]), " " + " ".join(words[-tail:])))
        by_split[split] = take(items, n, rng)
    return by_split, t_units + h_units


def capital_task(pairs: list[dict], rng: np.random.Generator):
    """Country -> capital (multiple choice) from bsdgames quiz facts, split by country."""
    t_units, h_units = split_units([p["country"] for p in pairs], 1.0, rng)
    by_split = {
        s: [
            (f"capital:{p['country']}", f"Q: What is the capital of {p['country']}?\nA:", " " + p["capital"])
            for p in pairs
            if p["country"] in set(u)
        ]
        for s, u in (("target", t_units), ("holdout", h_units))
    }
    return _mc_task(
        "country_capital",
        by_split,
        rng,
        family="unseen_eval",
        num_fewshot=0,
        source="bsdgames quiz",
        description="capital of a country, multiple choice",
        held_out_units="facts (not pool text)",
    )

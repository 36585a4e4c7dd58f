"""WordNet 3.0 (Debian wordnet-base): synset glosses as pool text, and instance synsets as trivia facts.

data.POS lines: `offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt ptr... [frames] | gloss`. A pointer
is `symbol offset pos src/tgt`; `@i` marks an instance hypernym (e.g. Paris @i national_capital).
"""

from __future__ import annotations

from pathlib import Path

from dsdm.sources.text import doc

POS_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}


def parse_data_line(line: str) -> dict | None:
    """One data.POS line -> {offset, pos, lemmas, pointers [(symbol, offset, pos)], gloss}; None for the header."""
    if line.startswith("  "):
        return None
    head, _, gloss = line.partition(" | ")
    f = head.split()
    offset, pos, n_words = f[0], f[2], int(f[3], 16)
    lemmas = [f[4 + 2 * i] for i in range(n_words)]
    i = 4 + 2 * n_words
    n_ptr = int(f[i])
    ptrs = [(f[i + 1 + 4 * k], f[i + 2 + 4 * k], f[i + 3 + 4 * k]) for k in range(n_ptr)]
    return {"offset": offset, "pos": pos, "lemmas": lemmas, "pointers": ptrs, "gloss": gloss.strip()}


def synsets(root: Path) -> list[dict]:
    """All synsets in file order (noun, verb, adj, adv)."""
    d = root / "usr" / "share" / "wordnet"
    out = []
    for pos, name in POS_FILES.items():
        for line in (d / name).read_text(encoding="utf-8", errors="replace").splitlines():
            s = parse_data_line(line)
            if s:
                s["key"] = f"{pos}{s['offset']}"
                out.append(s)
    return out


def lemma_text(lemma: str) -> str:
    """'New_York(a)' -> 'New York'."""
    return lemma.split("(")[0].replace("_", " ")


def gloss_line(s: dict) -> str:
    return f"{', '.join(lemma_text(w) for w in s['lemmas'])}: {s['gloss']}"


def instance_facts(syns: list[dict]) -> list[dict]:
    """Instance noun synsets -> [{key, answer, category, clue}]: clue = gloss definition, answer = first lemma."""
    by_off = {s["offset"]: s for s in syns if s["pos"] == "n"}
    out = []
    for s in syns:
        hyper = [p for p in s["pointers"] if p[0] == "@i" and p[2] == "n"]
        if s["pos"] != "n" or not hyper or hyper[0][1] not in by_off:
            continue
        answer = lemma_text(s["lemmas"][0])
        clue = s["gloss"].split(";")[0].strip().rstrip(".")
        category = lemma_text(by_off[hyper[0][1]]["lemmas"][0])
        if len(clue) >= 15 and answer.lower() not in clue.lower():
            out.append({"key": s["key"], "answer": answer, "category": category, "clue": clue})
    return out


def wordnet(roots: list[Path]) -> list[dict]:
    """WordNet glosses: one document per synset ("lemma, lemma: gloss; examples"); unit = the synset key.

    The registry groups consecutive synsets into larger documents after held-out synsets are removed."""
    return [doc(gloss_line(s), "wordnet", s["key"], "dictionary") for s in synsets(roots[0])]

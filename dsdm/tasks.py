"""Target tasks: (context, continuation) examples with a `target` split (drives selection) and a `holdout` split
(evaluation only).

File format: JSONL, one example per line, with either
    {"context": "...", "continuation": " answer"}      loss and metrics on the continuation tokens only, or
    {"text": "..."}                                    every token scored (context empty),
optionally {"choices": ["...", ...], "answer": i} for multiple choice (continuation defaults to choices[answer]),
and optionally {"split": "target" | "holdout"} and {"id": "..."}.
Whitespace convention (lm-evaluation-harness): the space separating context and continuation belongs to the
continuation, e.g. context "Paris is the capital of", continuation " France".

A task on disk is one of:
    TASK_DIR/                 with target.jsonl and holdout.jsonl (and optionally task.json: name, description, ...)
    FILE.jsonl                one file whose rows carry a `split` field
    TARGET.jsonl,HOLDOUT.jsonl  two files, comma-separated; named after the files' common stem
                              (qa.target.jsonl,qa.holdout.jsonl -> qa), else their folder's name
and any of these behind `name=NAME:` is named NAME (name=qa:t.jsonl,h.jsonl). Task text may hold TAB and LF but no
other control character (C0, DEL, C1): sources' overstrike and BEL are decoded or dropped when tasks are built.
The same loader and the same encoder (`encode_examples`) feed both featurization (targets) and evaluation
(holdouts), so the two cannot drift apart.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("target", "holdout")


@dataclass(frozen=True)
class TaskExample:
    context: str
    continuation: str
    choices: tuple[str, ...] | None = None
    answer: int | None = None
    id: str = ""


@dataclass
class Task:
    name: str
    target: list[TaskExample]
    holdout: list[TaskExample]
    info: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata from task.json (description, family, num_fewshot, source, ...)."""

    def split(self, name: str) -> list[TaskExample]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return self.target if name == "target" else self.holdout


def parse_example(row: Any, where: str) -> tuple[TaskExample, str | None]:
    """Validate one decoded JSONL row -> (TaskExample, split or None). `where` is 'file:line' for errors."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
    split = row.get("split")
    if split is not None and split not in SPLITS:
        raise ValueError(f"{where}: split must be 'target' or 'holdout', got {split!r}")
    choices = row.get("choices")
    answer = row.get("answer")
    if choices is not None:
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise ValueError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices)):
            raise ValueError(
                f"{where}: 'answer' must be an index into 'choices' (0..{len(choices) - 1}), got {answer!r}"
            )
        choices = tuple(choices)
    elif answer is not None:
        raise ValueError(f"{where}: 'answer' is given without 'choices'")
    if "text" in row:
        if "context" in row or "continuation" in row:
            raise ValueError(f"{where}: give either 'text' or 'context' + 'continuation', not both")
        context, continuation = "", row["text"]
    else:
        if "context" not in row:
            raise ValueError(f"{where}: missing 'context' (or give 'text' to score every token)")
        context = row["context"]
        continuation = row.get("continuation", choices[answer] if choices is not None else None)
        if continuation is None:
            raise ValueError(f"{where}: missing 'continuation'")
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise ValueError(f"{where}: 'context' and 'continuation' must be strings")
    if not continuation:
        raise ValueError(f"{where}: the continuation (or text) is empty; nothing would be scored")
    if choices is not None and continuation != choices[answer]:
        raise ValueError(f"{where}: 'continuation' differs from choices[answer]")
    check_text([context, continuation, *(choices or ())], where)
    return TaskExample(context, continuation, choices, answer, str(row.get("id", where))), split


CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""Characters task text may not hold: C0 controls except TAB and LF, DEL, C1 controls (same set as
dsdm.sources.text.CONTROL_CHARS, which the builders use to clean)."""


def check_text(texts: list[str], where: str) -> None:
    """Raise ValueError naming `where` ('file:line') if any text holds a control character."""
    for text in texts:
        m = CONTROL_CHARS.search(text)
        if m:
            raise ValueError(
                f"{where}: control character {m.group()!r} in task text ...{text[max(0, m.start() - 20) : m.end()]!r}; "
                "decode or remove it (dsdm.sources.text.clean_control decodes overstrike and drops the rest)"
            )


def read_examples(path: str | Path) -> list[tuple[TaskExample, str | None]]:
    """Parse a task JSONL file; errors name the file and line and say what to fix."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            out.append(parse_example(row, f"{path}:{lineno}"))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_spec(spec: str | Path) -> tuple[str | None, list[str]]:
    """'name=qa:t.jsonl,h.jsonl' -> ('qa', ['t.jsonl', 'h.jsonl']); 'DIR' -> (None, ['DIR'])."""
    spec, name = str(spec), None
    if spec.startswith("name="):
        name, sep, spec = spec[len("name=") :].partition(":")
        if not sep or not _NAME.fullmatch(name) or not spec:
            raise ValueError(
                f"task spec name={name}{sep}{spec}: write name=NAME:SPEC with NAME of letters, digits, '.', '_', '-'"
            )
    return name, spec.split(",", 1) if "," in spec else [spec]


def resolve_spec(spec: str | Path, base: Path) -> str:
    """The same spec with each relative path made relative to `base` (the name= prefix kept)."""
    name, paths = parse_spec(spec)
    joined = ",".join(str(p if Path(p).is_absolute() else base / p) for p in paths)
    return f"name={name}:{joined}" if name else joined


def pair_name(target_path: str, holdout_path: str) -> str:
    """Name of a 'T.jsonl,H.jsonl' task: the stems' common prefix in whole words ('qa.target', 'qa.holdout' ->
    'qa'), else the name of the folder holding both, else the target file's stem."""
    a, b = (re.split(r"([._-])", Path(p).stem) for p in (target_path, holdout_path))
    common = []
    for x, y in zip(a, b):
        if x != y:
            break
        common.append(x)
    while common and (common[-1] in ("", ".", "_", "-")):
        common.pop()
    if common:
        return "".join(common)
    folder = Path(target_path).resolve().parent
    return folder.name if folder == Path(holdout_path).resolve().parent and folder.name else Path(target_path).stem


def load_task(spec: str | Path, name: str | None = None) -> Task:
    """Load a task from a directory, one JSONL with a split field, or 'TARGET.jsonl,HOLDOUT.jsonl', optionally
    behind 'name=NAME:' (see the module docstring); `name` overrides every other naming."""
    spec_name, paths = parse_spec(spec)
    name = name or spec_name
    spec = paths[0] if len(paths) == 1 else str(spec)
    info: dict[str, Any] = {}
    if len(paths) == 2:
        target_path, holdout_path = paths
        pairs = {"target": read_examples(target_path), "holdout": read_examples(holdout_path)}
        default_name = pair_name(target_path, holdout_path)
    elif Path(spec).is_dir():
        d = Path(spec)
        if (d / "task.json").exists():
            info = json.loads((d / "task.json").read_text(encoding="utf-8"))
        pairs = {s: read_examples(d / f"{s}.jsonl") for s in SPLITS}
        default_name = info.get("name", d.name)
    else:
        rows = read_examples(spec)
        missing = sum(1 for _, s in rows if s is None)
        if missing:
            raise ValueError(
                f"{spec}: {missing} rows have no 'split' field; a single task file needs split=target|holdout on "
                "every row (or pass TARGET.jsonl,HOLDOUT.jsonl, or a directory with target.jsonl and holdout.jsonl)"
            )
        pairs = {s: [(ex, s) for ex, split in rows if split == s] for s in SPLITS}
        default_name = Path(spec).stem
    splits = {}
    for s, rows in pairs.items():
        wrong = [ex.id for ex, split in rows if split not in (None, s)]
        if wrong:
            raise ValueError(f"{spec}: rows {wrong[:3]} are marked split!={s!r} but sit in the {s} file")
        splits[s] = [ex for ex, _ in rows]
        if not splits[s]:
            raise ValueError(f"{spec}: the {s} split is empty")
    return Task(name=name or default_name, target=splits["target"], holdout=splits["holdout"], info=info)


def encode_example(tokenizer, ex: TaskExample, max_len: int, bos_id: int, continuation: str | None = None):
    """Tokens and score mask for one example: (T,) int64 ids, (T,) bool True on continuation tokens.

    Context and continuation are encoded separately and concatenated (lm-eval convention), so the continuation's
    tokens are exactly those it has on its own. An empty context becomes [bos_id] so the first token is scored given
    something. Too-long examples lose tokens from the left of the context; a continuation longer than max_len - 1 is
    an error (it could not be scored).
    """
    cont = ex.continuation if continuation is None else continuation
    ctx_ids = tokenizer.encode(ex.context, add_special_tokens=False).ids if ex.context else [bos_id]
    cont_ids = tokenizer.encode(cont, add_special_tokens=False).ids
    if not cont_ids:
        raise ValueError(f"example {ex.id}: continuation {cont!r} encodes to no tokens")
    if len(cont_ids) > max_len - 1:
        raise ValueError(f"example {ex.id}: continuation has {len(cont_ids)} tokens, more than max_len-1={max_len - 1}")
    ctx_ids = ctx_ids[-(max_len - len(cont_ids)) :]
    ids = np.asarray(ctx_ids + cont_ids, dtype=np.int64)
    score = np.zeros(ids.shape[0], dtype=bool)
    score[len(ctx_ids) :] = True
    return ids, score


def encode_examples(
    tokenizer, examples: list[TaskExample], max_len: int, bos_id: int, continuations: list[str | None] | None = None
):
    """Batch of examples -> tokens (n, T) int64, mask (n, T) bool (real tokens), score (n, T) bool (continuation).

    Right-padded to the longest example. The prediction of token t is scored iff score[t] (so position 0 is never
    scored: every example has at least one context or bos token). `continuations[i]`, when given and not None,
    replaces example i's continuation (multiple-choice scoring of each choice).
    """
    conts = continuations if continuations is not None else [None] * len(examples)
    encoded = [encode_example(tokenizer, ex, max_len, bos_id, c) for ex, c in zip(examples, conts)]
    width = max(ids.shape[0] for ids, _ in encoded)
    tokens = np.zeros((len(encoded), width), dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=bool)
    score = np.zeros((len(encoded), width), dtype=bool)
    for i, (ids, sc) in enumerate(encoded):
        tokens[i, : ids.shape[0]] = ids
        mask[i, : ids.shape[0]] = True
        score[i, : ids.shape[0]] = sc
    return tokens, mask, score


# -----------------------------------------------------------------------------
# Multiple-choice form of every task: the right continuation against distractors
#
# Tasks whose rows carry `choices` are used as they are. For the others each example gets n_choices - 1
# distractors, drawn with a generator seeded by (seed, example index), so every model sees the same choices and an
# example's choices do not depend on which other examples are evaluated:
#   algorithmic           corrupted answers: one digit of the sum changed; two unequal numbers of the sorted list
#                         swapped; one letter of the copy changed (answers other examples give would be trivial)
#   lambada_style, squad_style   other words of the example's own passage, shaped like the answer (capitalized
#                         if it is; >= 3 letters; not a stop word): the answer is a word of the passage
#   anything else         other examples' continuations (distinct from the answer)
# Rows with an empty context ({"text": ...}) have no multiple-choice form.

MC_CHOICES = 4


def _from_examples(ex: TaskExample, others: list[str], rng: np.random.Generator, k: int) -> list[str]:
    """k distinct continuations of other examples (sorted pool `others`), none equal to the answer."""
    picked: list[str] = []
    if k <= 0:
        return picked
    for j in rng.permutation(len(others)):
        if others[j] != ex.continuation and others[j] not in picked:
            picked.append(others[j])
            if len(picked) == k:
                break
    return picked


def _from_passage(ex: TaskExample, others: list[str], rng: np.random.Generator, k: int) -> list[str]:
    """Words of the example's own passage (its last few-shot block) shaped like the answer, topped up from
    other examples' continuations when the passage has too few."""
    from dsdm.sources.families import STOPWORDS

    answer = ex.continuation.strip()
    block = ex.context.split("\n\n")[-1].split("\nQuestion:")[0].removeprefix("Passage:")
    cands = sorted(
        {
            w
            for w in re.findall(r"[A-Za-z][A-Za-z'-]*[A-Za-z]", block)
            if len(w) >= 3
            and w.lower() != answer.lower()
            and w.lower() not in STOPWORDS
            and w[0].isupper() == answer[:1].isupper()
        }
    )
    picked = [" " + cands[j] for j in rng.permutation(len(cands))[:k]]
    return picked + _from_examples(ex, [o for o in others if o not in picked], rng, k - len(picked))


def _corrupt_algorithmic(ex: TaskExample, others: list[str], rng: np.random.Generator, k: int) -> list[str]:
    """Near-miss answers for addition / sorting / copying (see above); other continuations for anything else."""
    ans = ex.continuation.strip()
    if ex.context.endswith(" =") and ans.isdigit():

        def corrupt(a: str) -> str:  # one digit changed, never a leading zero
            i = int(rng.integers(len(a)))
            digits = [d for d in "0123456789" if d != a[i] and not (i == 0 and d == "0" and len(a) > 1)]
            return a[:i] + str(rng.choice(digits)) + a[i + 1 :]
    elif ex.context.startswith(("Sort:", "Copy:")) and len(set(ans.split())) >= 2:

        def corrupt(a: str) -> str:
            xs = a.split()
            if ex.context.startswith("Sort:"):  # swap two unequal numbers: same multiset, not sorted
                i, j = sorted(rng.choice(len(xs), 2, replace=False))
                while xs[i] == xs[j]:
                    i, j = sorted(rng.choice(len(xs), 2, replace=False))
                xs[i], xs[j] = xs[j], xs[i]
            else:  # one letter changed
                i = int(rng.integers(len(xs)))
                xs[i] = str(rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != xs[i]]))
            return " ".join(xs)
    else:
        return _from_examples(ex, others, rng, k)
    picked: list[str] = []
    for _ in range(50 * k):  # a short list can have fewer than k near misses
        c = " " + corrupt(ans)
        if c != ex.continuation and c not in picked:
            picked.append(c)
            if len(picked) == k:
                break
    return picked


DISTRACTORS = {"algorithmic": _corrupt_algorithmic, "lambada_style": _from_passage, "squad_style": _from_passage}
"""Task family (task.json `family`) -> distractor builder; other families draw other examples' continuations."""


def mc_examples(task: Task, split: str = "holdout", n_choices: int = MC_CHOICES, seed: int = 0):
    """The split's examples in multiple-choice form: rows with `choices` unchanged, the others given the answer and
    n_choices - 1 distractors (position of the answer seeded too). Returns None when no example has a
    multiple-choice form (every row is text-only, or all continuations are equal)."""
    examples = task.split(split)
    if all(ex.choices is not None for ex in examples):
        return list(examples)
    build = DISTRACTORS.get(task.info.get("family", ""), _from_examples)
    others = sorted({ex.continuation for ex in examples if ex.context})
    out = []
    for i, ex in enumerate(examples):
        if ex.choices is None and ex.context:
            rng = np.random.default_rng([seed, i])
            wrong = build(ex, others, rng, n_choices - 1)
            if wrong:
                answer = int(rng.integers(len(wrong) + 1))
                ex = replace(ex, choices=tuple(wrong[:answer] + [ex.continuation] + wrong[answer:]), answer=answer)
        out.append(ex)
    return out if any(ex.choices is not None for ex in out) else None


# -----------------------------------------------------------------------------
# Leak check: holdout examples that occur in the pool


def normalize(text: str) -> str:
    """Leak-check normal form: Unicode NFKC, lowercase, every whitespace run a single space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def _pool_texts(pool, block: int, overlap: int):
    """Normalized decoded pool text in blocks of `block` examples. Packed examples are consecutive slices of one
    token stream, so each block is decoded with the previous block's last `overlap` tokens in front (a holdout
    text cut by an example boundary is still found); per-document examples are decoded one by one and joined
    with a NUL, which no normalized key contains."""
    offsets = np.asarray(pool.offsets)
    packed = pool.manifest.get("mode") == "pack"
    for start in range(0, len(pool), block):
        stop = min(start + block, len(pool))
        if packed:
            lo = max(int(offsets[start]) - overlap, 0)
            yield normalize(pool.tokenizer.decode(pool.tokens[lo : offsets[stop]].tolist(), skip_special_tokens=False))
        else:
            rows = [pool[i].tolist() for i in range(start, stop)]
            yield " \x00 ".join(normalize(t) for t in pool.tokenizer.decode_batch(rows, skip_special_tokens=False))


def find_leaks(pool, tasks: list[Task], anchor: int = 8, block: int = 512) -> dict[str, list[str]]:
    """Holdout example ids per task whose normalized context + continuation occurs in the decoded pool text.

    Exact substring semantics, linear in the pool: if a normalized key K of w words occurs in the normalized text,
    its interior words (all but the first and last, which may be glued to neighbours) occur there as whole words.
    Each key is indexed by its first min(anchor, w - 2) interior words; a pool block is searched for K (a substring
    test) only when it contains that word n-gram. Keys of one or two words are substring-tested directly.
    """
    keys = {k: None for task in tasks for ex in task.holdout if (k := normalize(ex.context + ex.continuation))}
    by_n: dict[int, dict[tuple[str, ...], list[str]]] = {}  # n -> interior n-gram -> keys
    short = []
    for k in keys:
        words = k.split()
        if len(words) <= 2:
            short.append(k)
            continue
        n = min(anchor, len(words) - 2)
        by_n.setdefault(n, {}).setdefault(tuple(words[1 : 1 + n]), []).append(k)
    longest = max((len(pool.tokenizer.encode(k).ids) for k in keys), default=0)
    found: set[str] = set()
    for text in _pool_texts(pool, block, overlap=4 * longest + 16):  # normalization can only shorten the text
        words = text.split()
        for n, index in by_n.items():
            for gram in set(zip(*(words[j:] for j in range(n)))) & index.keys():
                found.update(k for k in index[gram] if k not in found and k in text)
        found.update(k for k in short if k not in found and k in text)
    return {t.name: [ex.id for ex in t.holdout if normalize(ex.context + ex.continuation) in found] for t in tasks}

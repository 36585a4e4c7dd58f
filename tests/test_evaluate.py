"""Evaluation (dsdm.evaluate) and the multiple-choice form of tasks (dsdm.tasks.mc_examples): golden values from a
hand-built bigram model (summed vs per-character log-probability, chance, CIs), seeded deterministic distractors
for every task family, and no multiple-choice form for text-only tasks.

Run: pytest tests/test_evaluate.py
"""

import math

import numpy as np
import pytest

# the hand-built bigram model and its word tokenizer: golden log-probabilities are sums of table entries
from test_models import TABLE, WORDS, Bigram
from test_models import _word_tokenizer as word_tokenizer

from dsdm.evaluate import evaluate_task
from dsdm.tasks import MC_CHOICES, Task, TaskExample, load_task, mc_examples


def test_mc_accuracy_summed_and_per_character_golden_values():
    exs = [
        # summed: " c" (log .1 = -2.30) beats the long answer (2 (log .6 + log .5 + log .7) = -3.12);
        # per character the answer wins (-3.12 / 12 = -0.26 against -2.30 / 2 = -1.15)
        TaskExample("a", " b c a b c a", choices=(" c", " b c a b c a"), answer=1, id="long"),
        TaskExample("b", " c", choices=(" d", " c", " a"), answer=1, id="right"),  # .2 / .5 / .1
        TaskExample("c", " b", choices=(" a", " b"), answer=1, id="wrong"),  # .7 against .1
    ]
    r = evaluate_task(Bigram(TABLE), word_tokenizer(WORDS), Task("toy", exs, exs), batch_size=2)
    assert r["mc_accuracy"] == pytest.approx(1 / 3) and r["mc_accuracy_norm"] == pytest.approx(2 / 3)
    assert r["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3) and r["n_mc"] == 3
    assert r["per_example"]["mc_correct"] == [False, True, False]
    assert r["mc_ci"][0] <= r["mc_accuracy"] <= r["mc_ci"][1] and r["mc_ci"][0] < r["mc_ci"][1]
    gold_loss = [-2 * (math.log(0.6) + math.log(0.5) + math.log(0.7)) / 6, -math.log(0.5), -math.log(0.1)]
    np.testing.assert_allclose(r["per_example"]["loss"], gold_loss, rtol=1e-6)


def test_a_task_without_choices_gets_a_seeded_multiple_choice_form():
    pairs = [("a", "b"), ("b", "c"), ("c", "a"), ("a", "d"), ("b", "b")]
    exs = [TaskExample(c, " " + y, id=f"x{i}") for i, (c, y) in enumerate(pairs)]
    task = Task("plain", exs[:2], exs)
    r = evaluate_task(Bigram(TABLE), word_tokenizer(WORDS), task)
    assert r["n_mc"] == 5 and r["chance"] == pytest.approx(1 / MC_CHOICES)
    # the greedy answers: b after a (right), c after b (right), a after c (right), b after a (d wrong), c after b
    assert r["per_example"]["correct"] == [True, True, True, False, False]
    # the choices are the 4 distinct continuations; the bigram's argmax decides: right exactly where greedy is
    assert r["per_example"]["mc_correct"] == [True, True, True, False, False]
    assert evaluate_task(Bigram(TABLE), word_tokenizer(WORDS), task, build_mc=False)["mc_accuracy"] is None


def test_mc_examples_are_deterministic_distinct_and_keep_given_choices():
    exs = [TaskExample(f"q{i}", f" answer {i % 7}", id=str(i)) for i in range(40)]
    given = TaskExample("q", " yes", choices=(" no", " yes"), answer=1, id="given")
    task = Task("t", exs, exs + [given])
    a, b = mc_examples(task), mc_examples(task)
    assert a == b and a != mc_examples(task, seed=1)
    assert a[-1] == given
    positions = set()
    for ex in a[:-1]:
        assert len(ex.choices) == MC_CHOICES and len(set(ex.choices)) == MC_CHOICES
        assert ex.choices[ex.answer] == ex.continuation
        positions.add(ex.answer)
    assert positions == set(range(MC_CHOICES))  # the answer's position is drawn too
    text_only = Task("lm", [TaskExample("", "some text")], [TaskExample("", "more text"), TaskExample("", "x")])
    assert mc_examples(text_only) is None
    same = Task("same", exs[:1], [TaskExample("q", " a"), TaskExample("r", " a")])
    assert mc_examples(same) is None  # no distractor exists


def test_algorithmic_distractors_are_near_misses():
    task = load_task("data/demo/tasks/algorithmic")
    for ex in mc_examples(task)[:60]:
        wrong = [c for i, c in enumerate(ex.choices) if i != ex.answer]
        assert len(wrong) == MC_CHOICES - 1
        for c in wrong:
            if ex.context.startswith("Sort:"):  # same numbers, not sorted
                assert sorted(c.split(), key=int) == sorted(ex.continuation.split(), key=int)
            elif ex.context.startswith("Copy:"):  # one letter differs
                assert sum(x != y for x, y in zip(c.split(), ex.continuation.split())) == 1
            else:  # one digit differs, same length
                assert len(c) == len(ex.continuation) and sum(x != y for x, y in zip(c, ex.continuation)) == 1


@pytest.mark.parametrize("name", ["lambada_style", "squad_style", "jeopardy_style"])
def test_passage_and_example_distractors(name):
    task = load_task(f"data/demo/tasks/{name}")
    examples = mc_examples(task)
    assert all(ex.choices is not None and len(set(ex.choices)) == MC_CHOICES for ex in examples)
    if name == "lambada_style":  # distractors are words of the passage, like the answer
        ex = examples[0]
        assert all(c.strip() in ex.context for c in ex.choices)


# ---- lm-evaluation-harness: export, and the same numbers from both tools ------------------------------------------


def test_export_lm_eval_writes_the_multiple_choice_form(tmp_path):
    import json

    import yaml

    from dsdm.harness import export_task, task_names

    task = load_task("data/demo/tasks/algorithmic")  # no choices in the files: dsdm's distractors are exported
    path = export_task(task, tmp_path / "alg")
    cfg = yaml.safe_load(path.read_text())
    assert cfg["task"] == "dsdm_algorithmic" and cfg["output_type"] == "multiple_choice"
    assert cfg["target_delimiter"] == "" and cfg["doc_to_choice"] == "choices"
    rows = [json.loads(x) for x in open(cfg["dataset_kwargs"]["data_files"]["test"])]
    ours = mc_examples(task)
    assert [(r["context"], tuple(r["choices"]), r["answer"]) for r in rows] == [
        (ex.context, ex.choices, ex.answer) for ex in ours
    ]
    assert task_names(tmp_path / "alg") == ["dsdm_algorithmic"]
    with pytest.raises(FileNotFoundError, match="export-lm-eval"):
        task_names(tmp_path)


def test_lm_eval_and_dsdm_agree_on_the_same_model(tmp_path):
    pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval not installed (pip install 'dsdm[lm-eval]')")
    from dsdm.evaluate import evaluate_examples
    from dsdm.harness import export_task, run_lm_eval
    from dsdm.model import build_model, save_model
    from dsdm.tokenizer import train_bpe

    task = load_task("data/demo/tasks/country_capital")
    texts = [ex.context + c for ex in task.target + task.holdout for c in ex.choices]
    tok = train_bpe(texts, 400)
    tok.save(str(tmp_path / "tokenizer.json"))
    model = build_model("micro", tok.get_vocab_size(), 64, seed=0)
    save_model(model, tmp_path / "model")
    export_task(task, tmp_path / "lm")
    theirs = run_lm_eval(tmp_path / "model", [tmp_path / "lm"], tmp_path / "tokenizer.json", samples=True)
    ours = evaluate_task(model, tok, task)
    r = theirs["dsdm_country_capital"]
    assert r["n"] == ours["n_mc"] == len(task.holdout)
    assert r["acc"] == pytest.approx(ours["mc_accuracy"]) and r["acc_norm"] == pytest.approx(ours["mc_accuracy_norm"])
    per_choice = evaluate_examples(model, tok, mc_examples(task))["choice_logp"]
    np.testing.assert_allclose(
        np.concatenate(theirs["_samples"]["dsdm_country_capital"]), np.concatenate(per_choice), atol=1e-3
    )

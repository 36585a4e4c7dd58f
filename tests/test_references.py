"""N-gram references (dsdm.references): hand-computed unigram (add-one) and bigram (interpolated Kneser-Ney,
add-one) continuation losses on a planted 4-word pool; normalization; dense, sparse and streamed counts agree.

Run: pytest tests/test_references.py
"""

import json
import math

import numpy as np
import pytest

from dsdm.pool import Pool, PoolWriter
from dsdm.references import ngram_counts, ngram_nll, ngram_references
from dsdm.tasks import load_task

WORDS = ["<|endoftext|>", "a", "b", "c"]
ROWS = ["a b", "a b", "a c", "b a"]  # bigrams within rows: ab x2, ac, ba (the row boundaries b|a, b|a, c|b are not)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("refs")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(root / "tokenizer.json"))
    w = PoolWriter(root / "pool", vocab_size=len(WORDS))
    for i, row in enumerate(ROWS):
        w.add(np.asarray(tok.encode(row).ids), doc_id=f"d{i}", source="s")
    w.close({"seq_len": 2, "mode": "pack", "eos_id": 0}, {"test": True}, tokenizer_json=root / "tokenizer.json")
    task = root / "task"
    task.mkdir()
    holdout = [("a", " b"), ("b", " c"), ("c", " a b")]
    (task / "target.jsonl").write_text(json.dumps({"context": "a", "continuation": " b"}) + "\n")
    (task / "holdout.jsonl").write_text(
        "".join(json.dumps({"context": c, "continuation": y}) + "\n" for c, y in holdout)
    )
    return Pool(root / "pool"), load_task(task)


def test_references_equal_hand_computed_values(pool):
    p, task = pool
    # unigram, add-one: counts a 4, b 3, c 1, eot 0; N = 8, V = 4
    uni = [-math.log(4 / 12), -math.log(2 / 12), -(math.log(5 / 12) + math.log(4 / 12)) / 2]
    # Kneser-Ney: bigram types ab (2), ac (1), ba (1): n1 = 2, n2 = 1, D = 0.5; distinct predecessors a, b, c: 1
    # each, eot 0; p_cont(a|b|c) = (0.5 + 0.5 * 3 / 4) / 3, p_cont(eot) = 0.5 * 3 / 4 / 3; c(a) = 3, c(b) = 1, c(c) = 0
    p_cont = (0.5 + 0.5 * 3 / 4) / 3
    p_b_a = (2 - 0.5) / 3 + 0.5 * 2 / 3 * p_cont
    p_c_b = 0.5 * 1 / 1 * p_cont
    kn = [-math.log(p_b_a), -math.log(p_c_b), -(math.log(p_cont) + math.log(p_b_a)) / 2]  # c never a context
    add1 = [-math.log(3 / 7), -math.log(1 / 5), -(math.log(1 / 4) + math.log(3 / 7)) / 2]
    refs = ngram_references(p, [task])[task.name]
    assert refs["unigram"] == pytest.approx(np.mean(uni))
    assert refs["bigram"] == pytest.approx(np.mean(kn))
    assert refs["bigram_add_one"] == pytest.approx(np.mean(add1))
    assert ngram_references(p, [task], split="target")[task.name]["bigram"] == pytest.approx(kn[0])


def test_bigram_distributions_are_normalized(pool):
    p, _ = pool
    counts = ngram_counts(p)
    V = len(WORDS)
    tokens = np.array([[v, w] for v in range(V) for w in range(V)])  # every (previous, next) pair
    score = np.zeros_like(tokens, dtype=bool)
    score[:, 1] = True
    for kind, nll in ngram_nll(counts, tokens, score).items():
        probs = np.exp(-nll).reshape(V, V)
        np.testing.assert_allclose(probs.sum(1), 1.0, err_msg=kind)


def test_dense_sparse_and_streamed_counts_agree(pool):
    p, task = pool
    ref = ngram_counts(p)
    assert ref.counts.tolist() == [2, 1, 1] and ref.unigram.tolist() == [0, 4, 3, 1]
    for other in (ngram_counts(p, dense_max_vocab=0), ngram_counts(p, block_tokens=1, dense_max_vocab=0)):
        assert other.keys.tolist() == ref.keys.tolist() and other.counts.tolist() == ref.counts.tolist()
        assert other.unigram.tolist() == ref.unigram.tolist()
    sub = ngram_counts(p, indices=[0, 3])  # a b | b a
    assert sub.unigram.tolist() == [0, 2, 2, 0] and sub.counts.tolist() == [1, 1]

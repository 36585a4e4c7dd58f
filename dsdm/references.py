"""N-gram references: each task's continuation loss under the pool's own unigram and bigram statistics.

A model whose holdout loss is not below the bigram reference has learned nothing an n-gram table of its training
pool does not know; in that regime the best a selector can do is match the target's n-gram statistics (what DSIR
computes), so the references tell a reader at a glance whether an experiment can show model-awareness.

Unit and tokenization are those of dsdm.evaluate's `loss`: each example is encoded by dsdm.tasks.encode_examples
with the pool's tokenizer (context and continuation separately, an empty context becomes the EOS/BOS id), every
continuation token y_j is scored given the token before it (the last context token for j = 1), an example's loss is
the mean NLL over its continuation tokens (nats) and a task's is the mean over examples.

Counts come from the pool's token ids, example by example (bigrams never cross an example boundary: a model trained
on the pool never predicts across one either), streamed in blocks so memory is bounded by the counts themselves:
a dense (V, V) int64 table up to `dense_max_vocab` (4,096: 134 MB), sorted sparse (key, count) arrays above.

- unigram: add-one (Laplace) smoothing, p(w) = (c(w) + 1) / (N + V).
- bigram: interpolated Kneser-Ney (Chen & Goodman 1998, one discount D = n1 / (n1 + 2 n2) from the counts of
  bigram types seen once and twice):
      p(w | v) = max(c(v w) - D, 0) / c(v) + D N1+(v .) / c(v) p_cont(w)      (p_cont(w) alone when c(v) = 0)
      p_cont(w) = max(N1+(. w) - D, 0) / N1+(. .) + D |{w: N1+(. w) > 0}| / N1+(. .) / V
  with c(v) the count of v as the first token of a bigram, N1+(v .) the number of distinct followers of v,
  N1+(. w) the number of distinct predecessors of w and N1+(. .) the number of distinct bigrams.
- bigram_add_one: add-one bigram, p(w | v) = (c(v w) + 1) / (c(v) + V), for comparison (much weaker than KN when
  V is large against the pool).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DENSE_MAX_VOCAB = 4096


@dataclass
class NgramCounts:
    """Unigram and bigram counts of a token corpus with vocabulary V."""

    vocab_size: int
    unigram: np.ndarray
    """(V,) int64 token counts."""
    keys: np.ndarray
    """(B,) int64 sorted bigram keys v * V + w of the bigrams seen."""
    counts: np.ndarray
    """(B,) int64 their counts."""


def _merge(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum counts of equal keys: (sorted unique keys, summed counts)."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=uniq.shape[0]).astype(np.int64)


def _blocks(pool, indices, block_tokens: int):
    """Yield (flat tokens (n,) int64, starts (n,) bool: True where a new example begins) over blocks of examples."""
    lengths = np.asarray(pool.lengths)
    indices = np.arange(len(pool)) if indices is None else np.asarray(indices, dtype=np.int64)
    ends = np.cumsum(lengths[indices])
    start = 0
    while start < indices.shape[0]:
        done = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, done + block_tokens, side="right")), start + 1)
        rows = indices[start:stop]
        flat = np.concatenate([np.asarray(pool[int(i)], dtype=np.int64) for i in rows])
        starts = np.zeros(flat.shape[0], dtype=bool)
        starts[np.concatenate([[0], np.cumsum(lengths[rows])[:-1]])] = True
        yield flat, starts
        start = stop


def ngram_counts(
    pool, indices=None, block_tokens: int = 1 << 22, dense_max_vocab: int = DENSE_MAX_VOCAB
) -> NgramCounts:
    """Unigram and within-example bigram counts of the pool's examples `indices` (default: all), streamed."""
    V = pool.vocab_size
    unigram = np.zeros(V, dtype=np.int64)
    dense = np.zeros(V * V, dtype=np.int64) if V <= dense_max_vocab else None
    keys, counts = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    for flat, starts in _blocks(pool, indices, block_tokens):
        unigram += np.bincount(flat, minlength=V)
        pair = flat[:-1] * V + flat[1:]  # (n-1,) key of (token j, token j+1)
        pair = pair[~starts[1:]]  # drop the pairs that cross into a new example
        if dense is not None:
            dense += np.bincount(pair, minlength=V * V)
        else:
            k, c = np.unique(pair, return_counts=True)
            keys, counts = _merge(np.concatenate([keys, k]), np.concatenate([counts, c]))
    if dense is not None:
        keys = np.flatnonzero(dense).astype(np.int64)
        counts = dense[keys]
    return NgramCounts(V, unigram, keys, counts)


def ngram_nll(counts: NgramCounts, tokens: np.ndarray, score: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example mean NLL (nats) of the scored tokens. tokens, score: (n, T) as from dsdm.tasks.encode_examples
    (score[t]: token t is scored given token t-1). Returns {unigram, bigram, bigram_add_one}: (n,) float64 each."""
    V, c = counts.vocab_size, counts
    prev, cur = tokens[:, :-1], tokens[:, 1:]  # (n, T-1): token t-1 predicts token t
    s = score[:, 1:]
    row, pos = np.nonzero(s)
    v, w = prev[row, pos], cur[row, pos]  # (m,) the scored bigrams
    logp = {}
    N = c.unigram.sum()
    logp["unigram"] = np.log((c.unigram[w] + 1.0) / (N + V))
    first, second = c.keys // V, c.keys % V
    ctx = np.bincount(first, weights=c.counts, minlength=V)  # c(v)
    followers = np.bincount(first, minlength=V)  # N1+(v .)
    preds = np.bincount(second, minlength=V)  # N1+(. w)
    types = c.keys.shape[0]  # N1+(. .)
    n1, n2 = int((c.counts == 1).sum()), int((c.counts == 2).sum())
    D = n1 / (n1 + 2 * n2) if n1 else 0.5
    if types:
        p_cont = (np.maximum(preds - D, 0) + D * (preds > 0).sum() / V) / types
        at = np.minimum(np.searchsorted(c.keys, v * V + w), types - 1)
        cvw = np.where(c.keys[at] == v * V + w, c.counts[at], 0).astype(np.float64)  # c(v w), 0 if unseen
    else:  # no bigram at all: the uniform distribution
        p_cont, cvw = np.full(V, 1.0 / V), np.zeros(v.shape[0])
    cv = ctx[v]
    seen = cv > 0
    safe = np.where(seen, cv, 1.0)
    kn = np.where(seen, np.maximum(cvw - D, 0) / safe + D * followers[v] / safe * p_cont[w], p_cont[w])
    logp["bigram"] = np.log(kn)
    logp["bigram_add_one"] = np.log((cvw + 1.0) / (cv + V))
    n_scored = s.sum(1)
    return {k: -np.bincount(row, weights=lp, minlength=tokens.shape[0]) / n_scored for k, lp in logp.items()}


def ngram_references(
    pool,
    tasks,
    split: str = "holdout",
    max_examples: int | None = None,
    seed: int = 0,
    indices=None,
    counts: NgramCounts | None = None,
) -> dict[str, dict[str, float]]:
    """{task name: {"unigram", "bigram", "bigram_add_one"}}: mean per-token continuation NLL (nats) of each task's
    split under the pool's n-gram statistics (module docstring). `tasks` are dsdm.tasks.Task objects; max_examples
    and seed pick the same subsample as dsdm.evaluate.evaluate_task; `indices` restricts the counts to those pool
    examples; pass `counts` (ngram_counts) to reuse them across calls."""
    from dsdm.evaluate import default_bos_id, subsample
    from dsdm.tasks import encode_examples

    counts = counts if counts is not None else ngram_counts(pool, indices)
    tok = pool.tokenizer
    out = {}
    for task in tasks:
        examples = subsample(task.split(split), max_examples, seed)
        tokens, _, score = encode_examples(tok, examples, 1 << 20, default_bos_id(tok))
        nll = ngram_nll(counts, tokens, score)
        out[task.name] = {k: float(v.mean()) for k, v in nll.items()}
    return out

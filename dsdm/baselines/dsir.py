"""DSIR: data selection with importance resampling on hashed n-grams (Xie et al. 2023, arXiv 2302.03169).

Features (docs/method.md §4, as in `data_selection/hashed_ngram_dsir.py` of p-lambda/dsir): unigrams + bigrams
hashed into `num_buckets` buckets. p_target and p_raw are the normalised bucket counts of the target and pool text, and

    log w(x) = Σ_b counts_b(x) · [log(p_target,b + 1e-8) − log(p_raw,b + 1e-8)]

so log w(x) is a sum over the n-grams of x of a per-bucket log ratio: we never build the (N, buckets) count matrix,
only `np.bincount(example, weights=log_ratio[bucket])`. Selection is Gumbel top-k on log w (sampling without
replacement ∝ w), seeded.

Two featurizers:
  features="text"    lowercase + WordPunct tokenization (regex \\w+|[^\\w\\s]+, nltk's WordPunctTokenizer), the
                     words of each text mapped to ids with one dict, n-grams hashed per *unique* n-gram, not per
                     occurrence. hash="sha256" reproduces data-selection's bucket of every n-gram exactly
                     (int(sha256(ngram)) % buckets); hash="fast" hashes each distinct word once (blake2b-64) and
                     combines word hashes into bigram hashes with vectorized uint64 arithmetic.
  features="tokens"  n-grams over the pool's token ids (no detokenizing), hashed with a splitmix64 finaliser on
                     uint64 arrays; the targets are encoded with the pool tokenizer. The fast path for tokenized pools.
Every hash is deterministic across processes (never Python's salted hash()).

Words vs the installed nltk (a deliberate choice): we run WordPunct's pattern under Python's `re`, as nltk <= 3.10.2
does and as DSIR and DsDm ran it. nltk >= 3.10.3 compiles the same pattern with the third-party `regex` engine, whose
\\w also matches combining marks and joiners, so "cafe\\u0301" or an emoji with a variation selector splits into other
words there (stdlib: ['cafe', '\\u0301']; regex: ['café']). On text with such characters data-selection under a new
nltk gives slightly other log w (benchmarks/baselines.py measures it; docs/benchmarks.md#baselines); on the rest,
and on every text under nltk <= 3.10.2, hash="sha256" equals it to float rounding.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from dsdm.select import gumbel_top_k

WORDPUNCT = re.compile(r"\w+|[^\w\s]+")  # nltk's WordPunctTokenizer pattern, stdlib re as in nltk <= 3.10.2
EPS = 1e-8  # data-selection's smoothing inside the log

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic): a fast, stable, well-mixed integer hash."""
    z = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def pair64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Order-sensitive hash of two uint64 hashes (a bigram from its two word hashes)."""
    with np.errstate(over="ignore"):
        return mix64(a * _GOLDEN + b + np.uint64(1))


def sha256_bucket(ngram: str, num_buckets: int) -> int:
    """data-selection's bucket of one n-gram string: int(sha256(ngram).hexdigest(), 16) % num_buckets."""
    return int.from_bytes(hashlib.sha256(ngram.encode("utf-8")).digest(), "big") % num_buckets


def blake64(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def bigram_positions(offsets: np.ndarray, ngrams: int) -> list[np.ndarray]:
    """For each n in 2..ngrams: start positions p of n-grams inside one example, given (n_ex + 1,) offsets."""
    lengths = np.diff(offsets)
    out = []
    for n in range(2, ngrams + 1):
        starts = np.arange(offsets[-1], dtype=np.int64)
        ex = np.repeat(np.arange(lengths.shape[0]), lengths)
        ok = starts + n - 1 < offsets[ex + 1]  # the n-gram must end inside the same example
        out.append(starts[ok])
    return out


class TextHasher:
    """Maps texts to (bucket, example) pairs for every unigram and n-gram (n <= ngrams), WordPunct words.

    Keeps a word vocabulary (dict) across calls so each distinct word is hashed once.
    """

    def __init__(self, num_buckets: int, ngrams: int, hash: str):
        self.num_buckets, self.ngrams, self.hash = num_buckets, ngrams, hash
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []
        self.word_hash = np.zeros(0, dtype=np.uint64)  # fast mode: blake2b-64 per vocabulary word
        self.word_bucket = np.zeros(0, dtype=np.int64)  # sha256 mode: data-selection bucket per word

    def _extend(self) -> None:
        start = self.word_hash.shape[0] if self.hash == "fast" else self.word_bucket.shape[0]
        new = self.words[start:]
        if not new:
            return
        if self.hash == "fast":
            h = np.fromiter((blake64(w) for w in new), dtype=np.uint64, count=len(new))
            self.word_hash = np.concatenate([self.word_hash, h])
        else:
            b = np.fromiter((sha256_bucket(w, self.num_buckets) for w in new), dtype=np.int64, count=len(new))
            self.word_bucket = np.concatenate([self.word_bucket, b])

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> buckets (M,) int64, example index (M,) int64, words per text (n,) int64."""
        vocab, words = self.vocab, self.words
        ids: list[int] = []
        lengths = np.zeros(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            toks = WORDPUNCT.findall(text.lower())
            lengths[i] = len(toks)
            for w in toks:
                j = vocab.get(w)
                if j is None:
                    j = vocab[w] = len(words)
                    words.append(w)
                ids.append(j)
        self._extend()
        ids_arr = np.asarray(ids, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        example = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
        if self.hash == "fast":
            h = self.word_hash[ids_arr]
            buckets = [(h % np.uint64(self.num_buckets)).astype(np.int64)]
        else:
            buckets = [self.word_bucket[ids_arr]]
        exs = [example]
        for n, starts in enumerate(bigram_positions(offsets, self.ngrams), start=2):
            if self.hash == "fast":
                g = h[starts]
                for j in range(1, n):
                    g = pair64(g, h[starts + j])
                buckets.append((g % np.uint64(self.num_buckets)).astype(np.int64))
            else:
                buckets.append(self._sha_ngrams(ids_arr, starts, n))
            exs.append(example[starts])
        return np.concatenate(buckets), np.concatenate(exs), lengths

    def _sha_ngrams(self, ids: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
        """data-selection buckets of n-grams, hashing each distinct n-gram of this call once."""
        grams = np.stack([ids[starts + j] for j in range(n)], axis=1)  # (M, n) word ids
        uniq, inverse = np.unique(grams, axis=0, return_inverse=True)
        words = self.words
        b = np.fromiter(
            (sha256_bucket(" ".join(words[j] for j in row), self.num_buckets) for row in uniq.tolist()),
            dtype=np.int64,
            count=uniq.shape[0],
        )
        return b[inverse.reshape(-1)]


def token_ngram_buckets(
    tokens: np.ndarray, offsets: np.ndarray, num_buckets: int, ngrams: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token-id n-grams of examples packed in `tokens` (flat) with (n+1,) `offsets` -> buckets, example, lengths."""
    offsets = np.asarray(offsets, dtype=np.int64) - int(offsets[0])
    lengths = np.diff(offsets)
    h = mix64(np.asarray(tokens, dtype=np.uint64) + np.uint64(1))
    example = np.repeat(np.arange(lengths.shape[0], dtype=np.int64), lengths)
    buckets, exs = [(h % np.uint64(num_buckets)).astype(np.int64)], [example]
    for n, starts in enumerate(bigram_positions(offsets, ngrams), start=2):
        g = h[starts]
        for j in range(1, n):
            g = pair64(g, h[starts + j])
        buckets.append((g % np.uint64(num_buckets)).astype(np.int64))
        exs.append(example[starts])
    return np.concatenate(buckets), np.concatenate(exs), lengths


@dataclass
class DSIR:
    """Hashed n-gram importance weights of the pool towards the target; Gumbel top-k selection."""

    num_buckets: int = 10_000
    """Hash buckets for unigrams + bigrams (data-selection default 10,000)."""
    ngrams: int = 2
    """Largest n-gram order: 2 = unigrams and bigrams (data-selection default)."""
    features: str = "text"
    """'text': WordPunct words of the decoded text (the reference); 'tokens': the pool's token ids (fast path)."""
    hash: str = "fast"
    """Text mode only. 'sha256': data-selection's exact buckets; 'fast': blake2b word hashes combined with uint64
    arithmetic (the same statistics, other bucket assignments, several times faster)."""
    fit_sample: int = 100_000
    """Pool examples (seeded sample) whose n-gram counts give p_raw; the whole pool if it is smaller."""
    min_length: int = 0
    """Examples with fewer words (text) or tokens (tokens) get log w = -inf and are never drawn. data-selection
    filters at 100 words; our pool examples are fixed-length chunks, so the filter is off by default."""
    top_k: bool = False
    """True: deterministic top-k of log w, no Gumbel noise (data-selection's resample(top_k=True))."""

    input = "text"  # what the driver passes to fit/score; switched to "tokens" by features="tokens"
    targeted = True
    estimator_scores = False
    seed_dependent_scores = False
    reference = False
    scores_file = "scores.npy"

    def __post_init__(self):
        if self.num_buckets < 2:
            raise ValueError(f"dsir.num_buckets must be >= 2, got {self.num_buckets}")
        if self.ngrams < 1:
            raise ValueError(f"dsir.ngrams must be >= 1, got {self.ngrams}")
        if self.features not in ("text", "tokens"):
            raise ValueError(f"dsir.features must be 'text' or 'tokens', got {self.features!r}")
        if self.hash not in ("fast", "sha256"):
            raise ValueError(f"dsir.hash must be 'fast' or 'sha256', got {self.hash!r}")
        if self.fit_sample < 1:
            raise ValueError(f"dsir.fit_sample must be positive, got {self.fit_sample}")
        self.input = self.features

    # -- featurization -------------------------------------------------------------------------------------------

    def _buckets(self, items) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """texts (list[str]) or token arrays (list of 1-D int arrays) -> buckets (M,), example (M,), lengths (n,)."""
        if self.features == "text":
            if not hasattr(self, "hasher_"):
                self.hasher_ = TextHasher(self.num_buckets, self.ngrams, self.hash)
            return self.hasher_(list(items))
        arrays = [np.asarray(a).reshape(-1) for a in items]
        offsets = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(np.int64)
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return token_ngram_buckets(flat, offsets, self.num_buckets, self.ngrams)

    def counts(self, items) -> np.ndarray:
        """Summed bucket counts over all items: (num_buckets,) int64."""
        buckets, _, _ = self._buckets(items)
        return np.bincount(buckets, minlength=self.num_buckets).astype(np.int64)

    # -- scikit-learn style contract -----------------------------------------------------------------------------

    def fit(self, target, pool_sample) -> "DSIR":
        """target, pool_sample: texts ('text') or token arrays ('tokens'). Sets p_target_, p_raw_, log_ratio_."""
        t, r = self.counts(target), self.counts(pool_sample)
        if t.sum() == 0:
            raise ValueError("dsir: the target texts contain no n-grams; check the --target task files")
        if r.sum() == 0:
            raise ValueError("dsir: the pool sample contains no n-grams; is the pool empty?")
        self.p_target_ = t / t.sum()
        self.p_raw_ = r / r.sum()
        self.log_ratio_ = np.log(self.p_target_ + EPS) - np.log(self.p_raw_ + EPS)  # (num_buckets,) float64
        return self

    def score(self, items) -> np.ndarray:
        """log w(x) per item, (n,) float64; -inf for items shorter than min_length."""
        if not hasattr(self, "log_ratio_"):
            raise ValueError("dsir: call fit(target, pool_sample) before score(...)")
        buckets, example, lengths = self._buckets(items)
        logw = np.bincount(example, weights=self.log_ratio_[buckets], minlength=lengths.shape[0])
        logw[lengths < max(self.min_length, 1)] = -np.inf  # an empty example has no evidence either way
        return logw

    def requires(self) -> dict[str, str]:
        return {}

    def sample_size(self, num_targets: int, pool_size: int) -> int:
        return min(pool_size, self.fit_sample)

    def transform(self, items) -> np.ndarray:
        return self.score(items)

    def finish(self, parts: list[np.ndarray]) -> tuple[np.ndarray, dict]:
        return (np.concatenate(parts) if parts else np.zeros(0)), {}

    def select(self, scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """Gumbel top-k of log w (sampling without replacement ∝ w); plain top-k when top_k=True."""
        if self.top_k:
            from dsdm.select import top_k

            return top_k(scores, k)
        return gumbel_top_k(scores, k, rng)

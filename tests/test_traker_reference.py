"""Cross-check against the reference implementation: dsdm's dense DsDm scores equal traker 0.3.2's TRAK scores.

Both sides get the same trained proxy (dsdm's GPT, 3,872 parameters), the same pool and targets, the same output
function (mean margin over scored tokens), the same Q (mean 1 - p over the same tokens), the same ±1 projection
matrix (dsdm's, handed to traker through a custom projector) and the same ridge. What differs is everything else:
traker computes the per-example gradients with its own torch.func path, its own scaling (÷ sqrt(p) instead of
÷ sqrt(k)), its own float32 inverse instead of dsdm's float64 Cholesky, one score column per target example (dsdm
scores the mean target gradient once) and its own Q bookkeeping. docs/estimator.md "Cross-check against traker"
gives the measured agreement. Run:
    .venv/bin/python -m pytest -q tests/test_traker_reference.py
"""

import logging

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_datamodel import _train

from dsdm import datamodel as D
from dsdm import sketch as S
from dsdm.model import build_model
from dsdm.select import top_k

trak = pytest.importorskip("trak", reason="traker (import name trak) is not installed: pip install traker==0.3.2")
from trak.modelout_functions import AbstractModelOutput  # noqa: E402 - only after the skip above
from trak.projectors import AbstractProjector  # noqa: E402

VOCAB, T, N, N_TARGETS, K, RIDGE = 23, 12, 96, 6, 64, 1e-2


class MeanMarginLM(AbstractModelOutput):
    """traker's margin (ImageClassificationModelOutput's, per token) averaged over the scored tokens. Written the
    traker way, not through dsdm.sketch.output_and_q, so the output function itself is cross-checked too.
    A batch is (tokens (B, T) int64, score (B, T) bool); token t is predicted at position t - 1."""

    def __init__(self):
        super().__init__()

    @staticmethod
    def _margins(logits, tokens, score):  # logits (B, T, V) -> margins, correct-token probs, weights (B, T-1)
        logits, target = logits[:, :-1], tokens[:, 1:]
        correct = logits.gather(-1, target[..., None])[..., 0]
        others = logits.scatter(-1, target[..., None], float("-inf")).logsumexp(-1)
        prob = logits.softmax(-1).gather(-1, target[..., None])[..., 0]
        return correct - others, prob, score[:, 1:].float()

    @staticmethod
    def get_output(model, weights, buffers, tokens, score):  # one example: tokens, score (T,) -> scalar
        logits = torch.func.functional_call(model, (weights, buffers), tokens[None])
        margin, _, w = MeanMarginLM._margins(logits, tokens[None], score[None])
        return (margin * w).sum() / w.sum()

    def get_out_to_loss_grad(self, model, weights, buffers, batch):  # Q: (B, 1), d(mean token loss)/d(f) up to sign
        tokens, score = batch
        with torch.no_grad():
            logits = torch.func.functional_call(model, (weights, buffers), tokens)
            _, prob, w = self._margins(logits, tokens, score)
        return (((1 - prob) * w).sum(1) / w.sum(1))[:, None]


class SharedMatrixProjector(AbstractProjector):
    """Multiplies by dsdm's own dense projection matrix (dsdm.sketch.dense_matrix: parameters in sorted name order,
    unscaled ±1), so both sides project into the same basis. traker then divides by sqrt(p) itself."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__(matrix.shape[0], matrix.shape[1], 0, "dsdm-rademacher", "cpu")
        self.matrix = matrix

    def project(self, grads, model_id):  # grads {name: (B, *shape)} -> (B, k)
        assert model_id == 0, "one proxy, one matrix"
        return torch.cat([grads[n].flatten(1).float() for n in sorted(grads)], 1) @ self.matrix


def _data():
    """A trained proxy, a random pool (every next token scored) and targets (only the second half scored)."""
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, VOCAB, (N, T), generator=g)
    targets = torch.randint(0, VOCAB, (N_TARGETS, T), generator=g)
    model = build_model("micro", VOCAB, T, seed=1, d_model=16, attn_impl="eager")  # eager: torch.func on CPU
    model = _train(model, pool, steps=40).eval()
    pool_score = S.pool_score_mask(torch.ones_like(pool, dtype=torch.bool))
    target_score = torch.zeros_like(targets, dtype=torch.bool)
    target_score[:, T // 2 :] = True
    return model, pool, pool_score, targets, target_score


def _dsdm_scores(model, pool, pool_score, targets, target_score):
    """(scores (N,), Gram K (k, k)) the way `dsdm score` makes them: dense sketch, relative ridge, kernel x Q."""
    sk = S.make_sketch(model, "dense", K, seed=0, proxy=0)
    batches = [(pool[i : i + 32].numpy(), pool_score[i : i + 32].numpy()) for i in range(0, N, 32)]
    G, q = S.featurize_batches(sk, batches, "cpu")
    G = G.astype(np.float64)
    gram = G.T @ G
    gbar = D.mean_target_features(sk, targets.numpy(), target_score.numpy(), "cpu")
    u = D.stream_scores(G, D.solve(gram, gbar[:, None], RIDGE))[:, 0]
    return D.ensemble([u], [q]), gram


def _traker_scores(model, matrix, lam, pool, pool_score, targets, target_score, save_dir):
    """traker's (N, n_targets) score matrix for one checkpoint, float32 throughout."""
    traker = trak.TRAKer(
        model=model,
        task=MeanMarginLM(),
        train_set_size=N,
        save_dir=str(save_dir),
        device="cpu",
        projector=SharedMatrixProjector(matrix),
        use_half_precision=False,
        lambda_reg=lam,
        logging_level=logging.WARNING,
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for i in range(0, N, 32):
        traker.featurize((pool[i : i + 32], pool_score[i : i + 32]), num_samples=pool[i : i + 32].shape[0])
    traker.finalize_features()
    traker.start_scoring_checkpoint("targets", model.state_dict(), model_id=0, num_targets=N_TARGETS)
    traker.score((targets, target_score), num_samples=N_TARGETS)
    return np.asarray(traker.finalize_scores("targets"), dtype=np.float64)


def test_dense_scores_match_traker(tmp_path):
    model, pool, pool_score, targets, target_score = _data()
    ours, gram = _dsdm_scores(model, pool, pool_score, targets, target_score)

    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    matrix = S.dense_matrix(shapes, K, seed=0, proxy=0)  # (p, k): the matrix dsdm's sketch just used
    p = matrix.shape[0]
    # Same λ on both sides. dsdm's features are P^T grad / sqrt(k), traker's P^T grad / sqrt(p): traker's Gram is
    # (k / p) K, so dsdm's relative λ = ridge * mean(diag K) is traker's absolute lambda_reg = (k / p) of it.
    lam = RIDGE * float(np.mean(np.diag(gram)))
    theirs = _traker_scores(model, matrix, K / p * lam, pool, pool_score, targets, target_score, tmp_path)
    assert theirs.shape == (N, N_TARGETS)
    # traker divides (K_t + λ_t I)^-1 by the mean absolute entry of itself ("center X^TX inverse", trak/
    # score_computers.py BasicScoreComputer.get_x_xtx_inv): a positive constant that changes no ranking. Undo it,
    # computed from dsdm's Gram: (K_t + λ_t I)^-1 = (p / k) (K + λI)^-1. Then average traker's per-target columns:
    # dsdm scores the mean target gradient, and the score is linear in it.
    inv_scale = p / K * np.abs(np.linalg.inv(gram + lam * np.eye(K))).mean()
    theirs = theirs.mean(1) * inv_scale

    rho = spearmanr(ours, theirs).statistic
    assert rho >= 0.95, rho
    assert set(top_k(ours, 5).tolist()) == set(top_k(theirs, 5).tolist()), (top_k(ours, 8), top_k(theirs, 8))
    # Same matrix, same λ: the values themselves agree, up to traker's float32 gradients and inverse. Measured
    # 3.3e-6 of the largest score; leaving out the inverse's rescaling above gives 4e-2, a wrong Q or output function
    # already changes the top 5.
    rel = np.abs(ours - theirs).max() / np.abs(ours).max()
    assert rel < 1e-4, (rel, rho)

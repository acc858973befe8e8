"""A Mult-VAE warm-started from two sums the devices release: item popularity and co-occurrence.

Each device (a user) computes two vectors from its own history ``x`` (binary, ``I`` items):

1. popularity: ``x / ||x||`` (L2 norm 1);
2. co-occurrence over a public vocabulary ``V`` of ``K`` items: the upper triangle (with the
   diagonal) of ``x_V x_V^T / ||x_V||^2``, ``K (K + 1) / 2`` numbers whose L2 norm is at most 1
   (the full matrix has Frobenius norm exactly 1).

Both are sums with sensitivity 1 per user, released once with all devices taking part
(sample rate 1) through the same clip, noise share, fixed denominator and encrypted sum as a
training round (:mod:`common.privacy.rounds`, :func:`common.privacy.plan.plan_privacy`). The
vocabulary is the DP popularity's top items, so it is post-processing of the first release:
items whose noisy popularity is at least ``threshold`` times the co-occurrence noise std, at most
``max_vocabulary`` (the payload of a device is ``K (K + 1) / 2`` values).

The server post-processes the two noisy sums (free under DP): the top-``k`` eigenvectors ``V_k``
of the noisy co-occurrence matrix ``G`` give a linear autoencoder ``x -> x V_k V_k^T`` (a linear
autoencoder's optimum spans the top eigenvectors of ``X^T X``), and the noisy popularity gives
the output bias. :func:`spectral_weights` writes that model into the Mult-VAE's own layers: the
encoder's first layer holds ``V_k^T``, the layers in between pass the first ``k`` units through
(``tanh`` is close to linear there, inputs are L2-normalised), the decoder's last layer holds
``scale * V_k`` and its bias ``alpha * log(popularity)``. The rank ``k``, ``scale`` and ``alpha``
are chosen on the validation users (:func:`choose_spectral_weights`); federated DP fine-tuning
then starts from that model.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from common.metrics import evaluate
from common.model import ModelConfig, ModelKind, build_model
from common.privacy.plan import RELEASE_NAMES
from common.run.config import WarmStartConfig
from common.run.folder import EvalData

__all__ = [
    "COOCCURRENCE",
    "POPULARITY",
    "RELEASES",
    "SpectralChoice",
    "choose_spectral_weights",
    "cooccurrence_matrix",
    "cooccurrence_statistic",
    "popularity_statistic",
    "release_vocabulary",
    "spectral_weights",
    "statistic",
    "statistic_size",
    "vocabulary",
    "warm_start_from_sums",
]

logger = logging.getLogger(__name__)

POPULARITY, COOCCURRENCE = RELEASE_NAMES
"""The first release (the sum of ``x / ||x||``) and the second (the sum of
``upper(x_V x_V^T) / ||x_V||^2`` over the vocabulary)."""
RELEASES = RELEASE_NAMES

RANKS = (0, 4, 8, 16, 32, 64, 128, 256)
"""Ranks ``k`` tried on the validation users (those up to the model's narrowest layer); rank 0
is the DP popularity list alone (the output bias), the fallback where the co-occurrence is
mostly noise."""
SCALES = (10.0, 100.0)
"""Output scales tried: how peaked the softmax over items is, relative to the bias."""
ALPHAS = (0.0, 1.0, 3.0, 10.0)
"""Weights of ``log(popularity)`` in the output bias tried."""
LOGVAR_BIAS = -4.0
"""Initial log-variance of q(z | x): the posterior starts narrow around the spectral code."""


def _binary_rows(rows: sp.csr_matrix | sp.csr_array) -> sp.csr_matrix:
    x = sp.csr_matrix(rows, dtype=np.float64, copy=True)
    x.data[:] = 1.0
    x.eliminate_zeros()
    return x


def popularity_statistic(rows: sp.csr_matrix | sp.csr_array) -> np.ndarray:
    """``sum_u x_u / ||x_u||`` over the users (rows) of ``rows``, shape ``(I,)`` float64.

    One user's contribution has L2 norm 1 (0 for an empty row).
    """
    x = _binary_rows(rows)
    norms = np.sqrt(np.asarray(x.sum(axis=1)).ravel())
    inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return np.asarray(x.multiply(inverse[:, None]).sum(axis=0)).ravel()


def statistic_size(vocabulary_size: int) -> int:
    """Values in the co-occurrence statistic of a ``K``-item vocabulary: ``K (K + 1) / 2``."""
    return vocabulary_size * (vocabulary_size + 1) // 2


def cooccurrence_statistic(
    rows: sp.csr_matrix | sp.csr_array, vocab: Sequence[int] | np.ndarray
) -> np.ndarray:
    """``sum_u upper(x_V x_V^T) / ||x_V||^2`` (row-major upper triangle with the diagonal).

    Shape ``(K (K + 1) / 2,)`` float64 for ``K = len(vocab)``. One user's contribution has L2
    norm at most 1; a user with no vocabulary item contributes 0.
    """
    x = _binary_rows(rows)[:, np.asarray(vocab, dtype=np.int64)]
    counts = np.asarray(x.sum(axis=1)).ravel()
    inverse = np.divide(1.0, np.sqrt(counts), out=np.zeros_like(counts), where=counts > 0)
    xn = sp.csr_matrix(x.multiply(inverse[:, None]))
    gram = (xn.T @ xn).toarray()  # (K, K)
    return gram[np.triu_indices(gram.shape[0])]


def statistic(
    name: str, rows: sp.csr_matrix | sp.csr_array, vocab: Sequence[int] | np.ndarray | None
) -> np.ndarray:
    """The statistic ``name`` (:data:`RELEASES`) of the users in ``rows``, float32."""
    if name == POPULARITY:
        return popularity_statistic(rows).astype(np.float32)
    if name == COOCCURRENCE:
        if vocab is None:
            raise ValueError("the co-occurrence statistic needs a vocabulary")
        return cooccurrence_statistic(rows, vocab).astype(np.float32)
    raise ValueError(f"unknown warm-start statistic {name!r} (expected one of {RELEASES})")


def cooccurrence_matrix(upper: np.ndarray, size: int) -> np.ndarray:
    """The symmetric ``(K, K)`` matrix whose upper triangle (row-major) is ``upper``."""
    if upper.shape != (statistic_size(size),):
        raise ValueError(f"expected {statistic_size(size)} values for K={size}, got {upper.shape}")
    gram = np.zeros((size, size), dtype=np.float64)
    gram[np.triu_indices(size)] = upper
    return gram + np.triu(gram, 1).T


def vocabulary(
    popularity: np.ndarray,
    *,
    noise_std: float,
    threshold: float,
    min_size: int,
    max_size: int,
) -> np.ndarray:
    """Item indices (sorted) of the co-occurrence release: the noisy popularity's top items.

    Items whose ``popularity`` is at least ``threshold * noise_std`` (the co-occurrence release's
    noise std, in the same units), at least ``min_size`` and at most ``max_size`` of them (and
    never more than the catalogue). A function of the released popularity only: post-processing.
    """
    n_items = popularity.shape[0]
    order = np.argsort(-popularity, kind="stable")
    above = int(np.count_nonzero(popularity >= threshold * noise_std))
    size = min(max(above, min_size), max_size, n_items)
    return np.sort(order[:size])


def _encoder_widths(model_cfg: ModelConfig) -> int:
    return min(model_cfg.dims)


def spectral_weights(
    model_cfg: ModelConfig,
    template: Mapping[str, np.ndarray],
    *,
    eigenvectors: np.ndarray,
    vocab: np.ndarray,
    log_popularity: np.ndarray,
    scale: float,
    alpha: float,
    residual: float = 0.01,
) -> dict[str, np.ndarray]:
    """Mult-VAE (or Mult-DAE) weights that compute ``scale * x V_k V_k^T + alpha * log_pop``.

    ``eigenvectors`` is ``(K, k)`` over ``vocab``; ``k`` must not exceed the narrowest layer.
    Every other weight is ``residual`` times ``template``'s (the seed's random init), so that
    fine-tuning can use the other units; biases other than the output's are 0.
    """
    k = eigenvectors.shape[1]
    if k > _encoder_widths(model_cfg):
        raise ValueError(f"rank {k} exceeds the narrowest layer {min(model_cfg.dims)}")
    model = build_model(model_cfg)
    model.load_state_dict({n: torch.from_numpy(np.array(v)) for n, v in template.items()})
    vk = torch.from_numpy(eigenvectors.astype(np.float32))  # (K, k)
    idx = torch.from_numpy(np.asarray(vocab, dtype=np.int64))
    encoder, decoder = list(model.encoder), list(model.decoder)  # type: ignore[arg-type]
    latent = model_cfg.dims[-1]
    with torch.no_grad():
        for layer in [*encoder, *decoder]:
            layer.weight.mul_(residual)
            layer.bias.zero_()
        encoder[0].weight[:k, :] = 0.0
        encoder[0].weight[:k, idx] = vk.T
        eye = torch.eye(k)
        for layer in [*encoder[1:], *decoder[:-1]]:
            layer.weight[:k, :k] = eye
        if model_cfg.kind is ModelKind.MULTVAE:
            encoder[-1].bias[latent:] = LOGVAR_BIAS
        out = decoder[-1]
        out.weight[:, :k] = 0.0
        out.weight[idx, :k] = scale * vk
        out.bias[:] = torch.from_numpy((alpha * log_popularity).astype(np.float32))
    return {n: v.detach().numpy().copy() for n, v in model.state_dict().items()}


@dataclass(frozen=True)
class SpectralChoice:
    """The warm start chosen on the validation users."""

    rank: int
    scale: float
    alpha: float
    validation_ndcg: float
    vocabulary_size: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "rank": self.rank,
            "scale": self.scale,
            "alpha": self.alpha,
            "validation_ndcg@100": self.validation_ndcg,
            "vocabulary_size": self.vocabulary_size,
        }


def log_popularity(popularity: np.ndarray) -> np.ndarray:
    """``log(max(pop, 1))``, centred: the output bias's shape (noisy negatives are floored)."""
    lp = np.log(np.maximum(popularity, 1.0))
    return lp - lp.mean()


def choose_spectral_weights(
    model_cfg: ModelConfig,
    template: Mapping[str, np.ndarray],
    *,
    popularity: np.ndarray,
    gram: np.ndarray,
    vocab: np.ndarray,
    validation_foldin: sp.csr_matrix,
    validation_heldout: sp.csr_matrix,
) -> tuple[dict[str, np.ndarray], SpectralChoice]:
    """The :func:`spectral_weights` with the best NDCG@100 on the validation users.

    Tries every rank of :data:`RANKS` up to the model's narrowest layer (and the vocabulary),
    each scale of :data:`SCALES` and alpha of :data:`ALPHAS`. The validation users are held out
    of training and of the test; in a deployment each choice would be a DP evaluation query.
    """
    values, vectors = np.linalg.eigh(gram)  # ascending
    order = np.argsort(values)[::-1]
    vectors = vectors[:, order]
    limit = min(_encoder_widths(model_cfg), len(vocab))
    ranks = [r for r in RANKS if r <= limit]
    lp = log_popularity(popularity)
    best: tuple[float, dict[str, np.ndarray], SpectralChoice] | None = None
    model = build_model(model_cfg)
    model.eval()
    for rank, scale, alpha in itertools.product(ranks, SCALES, ALPHAS):
        if rank == 0 and (scale != SCALES[0] or alpha != 1.0):
            continue  # popularity alone: one candidate
        weights = spectral_weights(
            model_cfg,
            template,
            eigenvectors=vectors[:, :rank],
            vocab=vocab,
            log_popularity=lp,
            scale=scale,
            alpha=alpha,
        )
        model.load_state_dict({n: torch.from_numpy(v) for n, v in weights.items()})
        ndcg = _ndcg(model, validation_foldin, validation_heldout)
        logger.debug(
            "warm start rank %d scale %g alpha %g: validation %.4f", rank, scale, alpha, ndcg
        )
        if best is None or ndcg > best[0]:
            choice = SpectralChoice(rank, scale, alpha, ndcg, len(vocab))
            best = (ndcg, weights, choice)
    assert best is not None
    logger.info(
        "warm start: rank %d, scale %g, alpha %g over %d items: validation NDCG@100 %.4f",
        best[2].rank,
        best[2].scale,
        best[2].alpha,
        len(vocab),
        best[0],
    )
    return best[1], best[2]


def _ndcg(model: torch.nn.Module, foldin: sp.csr_matrix, heldout: sp.csr_matrix) -> float:
    def score(x: sp.csr_matrix) -> np.ndarray:
        with torch.no_grad():
            dense = torch.from_numpy(np.asarray(x.todense(), dtype=np.float32))
            return model(dense).logits.numpy()

    value = evaluate(score, foldin, heldout, ks=(100,))["ndcg@100"]
    return float(value) if math.isfinite(value) else 0.0


def release_vocabulary(
    popularity: np.ndarray, *, noise_std: float, cfg: WarmStartConfig
) -> np.ndarray:
    """The co-occurrence release's vocabulary (:func:`vocabulary`) under ``cfg``'s rule."""
    return vocabulary(
        popularity,
        noise_std=noise_std,
        threshold=cfg.vocabulary_threshold,
        min_size=cfg.min_vocabulary,
        max_size=cfg.max_vocabulary,
    )


def warm_start_from_sums(
    model_cfg: ModelConfig,
    template: Mapping[str, np.ndarray],
    *,
    popularity: np.ndarray,
    upper: np.ndarray,
    vocab: np.ndarray,
    data: EvalData,
    noise_multipliers: Mapping[str, float],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The warm-started weights from the two released sums (count units) and the summary a
    run's results record: the validation choice, the releases' z, the values per client."""
    weights, choice = choose_spectral_weights(
        model_cfg,
        template,
        popularity=popularity,
        gram=cooccurrence_matrix(upper, len(vocab)),
        vocab=vocab,
        validation_foldin=data.validation_foldin,
        validation_heldout=data.validation_holdout,
    )
    summary: dict[str, Any] = {
        **choice.to_dict(),
        "noise_multipliers": dict(noise_multipliers),
        "values_per_client": int(upper.shape[0] + popularity.shape[0]),
    }
    return weights, summary

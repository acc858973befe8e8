"""Mult-VAE and Mult-DAE for collaborative filtering (Liang et al. 2018).

Dawen Liang, Rahul G. Krishnan, Matthew D. Hoffman and Tony Jebara, "Variational Autoencoders for
Collaborative Filtering", WWW 2018. The architecture, initialisation and loss follow the authors'
``vae_cf`` reference code (TensorFlow notebook):

- the input row ``x`` (one user's binary interaction vector) is L2-normalised, then dropout is
  applied to the normalised row (keep probability 0.5 in the reference);
- the encoder is an MLP with ``tanh`` between layers; for Mult-VAE its last layer outputs
  ``2 * d`` numbers, the mean ``mu`` and log-variance ``logvar`` of q(z | x) (paper eq. 4);
- ``z = mu + eps * exp(0.5 * logvar)`` in training mode (the reparameterisation trick), ``z = mu``
  in evaluation mode;
- the decoder mirrors the encoder, ``tanh`` between layers and no activation on the output logits;
- the loss is the multinomial log-likelihood (paper eq. 2) plus ``beta`` times the KL term
  (the annealed ELBO of paper eq. 6).

Every parameter lives in an ``nn.Linear`` inside an ``nn.ModuleList`` and the randomness (dropout,
``randn``) sits outside the linear layers, so Opacus can compute per-sample gradients in its
``hooks``, ``functorch`` and ``ghost`` modes (see ``tests/common/test_model.py``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "REFERENCE_DAE_WEIGHT_DECAY",
    "ModelConfig",
    "ModelKind",
    "MultDAE",
    "MultVAE",
    "VAEOutput",
    "anneal_beta",
    "beta_schedule",
    "build_model",
    "kl_divergence",
    "multinomial_nll",
    "vae_loss",
]

REFERENCE_DAE_WEIGHT_DECAY = 0.02
"""Adam ``weight_decay`` equivalent to the reference Mult-DAE regulariser.

The reference adds ``2 * lam * sum(W**2) / 2 = lam * sum(W**2)`` with ``lam = 0.01`` to the loss
(weight matrices only), whose gradient is ``2 * lam * W = 0.02 * W``; ``torch.optim.Adam`` with
``weight_decay=wd`` adds ``wd * p`` to the gradient, hence ``0.02``. The reference Mult-VAE uses
``lam = 0`` (no weight decay). PyTorch decays the biases too, which the reference does not; the
biases are tiny and the difference is negligible in practice.
"""

_BIAS_STD = 0.001  # reference: tf.truncated_normal_initializer(stddev=0.001)


class ModelKind(StrEnum):
    """Which autoencoder of Liang et al. 2018 to build."""

    MULTVAE = "multvae"
    """Variational autoencoder with multinomial likelihood (paper section 2.2)."""
    MULTDAE = "multdae"
    """Denoising autoencoder with multinomial likelihood (paper section 2.3)."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and KL-annealing settings of a Mult-VAE / Mult-DAE.

    Defaults are those of the reference ``vae_cf`` notebook for ML-20M.
    """

    kind: ModelKind = ModelKind.MULTVAE
    """Which model to build."""
    n_items: int = 0
    """Catalogue size ``I``: width of the input and output layers. 0 means "not known yet" (a run
    config before the data is read); building a model needs it > 0."""
    dims: tuple[int, ...] = (600, 200)
    """Hidden widths then the latent size ``d``: ``(600, 200)`` means I-600-200-600-I."""
    dropout: float = 0.5
    """Dropout probability on the L2-normalised input (reference keep_prob 0.5), in [0, 1)."""
    beta_cap: float = 0.2
    """Largest KL weight ``beta`` reached by the annealing schedule (paper section 2.2.2)."""
    anneal_steps: int = 200_000
    """Reference ``total_anneal_steps``: ``beta = min(beta_cap, step / anneal_steps)``, so the cap
    is reached after ``beta_cap * anneal_steps`` updates."""

    def __post_init__(self) -> None:
        # Accept "multvae" from TOML / checkpoints, but store the enum.
        object.__setattr__(self, "kind", ModelKind(self.kind))
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if isinstance(self.n_items, bool) or int(self.n_items) < 0:
            raise ValueError(f"n_items must be a non-negative integer, got {self.n_items!r}")
        if not self.dims or any(d <= 0 for d in self.dims):
            raise ValueError(f"dims must be a non-empty tuple of positive ints, got {self.dims!r}")
        if not (math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not (math.isfinite(self.beta_cap) and self.beta_cap >= 0.0):
            raise ValueError(f"beta_cap must be finite and >= 0, got {self.beta_cap!r}")
        if int(self.anneal_steps) <= 0:
            raise ValueError(f"anneal_steps must be a positive integer, got {self.anneal_steps!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict, for checkpoints."""
        d = asdict(self)
        d["kind"] = self.kind.value
        d["dims"] = list(self.dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {sorted(unknown)}")
        kwargs = dict(d)
        if "kind" in kwargs:
            kwargs["kind"] = ModelKind(kwargs["kind"])
        if "dims" in kwargs:
            kwargs["dims"] = tuple(kwargs["dims"])
        return cls(**kwargs)


class VAEOutput(NamedTuple):
    """What both models return.

    ``logits`` are unnormalised scores over items, ``mu`` the latent code (Mult-DAE: the
    deterministic bottleneck), ``logvar`` the log-variance of q(z | x), ``None`` for Mult-DAE.
    """

    logits: torch.Tensor  # (B, n_items)
    mu: torch.Tensor  # (B, d)
    logvar: torch.Tensor | None  # (B, d) or None


def _mlp(widths: list[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))


def _run_mlp(layers: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
    """Linear layers with tanh between them and none after the last (reference forward_pass)."""
    for i, layer in enumerate(layers):
        h = layer(h)
        if i < len(layers) - 1:
            h = torch.tanh(h)
    return h


class _MultAutoencoder(nn.Module):
    """Shared encoder input handling, decoder and initialisation of Mult-VAE and Mult-DAE."""

    def __init__(self, config: ModelConfig, *, latent_out: int) -> None:
        super().__init__()
        if config.n_items <= 0:
            raise ValueError(f"n_items must be > 0 to build a model, got {config.n_items}")
        self.config = config
        q_dims = [config.n_items, *config.dims]  # I, 600, 200
        p_dims = q_dims[::-1]  # 200, 600, I
        self.input_dropout = nn.Dropout(config.dropout)
        self.encoder = _mlp([*q_dims[:-1], latent_out])
        self.decoder = _mlp(p_dims)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Xavier-normal weights, biases N(0, 0.001) truncated at 2 std (reference init)."""
        for layer in [*self.encoder, *self.decoder]:
            assert isinstance(layer, nn.Linear)
            nn.init.xavier_normal_(layer.weight, generator=generator)
            nn.init.trunc_normal_(
                layer.bias,
                std=_BIAS_STD,
                a=-2 * _BIAS_STD,
                b=2 * _BIAS_STD,
                generator=generator,
            )

    def _encode_input(self, x: torch.Tensor) -> torch.Tensor:
        h = F.normalize(x, p=2.0, dim=1)  # (B, I); an all-zero row stays zero
        return self.input_dropout(h)  # (B, I)


class MultVAE(_MultAutoencoder):
    """Mult-VAE of Liang et al. 2018 (paper section 2.2, eqs. 2-6).

    Parameters
    ----------
    config:
        Architecture; ``config.kind`` must be :attr:`ModelKind.MULTVAE`.
    """

    def __init__(self, config: ModelConfig) -> None:
        if config.kind is not ModelKind.MULTVAE:
            raise ValueError(f"config.kind must be {ModelKind.MULTVAE.value}, got {config.kind}")
        super().__init__(config, latent_out=2 * config.dims[-1])
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> VAEOutput:
        """Encode, sample ``z`` (training) or take ``mu`` (evaluation), decode.

        Parameters
        ----------
        x:
            Interaction rows, ``(B, n_items)`` float (binary counts in practice).
        """
        d = self.config.dims[-1]
        h = _run_mlp(self.encoder, self._encode_input(x))  # (B, 2d)
        mu, logvar = h[:, :d], h[:, d:]  # (B, d), (B, d)
        if self.training:
            std = torch.exp(0.5 * logvar)  # (B, d)
            z = mu + torch.randn_like(std) * std  # (B, d), reparameterisation (paper eq. 5)
        else:
            z = mu
        logits = _run_mlp(self.decoder, z)  # (B, I)
        return VAEOutput(logits, mu, logvar)


class MultDAE(_MultAutoencoder):
    """Mult-DAE of Liang et al. 2018 (paper section 2.3): dropout-corrupted input, no KL.

    The reference regularises the weights with ``lam = 0.01``; pass
    :data:`REFERENCE_DAE_WEIGHT_DECAY` as the optimiser's ``weight_decay`` to match it.

    Parameters
    ----------
    config:
        Architecture; ``config.kind`` must be :attr:`ModelKind.MULTDAE`.
    """

    def __init__(self, config: ModelConfig) -> None:
        if config.kind is not ModelKind.MULTDAE:
            raise ValueError(f"config.kind must be {ModelKind.MULTDAE.value}, got {config.kind}")
        super().__init__(config, latent_out=config.dims[-1])
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> VAEOutput:
        """Encode the corrupted input to a deterministic code, decode to logits ``(B, n_items)``."""
        code = _run_mlp(self.encoder, self._encode_input(x))  # (B, d)
        # The reference applies tanh after every layer but the last of the whole I-...-I stack,
        # so the bottleneck is squashed too.
        logits = _run_mlp(self.decoder, torch.tanh(code))  # (B, I)
        return VAEOutput(logits, code, None)


def build_model(config: ModelConfig, *, generator: torch.Generator | None = None) -> nn.Module:
    """Build the model ``config.kind`` names, initialised as in the reference.

    Parameters
    ----------
    config:
        Architecture.
    generator:
        Random source for the initial weights; default uses torch's global generator.
    """
    model = MultVAE(config) if config.kind is ModelKind.MULTVAE else MultDAE(config)
    if generator is not None:
        model.reset_parameters(generator)
    return model


def multinomial_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-user multinomial negative log-likelihood, Liang et al. 2018 eq. 2.

    ``-sum_i x_i * log_softmax(logits)_i`` for each row; returns ``(B,)``.
    """
    return -(F.log_softmax(logits, dim=1) * x).sum(dim=1)  # (B,)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-user KL(q(z | x) || N(0, I)) for a diagonal Gaussian, Liang et al. 2018 eq. 6.

    ``-0.5 * sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))``; returns ``(B,)``.
    """
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)  # (B,)


def vae_loss(output: VAEOutput, x: torch.Tensor, *, beta: float) -> torch.Tensor:
    """Negative annealed ELBO averaged over the batch (Liang et al. 2018 eq. 6), a scalar.

    ``mean_b [nll_b + beta * KL_b]``; for Mult-DAE (``output.logvar is None``) only the NLL.
    Every term is a mean of per-user terms, so Opacus' ``loss_reduction="mean"`` applies.

    Parameters
    ----------
    output:
        The model's output for ``x``.
    x:
        The (un-normalised) input rows, ``(B, n_items)``.
    beta:
        KL weight, finite and >= 0; ignored for Mult-DAE.
    """
    if not (math.isfinite(beta) and beta >= 0.0):
        raise ValueError(f"beta must be finite and >= 0, got {beta!r}")
    per_user = multinomial_nll(output.logits, x)  # (B,)
    if output.logvar is not None:
        per_user = per_user + beta * kl_divergence(output.mu, output.logvar)  # (B,)
    return per_user.mean()


def anneal_beta(step: int, *, cap: float, total_steps: int) -> float:
    """Linear KL annealing of Liang et al. 2018 section 2.2.2: ``min(cap, step / total_steps)``.

    Parameters
    ----------
    step:
        Number of updates done so far, >= 0.
    cap:
        Largest ``beta``, >= 0 (reference 0.2).
    total_steps:
        Updates for ``beta`` to go from 0 to 1 (reference 200000), > 0.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not (math.isfinite(cap) and cap >= 0.0):
        raise ValueError(f"cap must be finite and >= 0, got {cap!r}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    return min(cap, step / total_steps)


def beta_schedule(config: ModelConfig) -> Callable[[int], float]:
    """The annealing schedule of ``config`` as a function of the global update count."""
    return functools.partial(anneal_beta, cap=config.beta_cap, total_steps=config.anneal_steps)

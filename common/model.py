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

Optionally (``ModelConfig.adversary_classes > 0``) the model carries the adversary of
Adv-MultVAE (Christian Ganhor, David Penz, Navid Rekabsaz, Oleg Lesota and Markus Schedl,
"Unlearning Protected User Attributes in Recommendations with Adversarial Training", SIGIR 2022):
a small MLP head that predicts a protected attribute (e.g. gender) from the latent code ``mu``
through a gradient reversal layer (Ganin and Lempitsky 2015). The head minimises its
cross-entropy; through the reversal the encoder maximises it, so the code forgets the attribute.
The head is a submodule of linear layers like the rest, so it is federated (averaged, clipped,
noised, encrypted) with the other weights; scoring ignores it. Options: several independent heads
(``adversary_heads``, their cross-entropies averaged), per-class weights of the heads'
cross-entropy (``adversary_class_weights``, for a public class prior), and the bounded confusion
objective for the encoder instead of the reversal (``adversary_objective = "confuse"``).
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
    "AdversaryObjective",
    "ModelConfig",
    "ModelKind",
    "MultDAE",
    "MultVAE",
    "VAEOutput",
    "adversary_loss",
    "anneal_beta",
    "beta_schedule",
    "build_model",
    "kl_divergence",
    "multinomial_nll",
    "per_user_loss",
    "reverse_gradient",
    "run_adversary_head",
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


class AdversaryObjective(StrEnum):
    """What the encoder does against the adversary heads."""

    REVERSE = "reverse"
    """Ascend the heads' cross-entropy through the gradient reversal (Ganin and Lempitsky 2015;
    Ganhor et al. 2022). Unbounded: the encoder can make a head confidently wrong, which keeps
    the attribute readable to a fresh classifier."""
    CONFUSE = "confuse"
    """Descend the cross-entropy of the (frozen) heads' prediction to the uniform distribution
    over the classes (the confusion loss of Tzeng et al. 2015 and Alvi et al. 2018, "Turning a
    Blind Eye"): bounded, at its optimum when no head can tell the classes apart. The heads
    still descend their own cross-entropy on the labels, on a code they cannot move."""


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
    adversary_classes: int = 0
    """Classes of the Adv-MultVAE adversary head on ``mu`` (Ganhor et al. 2022); 0 (default):
    no head. Checkpoints written before the head existed load with this default."""
    adversary_hidden: int = 64
    """Hidden width of the adversary MLP (``d -> hidden -> classes`` with tanh); 0 makes it a
    single linear layer. Ignored without a head."""
    adversary_scale: float = 1.0
    """lambda of the gradient reversal: the encoder receives ``-lambda`` times the gradient of
    the adversary's cross-entropy, the head the plain gradient. > 0. Ignored without a head."""
    adversary_speed: float = 1.0
    """How much faster the head learns than the rest under an Adam-type optimizer (FedAdam on
    the server), > 0: each head layer's output is multiplied by it and its initial weights
    divided by it, so the initial head is the same but an Adam step, about as large in every
    parameter, moves the head's effective weights this many times further. A two-timescale
    game (Heusel et al. 2017): the adversary must keep up with the encoder, or the encoder
    merely flips the attribute's direction in the code (a fooled head, a readable code)
    instead of removing it. Ignored without a head."""
    adversary_heads: int = 1
    """Independent adversary heads, each its own MLP with its own initial weights, >= 1; the
    adversary term is the mean of their cross-entropies, so the encoder must fool all of them
    (Ganhor et al. 2022 train several). One head keeps the state-dict names ``adversary.0.*``;
    K > 1 heads are ``adversary.<head>.<layer>.*``. Ignored without a head."""
    adversary_class_weights: tuple[float, ...] = ()
    """Per-class weights of the heads' cross-entropy (``adversary_classes`` positive numbers),
    e.g. ``1 / (K p_c)`` for public class shares ``p_c`` so that a rare class counts as much as
    a common one; ``()`` (default): every user weighs 1. Ignored without a head."""
    adversary_objective: AdversaryObjective = AdversaryObjective.REVERSE
    """What the encoder does against the heads (:class:`AdversaryObjective`); ``reverse``
    (default) is the gradient reversal. Ignored without a head."""

    def __post_init__(self) -> None:
        # Accept "multvae" from TOML / checkpoints, but store the enum.
        object.__setattr__(self, "kind", ModelKind(self.kind))
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        object.__setattr__(
            self, "adversary_objective", AdversaryObjective(self.adversary_objective)
        )
        object.__setattr__(
            self, "adversary_class_weights", tuple(float(w) for w in self.adversary_class_weights)
        )
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
        if isinstance(self.adversary_classes, bool) or int(self.adversary_classes) < 0:
            raise ValueError(f"adversary_classes must be >= 0, got {self.adversary_classes!r}")
        if self.adversary_classes == 1:
            raise ValueError("adversary_classes must be 0 (no adversary) or >= 2, got 1")
        if int(self.adversary_hidden) < 0:
            raise ValueError(f"adversary_hidden must be >= 0, got {self.adversary_hidden!r}")
        if not (math.isfinite(self.adversary_speed) and self.adversary_speed > 0.0):
            raise ValueError(
                f"adversary_speed must be finite and > 0, got {self.adversary_speed!r}"
            )
        if not (math.isfinite(self.adversary_scale) and self.adversary_scale > 0.0):
            raise ValueError(
                f"adversary_scale must be finite and > 0, got {self.adversary_scale!r}"
            )

        if isinstance(self.adversary_heads, bool) or int(self.adversary_heads) < 1:
            raise ValueError(f"adversary_heads must be >= 1, got {self.adversary_heads!r}")
        weights = self.adversary_class_weights
        if weights and (
            len(weights) != self.adversary_classes
            or not all(math.isfinite(w) and w > 0.0 for w in weights)
        ):
            raise ValueError(
                f"adversary_class_weights must be empty or {self.adversary_classes} positive "
                f"numbers, got {weights!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict, for checkpoints."""
        d = asdict(self)
        d["kind"] = self.kind.value
        d["dims"] = list(self.dims)
        d["adversary_class_weights"] = list(self.adversary_class_weights)
        d["adversary_objective"] = self.adversary_objective.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``; missing keys (an older
        checkpoint's, e.g. without ``adversary_classes``) take their defaults."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {sorted(unknown)}")
        kwargs = dict(d)
        if "kind" in kwargs:
            kwargs["kind"] = ModelKind(kwargs["kind"])
        if "dims" in kwargs:
            kwargs["dims"] = tuple(kwargs["dims"])
        if "adversary_class_weights" in kwargs:
            kwargs["adversary_class_weights"] = tuple(kwargs["adversary_class_weights"])
        return cls(**kwargs)


class VAEOutput(NamedTuple):
    """What both models return.

    ``logits`` are unnormalised scores over items, ``mu`` the latent code (Mult-DAE: the
    deterministic bottleneck), ``logvar`` the log-variance of q(z | x), ``None`` for Mult-DAE;
    ``adversary_logits`` the adversary heads' scores over the protected attribute's classes
    (``(B, n_classes)`` for one head, ``(B, heads, n_classes)`` for several), computed from
    ``mu`` through the gradient reversal (objective ``reverse``) or from a detached ``mu``
    (``confuse``), ``None`` without a head; ``adversary_confusion`` (objective ``confuse``
    only, else ``None``) the same heads with frozen weights on ``mu`` behind a gradient scaled
    by ``adversary_scale``, the logits the encoder pushes towards the uniform distribution.
    """

    logits: torch.Tensor  # (B, n_items)
    mu: torch.Tensor  # (B, d)
    logvar: torch.Tensor | None  # (B, d) or None
    adversary_logits: torch.Tensor | None = None  # (B, n_classes), (B, K, n_classes) or None
    adversary_confusion: torch.Tensor | None = None  # same shape, or None


def _mlp(widths: list[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))


def _run_mlp(layers: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
    """Linear layers with tanh between them and none after the last (reference forward_pass)."""
    for i, layer in enumerate(layers):
        h = layer(h)
        if i < len(layers) - 1:
            h = torch.tanh(h)
    return h


def reverse_gradient(z: torch.Tensor, scale: float) -> torch.Tensor:
    """Gradient reversal layer of Ganin and Lempitsky 2015, in plain tensor ops.

    ``z.detach() - scale * (z - z.detach())``: the forward value is ``z`` exactly (``z - z`` is
    0 in floating point), and the gradient with respect to ``z`` is ``-scale`` times the
    incoming one. No ``autograd.Function``, so ``torch.func.vmap`` and Opacus' per-sample
    gradient modes see ordinary differentiable operations.
    """
    frozen = z.detach()
    return frozen - scale * (z - frozen)


def run_adversary_head(
    layers: list[tuple[torch.Tensor, torch.Tensor]], h: torch.Tensor, speed: float
) -> torch.Tensor:
    """One adversary MLP given its ``(weight, bias)`` pairs: tanh between, outputs x ``speed``."""
    for i, (weight, bias) in enumerate(layers):
        h = F.linear(h, weight, bias) * speed
        if i < len(layers) - 1:
            h = torch.tanh(h)
    return h


def _frozen_layers(head: nn.ModuleList) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A head's ``(weight, bias)`` pairs, detached: the same function, no gradient to them."""
    pairs = []
    for layer in head:
        assert isinstance(layer, nn.Linear)
        pairs.append((layer.weight.detach(), layer.bias.detach()))
    return pairs


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
        self.adversary: nn.ModuleList | None = None
        if config.adversary_classes > 0:
            hidden = [config.adversary_hidden] if config.adversary_hidden > 0 else []
            widths = [config.dims[-1], *hidden, config.adversary_classes]
            self.adversary = (
                _mlp(widths)
                if config.adversary_heads == 1
                else nn.ModuleList(_mlp(widths) for _ in range(config.adversary_heads))
            )

    def adversary_heads(self) -> list[nn.ModuleList]:
        """The adversary heads, each a list of linear layers; empty without a head."""
        if self.adversary is None:
            return []
        if self.config.adversary_heads == 1:
            return [self.adversary]
        return [head for head in self.adversary if isinstance(head, nn.ModuleList)]

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Xavier-normal weights, biases N(0, 0.001) truncated at 2 std (reference init)."""
        # the adversary last: a model without it draws the same initial weights
        heads = [layer for head in self.adversary_heads() for layer in head]
        for layer in [*self.encoder, *self.decoder, *heads]:
            assert isinstance(layer, nn.Linear)
            nn.init.xavier_normal_(layer.weight, generator=generator)
            nn.init.trunc_normal_(
                layer.bias,
                std=_BIAS_STD,
                a=-2 * _BIAS_STD,
                b=2 * _BIAS_STD,
                generator=generator,
            )
        with torch.no_grad():  # the head's outputs are scaled up by adversary_speed
            for layer in heads:
                assert isinstance(layer, nn.Linear)
                layer.weight.div_(self.config.adversary_speed)
                layer.bias.div_(self.config.adversary_speed)

    def _encode_input(self, x: torch.Tensor) -> torch.Tensor:
        h = F.normalize(x, p=2.0, dim=1)  # (B, I); an all-zero row stays zero
        return self.input_dropout(h)  # (B, I)

    def _adversary_outputs(
        self, mu: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The heads' logits and, for ``confuse``, the frozen heads' logits (see VAEOutput)."""
        heads = self.adversary_heads()
        if not heads:
            return None, None
        cfg = self.config
        confuse = cfg.adversary_objective is AdversaryObjective.CONFUSE
        source = mu.detach() if confuse else reverse_gradient(mu, cfg.adversary_scale)  # (B, d)
        logits = []  # K x (B, C); through the modules, for Opacus' hooks
        for head in heads:
            h = source
            for i, layer in enumerate(head):
                h = layer(h) * cfg.adversary_speed
                if i < len(head) - 1:
                    h = torch.tanh(h)
            logits.append(h)
        confusion = None
        if confuse:
            scaled = reverse_gradient(mu, -cfg.adversary_scale)  # gradient x +scale
            frozen = [_frozen_layers(head) for head in heads]
            confusion = [run_adversary_head(p, scaled, cfg.adversary_speed) for p in frozen]

        def stack(parts: list[torch.Tensor]) -> torch.Tensor:
            return parts[0] if len(parts) == 1 else torch.stack(parts, dim=1)  # (B, K, C)

        return stack(logits), None if confusion is None else stack(confusion)


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
        return VAEOutput(logits, mu, logvar, *self._adversary_outputs(mu))


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
        return VAEOutput(logits, code, None, *self._adversary_outputs(code))


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


def adversary_loss(
    output: VAEOutput, labels: torch.Tensor, class_weights: tuple[float, ...] = ()
) -> torch.Tensor:
    """Per-user adversary term, 0 where the label is unknown; ``(B,)``.

    The adversary's loss of Adv-MultVAE (Ganhor et al. 2022): ``-w[y_b] log softmax(a_b)[y_b]``
    for a user ``b`` with a known label ``y_b >= 0`` (``w`` the ``class_weights``, all 1 when
    empty), averaged over the heads; users with ``y_b = -1`` (attribute not given) contribute
    0, so the sum over a batch is over the labelled users only. With the ``confuse`` objective
    (``output.adversary_confusion``) each labelled user adds the frozen heads' mean
    cross-entropy to the uniform distribution, whose gradient reaches only the encoder.

    Parameters
    ----------
    output:
        The model's output; needs ``output.adversary_logits``.
    labels:
        ``(B,)`` int64 class indices, ``-1`` for unknown.
    class_weights:
        Per-class weights of the heads' cross-entropy (``ModelConfig.adversary_class_weights``);
        ``()`` (default): 1 each.
    """
    if output.adversary_logits is None:
        raise ValueError("the model has no adversary head (ModelConfig.adversary_classes = 0)")
    logits = output.adversary_logits
    if logits.dim() == 2:
        logits = logits.unsqueeze(1)  # (B, 1, C)
    n_heads, n_classes = logits.shape[1], logits.shape[2]
    known = labels >= 0  # (B,)
    safe = torch.where(known, labels, torch.zeros_like(labels))  # (B,)
    log_p = F.log_softmax(logits, dim=2)  # (B, K, C)
    ce = -log_p.gather(2, safe[:, None, None].expand(-1, n_heads, 1)).squeeze(2)  # (B, K)
    ce = ce.mean(dim=1)  # (B,)
    if class_weights:
        w = torch.as_tensor(class_weights, dtype=ce.dtype, device=ce.device)  # (C,)
        ce = ce * w[safe]
    if output.adversary_confusion is not None:
        conf = output.adversary_confusion
        if conf.dim() == 2:
            conf = conf.unsqueeze(1)  # (B, 1, C)
        ce = ce - F.log_softmax(conf, dim=2).sum(dim=2).mean(dim=1) / n_classes  # (B,)
    return torch.where(known, ce, torch.zeros_like(ce))  # (B,)


def vae_loss(
    output: VAEOutput,
    x: torch.Tensor,
    *,
    beta: float,
    labels: torch.Tensor | None = None,
    class_weights: tuple[float, ...] = (),
) -> torch.Tensor:
    """Negative annealed ELBO averaged over the batch (Liang et al. 2018 eq. 6), a scalar.

    ``mean_b [nll_b + beta * KL_b]``; for Mult-DAE (``output.logvar is None``) only the NLL.
    With ``labels`` the adversary's cross-entropy :func:`adversary_loss` joins each user's term
    (Adv-MultVAE, Ganhor et al. 2022): the head descends it, and the gradient reversal in the
    model makes the encoder ascend it with weight ``ModelConfig.adversary_scale``. Every term is
    a mean of per-user terms, so Opacus' ``loss_reduction="mean"`` applies.

    Parameters
    ----------
    output:
        The model's output for ``x``.
    x:
        The (un-normalised) input rows, ``(B, n_items)``.
    beta:
        KL weight, finite and >= 0; ignored for Mult-DAE.
    labels:
        ``(B,)`` int64 protected-attribute classes (``-1`` unknown) for the adversary head;
        ``None`` (default) trains without the adversary term.
    class_weights:
        The adversary's per-class weights (``ModelConfig.adversary_class_weights``); ``()``
        (default): 1 each.
    """
    return per_user_loss(output, x, beta=beta, labels=labels, class_weights=class_weights).mean()


def per_user_loss(
    output: VAEOutput,
    x: torch.Tensor,
    *,
    beta: float,
    labels: torch.Tensor | None = None,
    class_weights: tuple[float, ...] = (),
) -> torch.Tensor:
    """Each user's term of :func:`vae_loss`, ``(B,)``: ``nll_b + beta * KL_b`` (Mult-DAE: the
    NLL), plus the adversary's cross-entropy with ``labels``. Parameters as in :func:`vae_loss`.
    """
    if not (math.isfinite(beta) and beta >= 0.0):
        raise ValueError(f"beta must be finite and >= 0, got {beta!r}")
    per_user = multinomial_nll(output.logits, x)  # (B,)
    if output.logvar is not None:
        per_user = per_user + beta * kl_divergence(output.mu, output.logvar)  # (B,)
    if labels is not None:
        per_user = per_user + adversary_loss(output, labels, class_weights)  # (B,)
    return per_user


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

"""Example-level DP-SGD on a silo's users with Opacus (docs/design.md, "Cross-silo mode").

In cross-silo mode one client holds many users; it trains the global Mult-VAE on them with DP-SGD
(Abadi et al. 2016, "Deep Learning with Differential Privacy", CCS 2016, Algorithm 1), where one
example is one user's interaction row. Each step:

- Poisson-samples each user independently with probability ``q`` (Opacus ``DPDataLoader``), so the
  step is a subsampled Gaussian mechanism and privacy amplification by sampling holds;
- clips each user's gradient to L2 norm ``C`` (``max_grad_norm``), sums, adds ``N(0, (z C)^2)``
  noise (``z`` = ``noise_multiplier``) and divides by the expected batch size;
- takes one plain SGD step.

The update therefore gives every user of the silo user-level DP. The caller composes the returned
:class:`common.privacy.MechanismStep` of every round with :func:`common.privacy.compute_epsilon`
(docs/design.md, "Privacy accounting"); this module keeps no accountant of its own.

Per-user gradient norms come from one of Opacus's ``grad_sample_mode`` (:class:`GradSampleMode`):
``ghost`` (fast gradient clipping; Li et al. 2022, Bu et al. 2023) never materialises the
per-user gradients; ``functorch`` and ``hooks`` do. Ghost clipping needs the loss per user, not
its mean: the Mult-VAE loss (multinomial NLL + beta * KL, Liang et al. 2018 eqs. 2 and 6) is
wrapped in :class:`_VAECriterion`, which returns per-user values when Opacus sets its
``reduction`` to ``"none"``, and Opacus's ``DPLossFastGradientClipping`` runs the two backward
passes (norms, then the clipping-weighted loss).

Randomness: Opacus runs with ``secure_mode=False`` (it warns once); its noise and sampling come from
``torch.Generator`` objects seeded with 64-bit seeds drawn from OS entropy (``SeedSequence()``), or
from ``seed`` when one is given (tests only). torch's global generator is never used for the
noise: its default seed is a constant. Known limit of ``secure_mode=False``: the generators are not
cryptographically secure and the noise is not hardened against floating-point attacks (Mironov
2012); Opacus's ``secure_mode=True`` (torchcsprng) is the hardened option.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.model import ModelConfig, VAEOutput, build_model, kl_divergence, multinomial_nll
from common.privacy import MechanismStep

__all__ = [
    "DPSGDConfig",
    "DPSGDResult",
    "DPTraining",
    "GradSampleMode",
    "dpsgd_update",
    "make_dp_training",
]

logger = logging.getLogger(__name__)


class GradSampleMode(StrEnum):
    """How Opacus obtains per-user gradient norms (its ``grad_sample_mode``)."""

    GHOST = "ghost"
    """Fast gradient clipping with ghost norms: per-user norms from activations and output
    gradients, then a second backward pass on the clipping-weighted loss. Fastest here."""
    FUNCTORCH = "functorch"
    """Per-user gradients with ``torch.func.vmap`` per layer, then clipped and summed."""
    HOOKS = "hooks"
    """Per-user gradients with Opacus's hand-written backward hooks, then clipped and summed."""


@dataclass(frozen=True)
class DPSGDConfig:
    """DP-SGD settings of one silo (Abadi et al. 2016, Algorithm 1)."""

    noise_multiplier: float
    """z: std of the noise added to each step's summed clipped gradients, in units of
    ``max_grad_norm``; >= 0 (0 means no privacy: epsilon is infinite)."""
    max_grad_norm: float
    """C: L2 bound each user's gradient is clipped to, > 0."""
    batch_size: int
    """Expected Poisson batch size, >= 1. Opacus derives the sample rate from the number of
    batches per epoch: ``q = 1 / ceil(n_users / batch_size)``, which is ``batch_size / n_users``
    when ``batch_size`` divides ``n_users`` and never larger; the result reports the ``q`` used."""
    epochs: int
    """Local epochs per round, >= 1; an epoch is ``ceil(n_users / batch_size)`` steps."""
    lr: float
    """SGD learning rate, > 0 (plain SGD: the update norm is then at most about
    ``lr * steps * C`` plus noise)."""
    grad_sample_mode: GradSampleMode = GradSampleMode.GHOST
    """Per-user gradient engine; strings ``"ghost"``, ``"functorch"``, ``"hooks"`` accepted."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "grad_sample_mode", GradSampleMode(self.grad_sample_mode))
        _check_float("noise_multiplier", self.noise_multiplier, allow_zero=True)
        _check_float("max_grad_norm", self.max_grad_norm, allow_zero=False)
        _check_float("lr", self.lr, allow_zero=False)
        _check_int("batch_size", self.batch_size)
        _check_int("epochs", self.epochs)


@dataclass(frozen=True)
class DPSGDResult:
    """What one :func:`dpsgd_update` call produced and the privacy mechanism it used."""

    delta: dict[str, np.ndarray]
    """``local - global`` per parameter name, float32, not weighted."""
    steps: int
    """DP-SGD steps taken (noisy updates): ``epochs * ceil(n_users / batch_size)``."""
    sample_rate: float
    """q: Poisson probability that a user is in a step's batch."""
    noise_multiplier: float
    """z used at every step."""
    mechanism: MechanismStep
    """``MechanismStep(z, q, steps)``: append it to the silo's history and compose with
    :func:`common.privacy.compute_epsilon`."""
    mean_loss: float
    """Mean per-user loss (negative annealed ELBO) over the sampled users; NaN if none was
    sampled."""
    train_seconds: float
    """Wall-clock seconds of the training loop."""


def _check_float(name: str, value: float, *, allow_zero: bool) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")


def _check_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class _VAECriterion:
    """Mult-VAE loss as a criterion with a ``reduction``, as Opacus's ghost clipping needs.

    ``reduction="none"`` gives the per-user loss ``(B,)`` (multinomial NLL plus ``beta`` times KL,
    Liang et al. 2018 eqs. 2 and 6); ``"mean"`` and ``"sum"`` reduce it. Opacus's
    ``DPLossFastGradientClipping`` switches ``reduction`` to ``"none"`` for its call and back.
    """

    def __init__(self, *, beta: float, reduction: str = "mean") -> None:
        self.beta = beta
        self.reduction = reduction

    def __call__(self, output: VAEOutput, x: torch.Tensor) -> torch.Tensor:
        per_user = multinomial_nll(output.logits, x)  # (B,)
        if output.logvar is not None:
            per_user = per_user + self.beta * kl_divergence(output.mu, output.logvar)  # (B,)
        if self.reduction == "none":
            return per_user
        return per_user.sum() if self.reduction == "sum" else per_user.mean()


@dataclass
class DPTraining:
    """A model, optimiser, loss and Poisson loader made private by Opacus, ready to step.

    Built by :func:`make_dp_training`; the same object for every :class:`GradSampleMode`, unlike
    ``PrivacyEngine.make_private``, whose return shape depends on the mode.
    """

    module: nn.Module
    """The Opacus-wrapped model; it shares its parameters with the model passed in."""
    optimizer: torch.optim.Optimizer
    """Opacus ``DPOptimizer`` (or its fast-gradient-clipping variant) around plain SGD."""
    loader: DataLoader
    """Opacus ``DPDataLoader``: Poisson batches of user rows, ``ceil(n / batch_size)`` per epoch."""
    sample_rate: float
    """q of the loader."""
    mode: GradSampleMode
    """Engine of the per-user gradient norms."""
    _criterion: _VAECriterion
    """The Mult-VAE loss; :meth:`step` sets its ``beta``."""
    _dp_loss: Callable[[VAEOutput, torch.Tensor], Any] | None
    """Opacus ``DPLossFastGradientClipping`` around ``_criterion`` in ghost mode, else None."""

    def step(self, x: torch.Tensor, *, beta: float) -> float:
        """One DP-SGD step on the rows ``x`` ``(B, n_items)``; returns the mean loss (NaN if B=0).

        An empty batch still takes the step: the noise is added all the same, as the analysis of
        the subsampled Gaussian mechanism assumes.
        """
        self._criterion.beta = beta
        self.optimizer.zero_grad(set_to_none=True)
        output: VAEOutput = self.module(x)
        criterion = self._criterion if self._dp_loss is None else self._dp_loss
        loss = criterion(output, x)  # ghost: runs both backward passes in loss.backward()
        loss.backward()
        self.optimizer.step()
        return float(loss.item()) if x.shape[0] > 0 else math.nan


def make_dp_training(
    model: nn.Module,
    data: torch.Tensor,
    *,
    cfg: DPSGDConfig,
    sampling_generator: torch.Generator,
    noise_generator: torch.Generator,
) -> DPTraining:
    """Make ``model`` private with ``opacus.PrivacyEngine.make_private`` (Poisson sampling).

    Parameters
    ----------
    model:
        A Mult-VAE / Mult-DAE; wrapped in place (Opacus adds hooks), so use a fresh copy.
    data:
        User rows ``(n_users, n_items)`` float32; one row is one privacy unit.
    cfg:
        DP-SGD settings.
    sampling_generator, noise_generator:
        Sources of the Poisson sampling and of the Gaussian noise; seed them from OS entropy
        outside tests.
    """
    if data.ndim != 2 or data.shape[0] == 0:
        raise ValueError(f"data must be (n_users >= 1, n_items), got shape {tuple(data.shape)}")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    loader = DataLoader(
        TensorDataset(data), batch_size=cfg.batch_size, generator=sampling_generator
    )
    criterion = _VAECriterion(beta=0.0)
    # secure_mode=False: the noise comes from noise_generator (OS-entropy seeded), see module doc.
    # The engine's own accountant is unused: the caller composes the returned MechanismStep.
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    private = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=cfg.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        loss_reduction="mean",
        poisson_sampling=True,
        noise_generator=noise_generator,
        grad_sample_mode=cfg.grad_sample_mode.value,
    )
    # make_private returns (module, optimizer, criterion, loader) in ghost mode, else 3 items.
    dp_loss: Callable[[VAEOutput, torch.Tensor], Any] | None = None
    if cfg.grad_sample_mode is GradSampleMode.GHOST:
        module, dp_optimizer, dp_loss, dp_loader = private
    else:
        module, dp_optimizer, dp_loader = private
    return DPTraining(
        module=module,
        optimizer=dp_optimizer,
        loader=dp_loader,
        sample_rate=float(dp_loader.sample_rate),
        mode=cfg.grad_sample_mode,
        _criterion=criterion,
        _dp_loss=dp_loss,
    )


@contextlib.contextmanager
def _forked_global_rng(seed: int) -> Iterator[None]:
    """Draw the model's dropout / reparameterisation noise from ``seed``, not the global state.

    The model draws that noise from torch's global generator (so Opacus sees plain modules);
    forking keeps the caller's global RNG as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def dpsgd_update(
    global_state: dict[str, torch.Tensor],
    rows: sp.csr_matrix,
    *,
    model_config: ModelConfig,
    cfg: DPSGDConfig,
    beta: float,
    seed: int | None,
) -> DPSGDResult:
    """Train a fresh copy of the global model on a silo's users with DP-SGD; return the delta.

    DP-SGD of Abadi et al. 2016 (Algorithm 1) with Poisson sampling, per-user clipping to
    ``cfg.max_grad_norm`` and Gaussian noise ``cfg.noise_multiplier``, through Opacus
    (``PrivacyEngine.make_private``, ``cfg.grad_sample_mode``), plain SGD with ``cfg.lr``.

    Parameters
    ----------
    global_state:
        The global model's ``state_dict``; not modified.
    rows:
        ``(n_users, n_items)`` interactions of the silo's users, one row per user (the privacy
        unit); densified to float32, fine for silos of a few thousand users.
    model_config:
        Architecture of the global model.
    cfg:
        DP-SGD settings.
    beta:
        KL weight of the Mult-VAE loss for this round, finite and >= 0.
    seed:
        Seeds sampling, noise and the model's dropout for reproducible tests. ``None`` (the
        default for real runs) draws them from OS entropy.

    Returns
    -------
    DPSGDResult
        ``local - global`` per parameter, the steps, ``q``, ``z`` and the ``MechanismStep`` to
        account.
    """
    _check_float("beta", beta, allow_zero=True)
    X = sp.csr_matrix(rows, dtype=np.float32)
    n_users, n_items = X.shape
    if n_users == 0:
        raise ValueError("rows has no users to train on")
    if n_items != model_config.n_items:
        raise ValueError(
            f"rows has {n_items} items, model_config.n_items is {model_config.n_items}"
        )
    # One 64-bit seed each for sampling, noise and the model's dropout; SeedSequence(None) reads
    # OS entropy.
    sampling_seed, noise_seed, model_seed = (
        int(s) for s in np.random.SeedSequence(seed).generate_state(3, dtype=np.uint64)
    )
    data = torch.from_numpy(X.toarray())  # (n_users, n_items) float32
    with _forked_global_rng(model_seed):
        model = build_model(model_config)
        model.load_state_dict(global_state)
        model.train()
        training = make_dp_training(
            model,
            data,
            cfg=cfg,
            sampling_generator=torch.Generator().manual_seed(sampling_seed),
            noise_generator=torch.Generator().manual_seed(noise_seed),
        )
        start = time.perf_counter()
        steps, users, loss_sum = 0, 0, 0.0
        for _ in range(cfg.epochs):
            for (x,) in training.loader:  # x: (B, n_items), B ~ Binomial(n_users, q)
                loss = training.step(x, beta=beta)
                if x.shape[0] > 0:
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss} at DP-SGD step {steps}")
                    loss_sum += loss * x.shape[0]
                    users += x.shape[0]
                steps += 1
        seconds = time.perf_counter() - start
    local_state = model.state_dict()
    delta = {
        k: (local_state[k] - global_state[k]).detach().cpu().numpy().astype(np.float32)
        for k in global_state
    }
    mechanism = MechanismStep(
        noise_multiplier=cfg.noise_multiplier, sample_rate=training.sample_rate, steps=steps
    )
    result = DPSGDResult(
        delta=delta,
        steps=steps,
        sample_rate=training.sample_rate,
        noise_multiplier=cfg.noise_multiplier,
        mechanism=mechanism,
        mean_loss=loss_sum / users if users else math.nan,
        train_seconds=seconds,
    )
    logger.debug(
        "DP-SGD on %d users: %d steps, q=%.4f, z=%.3f, C=%.3g, mode=%s, %.2fs",
        n_users,
        steps,
        training.sample_rate,
        cfg.noise_multiplier,
        cfg.max_grad_norm,
        cfg.grad_sample_mode.value,
        seconds,
    )
    return result

"""Plain (non-private) mini-batch training and scoring of Mult-VAE / Mult-DAE.

Used as is by the centralised run and by each federated client for its local epochs; the
privacy layers (Opacus DP-SGD, update clipping and noise) wrap the model and optimiser, not this
loop. The loop follows the reference ``vae_cf`` notebook (Liang et al. 2018): rows shuffled each
epoch, one Adam step per batch, ``beta`` annealed with the global update count.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import torch
from torch import nn

from common.model import ModelConfig, VAEOutput, per_user_loss, vae_loss

__all__ = [
    "StepOptimizer",
    "TrainConfig",
    "TrainStats",
    "clip_grad_norm",
    "latent_codes",
    "make_optimizer",
    "score_users",
    "train_epochs",
    "weighted_vae_loss",
]

logger = logging.getLogger(__name__)

Sparse: TypeAlias = sp.spmatrix | sp.sparray


class StepOptimizer(Protocol):
    """What :func:`train_epochs` needs of an optimizer (any ``torch.optim.Optimizer`` has it)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients."""

    def step(self) -> Any:
        """Update the parameters from their gradients."""


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings (reference values: Adam, lr 1e-3, batch 500)."""

    epochs: int = 1
    """Passes over the local data per call (per federated round on a client)."""
    batch_size: int = 500
    """Users per update."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Adam L2 penalty; 0 for Mult-VAE, ``common.model.REFERENCE_DAE_WEIGHT_DECAY`` for Mult-DAE."""
    seed: int = 0
    """Seed of the generator that shuffles rows and draws dropout / reparameterisation noise."""

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0.0):
            raise ValueError(f"lr must be finite and > 0, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0.0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay!r}")

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with :attr:`seed`."""
        return torch.Generator().manual_seed(self.seed)


@dataclass(frozen=True)
class TrainStats:
    """What one :func:`train_epochs` call did."""

    steps: int
    """Optimiser updates done; the next call's ``start_step`` is ``start_step + steps``."""
    mean_loss: float
    """Loss (negative annealed ELBO per user) averaged over every user row seen."""
    last_beta: float
    """KL weight used by the last update."""


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam over all trainable parameters, as in the reference."""
    return torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def _forked_rng(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Draw dropout / ``randn`` noise from a seed taken from ``generator``, not the global state.

    The model's noise uses torch's global RNG (so Opacus sees ordinary modules); forking it makes
    a run reproducible from ``generator`` alone and leaves the global RNG as it was, which matters
    when many simulated clients train in one process.
    """
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients of ``params`` down so their joint L2 norm is at most ``max_norm``.

    ``torch.nn.utils.clip_grad_norm_``'s arithmetic (without its foreach machinery); returns the
    norm before clipping. A non-finite norm leaves the gradients as they are: the loss check of
    :func:`train_epochs` stops the training at the next update.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )
    if math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(scale)
    return norm


def _dense_rows(
    data: sp.csr_matrix, rows: npt.NDArray[np.int64], device: torch.device
) -> torch.Tensor:
    return torch.from_numpy(data[rows].toarray()).to(device)  # (B, I) float32


def weighted_vae_loss(
    output: VAEOutput,
    x: torch.Tensor,
    user_weights: torch.Tensor,
    *,
    beta: float,
    labels: torch.Tensor | None = None,
    class_weights: tuple[float, ...] = (),
) -> torch.Tensor:
    """:func:`common.model.vae_loss` with each user's term times its weight, a scalar.

    ``mean_b [w_b (nll_b + beta * KL_b + adv_b)]``: group re-weighting of the local loss
    (``[fairness] reweight``), still a mean of per-user terms; all weights 1 give ``vae_loss``.

    Parameters
    ----------
    output, x, beta, labels, class_weights:
        As for :func:`common.model.vae_loss`.
    user_weights:
        ``(B,)`` float32 weight of each row of ``x`` (finite, > 0).
    """
    per_user = per_user_loss(output, x, beta=beta, labels=labels, class_weights=class_weights)
    return (user_weights * per_user).mean()


def train_epochs(
    model: nn.Module,
    data: Sparse,
    *,
    epochs: int,
    batch_size: int,
    optimizer: StepOptimizer,
    beta_schedule: Callable[[int], float] | None,
    start_step: int = 0,
    generator: torch.Generator | None = None,
    max_grad_norm: float | None = None,
    labels: npt.NDArray[np.int64] | None = None,
    user_weights: npt.NDArray[np.float32] | None = None,
) -> TrainStats:
    """Train ``model`` for ``epochs`` passes over the rows of ``data`` (Liang et al. 2018, alg. 1).

    Each epoch shuffles the rows, densifies each batch to float32 ``(B, n_items)``, and takes one
    optimiser step on :func:`common.model.vae_loss` with ``beta = beta_schedule(step)``, where
    ``step`` counts updates from ``start_step`` (the reference's ``update_count``).

    Parameters
    ----------
    model:
        A Mult-VAE / Mult-DAE (possibly wrapped, e.g. by Opacus) returning
        :class:`common.model.VAEOutput`.
    data:
        ``(n_users, n_items)`` interactions, one row per user.
    epochs, batch_size:
        Passes over the data (> 0) and rows per update (> 0; the last batch may be smaller).
    optimizer:
        Optimiser over ``model``'s parameters.
    beta_schedule:
        KL weight as a function of the global update count, e.g.
        :func:`common.model.beta_schedule`; ``None`` means ``beta = 0`` (Mult-DAE, or no KL).
    start_step:
        Updates already done in earlier calls (>= 0).
    generator:
        Random source for shuffling and for the model's dropout / reparameterisation noise; with
        it the call is reproducible and leaves torch's global RNG untouched. ``None`` uses the
        global RNG.
    max_grad_norm:
        Clip each update's mini-batch gradient to this L2 norm (:func:`clip_grad_norm`), a guard
        against divergence at a large learning rate; ``None`` does not clip.
    labels:
        ``(n_users,)`` int64 protected-attribute classes (``-1`` unknown), shuffled with the
        rows: the adversary head's targets (Adv-MultVAE, :func:`common.model.adversary_loss`);
        the model must have the head. ``None`` (default) trains without the adversary.
    user_weights:
        ``(n_users,)`` float32 weight of each row's loss term (finite, > 0; group re-weighting,
        ``client.local.group_weights``), shuffled with the rows: each batch descends
        :func:`weighted_vae_loss`. ``None`` (default): :func:`common.model.vae_loss`, every row
        weighing 1.

    Returns
    -------
    TrainStats
        Updates done, mean loss (the weighted loss with ``user_weights``), last ``beta``.

    Raises
    ------
    FloatingPointError
        If the loss becomes NaN or infinite (``loss is inf at update 2``); that update is not
        applied.
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    X = sp.csr_matrix(data, dtype=np.float32)
    n_users = X.shape[0]
    if n_users == 0:
        raise ValueError("data has no rows to train on")
    y = None
    if labels is not None:
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64))  # (n_users,)
        if y.shape != (n_users,):
            raise ValueError(f"labels must have shape ({n_users},), got {tuple(y.shape)}")
    w = None
    if user_weights is not None:
        w = torch.as_tensor(np.asarray(user_weights, dtype=np.float32))  # (n_users,)
        if w.shape != (n_users,):
            raise ValueError(f"user_weights must have shape ({n_users},), got {tuple(w.shape)}")
        if not bool((torch.isfinite(w) & (w > 0)).all()):
            raise ValueError("user_weights must be finite and > 0")
    device = _device_of(model)
    model_cfg = getattr(getattr(model, "_module", model), "config", None)  # Opacus wraps it
    class_weights: tuple[float, ...] = ()
    if y is not None and isinstance(model_cfg, ModelConfig):
        class_weights = model_cfg.adversary_class_weights
    model.train()
    step = start_step
    beta = 0.0
    loss_sum = 0.0
    with _forked_rng(generator, device):
        for _ in range(epochs):
            perm = torch.randperm(n_users, generator=generator).numpy()  # (n_users,)
            for start in range(0, n_users, batch_size):
                batch = perm[start : start + batch_size]
                x = _dense_rows(X, batch, device)  # (B, I)
                yb = None if y is None else y[torch.from_numpy(batch)].to(device)  # (B,)
                beta = 0.0 if beta_schedule is None else float(beta_schedule(step))
                optimizer.zero_grad(set_to_none=True)
                output: VAEOutput = model(x)
                if w is None:
                    loss = vae_loss(output, x, beta=beta, labels=yb, class_weights=class_weights)
                else:
                    wb = w[torch.from_numpy(batch)].to(device)  # (B,)
                    loss = weighted_vae_loss(
                        output, x, wb, beta=beta, labels=yb, class_weights=class_weights
                    )
                value = float(loss.item())
                if not math.isfinite(value):  # before the step: the weights stay finite
                    raise FloatingPointError(f"loss is {value} at update {step}")
                loss.backward()
                if max_grad_norm is not None:
                    clip_grad_norm(params, max_grad_norm)
                optimizer.step()
                loss_sum += value * x.shape[0]
                step += 1
    stats = TrainStats(
        steps=step - start_step, mean_loss=loss_sum / (epochs * n_users), last_beta=beta
    )
    logger.debug("trained %d users: %s", n_users, stats)
    return stats


def latent_codes(model: nn.Module, foldin: Sparse, *, batch_size: int = 1000) -> np.ndarray:
    """Latent codes ``mu`` ``(n_users, d)`` float32 of each fold-in row, in evaluation mode.

    What the encoder makes of a user's history (Liang et al. 2018: ``z = mu`` at evaluation);
    the code an attacker would try to read a protected attribute from
    (:func:`common.fairness.attacker.attacker_auc`). The training mode is restored afterwards.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    X = sp.csr_matrix(foldin, dtype=np.float32)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    codes: list[np.ndarray] = []
    try:
        with torch.no_grad():
            for start in range(0, X.shape[0], batch_size):
                rows = np.arange(start, min(start + batch_size, X.shape[0]))
                output: VAEOutput = model(_dense_rows(X, rows, device))
                codes.append(output.mu.float().cpu().numpy())  # (B, d)
    finally:
        model.train(was_training)
    if not codes:
        raise ValueError("foldin has no rows")
    return np.concatenate(codes)  # (n_users, d)


def score_users(model: nn.Module, foldin: Sparse, *, batch_size: int = 1000) -> np.ndarray:
    """Logits ``(n_users, n_items)`` float32 for each fold-in row, in evaluation mode.

    Evaluation mode turns dropout off and uses ``z = mu`` (Liang et al. 2018 section 2.4). Fold-in
    items are not masked here: :func:`common.metrics.evaluate` does it. The model's training mode
    is restored afterwards.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    X = sp.csr_matrix(foldin, dtype=np.float32)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    out = np.empty(X.shape, dtype=np.float32)  # (n_users, I)
    try:
        with torch.no_grad():
            for start in range(0, X.shape[0], batch_size):
                rows = np.arange(start, min(start + batch_size, X.shape[0]))
                output: VAEOutput = model(_dense_rows(X, rows, device))
                out[rows] = output.logits.float().cpu().numpy()  # (B, I)
    finally:
        model.train(was_training)
    return out

"""What a client does with its own data: keep a local held-out part, train, measure.

A client never trains on its local held-out items: they are kept apart (deterministically, so
every round sees the same split) to score the global model on the device itself.

With ``[fairness] adversary`` set, the client also trains the model's adversary head on its own
users' protected attribute (Adv-MultVAE, :func:`adversary_labels`); the attribute stays on the
device, only the weights go into the update. With ``[fairness] reweight`` it multiplies each of
its users' loss terms by the public weight of the user's class (:func:`group_weights`), again
from the attribute it holds alone.

Training that goes non-finite (a NaN or infinite loss, or update) sends nothing: the update comes
back marked :attr:`LocalUpdate.diverged` with the reason, which the ClientApp replies with
(:class:`common.protocol.Divergence`) and the server counts as a failed client.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from common.fairness.attacker import attribute_classes, attribute_labels
from common.metrics import evaluate
from common.model import ModelConfig, build_model
from common.protocol import EVAL_USERS
from common.run.config import ClientConfig, FairnessConfig
from common.training import score_users, train_epochs

__all__ = [
    "LocalData",
    "LocalUpdate",
    "PlainSGD",
    "adversary_labels",
    "compute_update",
    "diverged_update",
    "group_weights",
    "local_metrics",
    "nonfinite_reason",
    "split_local",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalData:
    """A client's rows, split into what it trains on and what it holds out to evaluate."""

    train: sp.csr_matrix
    foldin: sp.csr_matrix
    holdout: sp.csr_matrix

    @property
    def n_users(self) -> int:
        """Users on this client."""
        return int(self.train.shape[0])


def split_local(rows: sp.csr_matrix, *, fraction: float, seed: int) -> LocalData:
    """Hold out ``fraction`` of each user's items (users with >= 5 items) for local evaluation.

    Mirrors the fold-in / held-out split of Liang et al. (2018) on the client's own users:
    held-out items are removed from the training rows, fold-in items are the rest.
    """
    rows = sp.csr_matrix(rows, dtype=np.float32)
    rng = np.random.default_rng(seed)
    keep = np.ones(rows.nnz, dtype=bool)
    for u in range(rows.shape[0]):
        start, end = rows.indptr[u], rows.indptr[u + 1]
        n = end - start
        if n >= 5:
            out = rng.choice(n, size=int(fraction * n), replace=False)
            keep[start + out] = False
    coo = rows.tocoo()
    shape = rows.shape
    train = sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=shape)
    held = sp.csr_matrix((coo.data[~keep], (coo.row[~keep], coo.col[~keep])), shape=shape)
    return LocalData(train=train, foldin=train, holdout=held)


@dataclass(frozen=True)
class LocalUpdate:
    """A client's weighted model update and what producing it cost."""

    delta: dict[str, np.ndarray]
    """``weight * (local - global)`` per parameter; empty when :attr:`diverged`."""
    weight: float
    """The weight already applied (the client's example count); 0 when :attr:`diverged`."""
    num_examples: int
    mean_loss: float
    train_seconds: float
    diverged: str | None = None
    """Why training went non-finite (``loss is inf at update 2``): then there is no update to
    send, only this reason. ``None`` for a finite update."""


def nonfinite_reason(delta: Mapping[str, np.ndarray]) -> str | None:
    """``"update is not finite (nan in decoder.0.weight)"`` for the first tensor of ``delta`` with a
    NaN or infinite value, else ``None``."""
    for name, value in delta.items():
        arr = np.asarray(value)
        if not np.isfinite(arr).all():
            kind = "nan" if np.isnan(arr).any() else "inf"
            return f"update is not finite ({kind} in {name})"
    return None


def diverged_update(reason: str, *, num_examples: int, train_seconds: float) -> LocalUpdate:
    """The :class:`LocalUpdate` of a client whose training went non-finite: no delta, weight 0."""
    logger.warning("local training diverged: %s; no update sent", reason)
    return LocalUpdate(
        delta={},
        weight=0.0,
        num_examples=num_examples,
        mean_loss=math.nan,
        train_seconds=train_seconds,
        diverged=reason,
    )


_MODELS: dict[str, nn.Module] = {}


class PlainSGD:
    """``w <- w - lr * grad``: ``torch.optim.SGD`` without momentum, minus its first-use cost.

    Making any ``torch.optim`` optimizer imports ``torch._dynamo`` the first time
    (``torch/_compile.py``: 1.5 s on an idle core, 3 s on busy ones), and a deployed device
    pays it in every train message, as Flower runs each message in a fresh process. The
    update is the same arithmetic as ``torch.optim.SGD``'s single-tensor path.
    """

    def __init__(self, params: list[nn.Parameter], *, lr: float) -> None:
        self.params = params
        self.lr = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the gradients."""
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One plain gradient step."""
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.lr)


def model_for(config: ModelConfig) -> nn.Module:
    """A model of ``config``'s shape, built once per process (weights are always overwritten)."""
    key = repr(sorted(config.to_dict().items()))
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = build_model(config)
    return _MODELS[key]


def adversary_labels(
    fairness: FairnessConfig, attributes: Mapping[str, np.ndarray], n_users: int
) -> np.ndarray | None:
    """The adversary head's targets ``(n_users,)`` int64 for this client's users, or ``None``.

    ``None`` without ``fairness.adversary``; else the class of each user's attribute
    (:func:`common.fairness.attacker.attribute_labels`), ``-1`` where it is unknown. A client
    that lacks the attribute altogether (a device without a profile) gets all ``-1``: it trains
    the recommender as usual and neither the head nor the reversal moves.
    """
    if not fairness.adversary:
        return None
    values = attributes.get(fairness.adversary)
    if values is None:
        logger.warning("no %r attribute on this client: adversary not trained", fairness.adversary)
        return np.full(n_users, -1, dtype=np.int64)
    if len(values) != n_users:
        raise ValueError(f"{len(values)} {fairness.adversary!r} values for {n_users} users")
    return attribute_labels(fairness.adversary, values)


def group_weights(
    fairness: FairnessConfig, attributes: Mapping[str, np.ndarray], n_users: int
) -> np.ndarray | None:
    """Each of this client's users' loss weight ``(n_users,)`` float32, or ``None``.

    ``None`` without ``fairness.reweight``; else the table's weight for the class of each
    user's ``fairness.reweight_attribute`` (:func:`common.fairness.attacker.attribute_classes`),
    1 for a class not in the table or an unknown value. A client that lacks the attribute
    altogether (a device without a profile) weighs every user 1.
    """
    table = fairness.group_weights
    if not table:
        return None
    attribute = fairness.reweight_attribute
    values = attributes.get(attribute)
    if values is None:
        logger.warning("no %r attribute on this client: its users all weigh 1", attribute)
        return np.ones(n_users, dtype=np.float32)
    if len(values) != n_users:
        raise ValueError(f"{len(values)} {attribute!r} values for {n_users} users")
    classes = attribute_classes(attribute, values).tolist()
    return np.asarray([table.get(c, 1.0) for c in classes], dtype=np.float32)


def compute_update(
    global_state: dict[str, torch.Tensor],
    data: LocalData,
    *,
    model_config: ModelConfig,
    client: ClientConfig,
    beta: float,
    seed: int,
    labels: np.ndarray | None = None,
    user_weights: np.ndarray | None = None,
) -> LocalUpdate:
    """Train the global model on the client's rows for ``client.local_epochs`` epochs.

    Returns the example-weighted delta ``n * (local - global)``, so the server only adds
    updates and divides by the summed weight (pre-weighting keeps aggregation additive). Each
    step's gradient is clipped to ``client.max_grad_norm`` when set. A non-finite loss or
    update is not returned: the result is :func:`diverged_update` with the reason instead
    (check :attr:`LocalUpdate.diverged`), never an exception. ``labels`` (``(n_users,)``
    int64, ``-1`` unknown; :func:`adversary_labels`) train the adversary head of a model
    config with ``adversary_classes > 0``; the delta then covers the head too.
    ``user_weights`` (``(n_users,)`` float32, :func:`group_weights`) multiply each user's loss
    term (``common.training.train_epochs``); the update's aggregation weight stays the user
    count.
    """
    if labels is not None and model_config.adversary_classes == 0:
        raise ValueError("labels given but model_config has no adversary head")
    model = model_for(model_config)
    model.load_state_dict(global_state)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer | PlainSGD
    if client.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=client.lr)
    else:
        optimizer = PlainSGD(params, lr=client.lr)
    start = time.perf_counter()
    try:
        stats = train_epochs(
            model,
            data.train,
            epochs=client.local_epochs,
            batch_size=client.batch_size,
            optimizer=optimizer,
            beta_schedule=lambda _step: beta,
            generator=torch.Generator().manual_seed(seed),
            max_grad_norm=client.max_grad_norm,
            labels=labels,
            user_weights=user_weights,
        )
    except FloatingPointError as err:  # loss is inf at update 2
        seconds = time.perf_counter() - start
        return diverged_update(str(err), num_examples=data.n_users, train_seconds=seconds)
    seconds = time.perf_counter() - start
    weight = float(data.n_users)
    new_state = model.state_dict()
    delta = {
        k: (weight * (new_state[k] - global_state[k])).numpy().astype(np.float32)
        for k in global_state
    }
    why = nonfinite_reason(delta)  # every loss was finite, yet the last step can overflow
    if why is not None:
        return diverged_update(why, num_examples=data.n_users, train_seconds=seconds)
    return LocalUpdate(
        delta=delta,
        weight=weight,
        num_examples=data.n_users,
        mean_loss=stats.mean_loss,
        train_seconds=seconds,
    )


def local_metrics(
    global_state: dict[str, torch.Tensor], data: LocalData, *, model_config: ModelConfig
) -> dict[str, float]:
    """NDCG@100 / Recall@20 / Recall@50 of the global model on the local held-out items."""
    users = np.diff(data.holdout.indptr) > 0
    if not users.any():
        return {EVAL_USERS: 0.0}
    model = model_for(model_config)
    model.load_state_dict(global_state)
    metrics = evaluate(
        lambda x: score_users(model, x), data.foldin[users], data.holdout[users], ks=(20, 50, 100)
    )
    return {
        "ndcg@100": float(metrics["ndcg@100"]),
        "recall@20": float(metrics["recall@20"]),
        "recall@50": float(metrics["recall@50"]),
        EVAL_USERS: float(users.sum()),
    }

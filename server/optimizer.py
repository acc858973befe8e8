"""Server optimizers: how the averaged client update moves the global model.

The server sees only the average update ``delta = mean_k(local_k - global)`` (a pseudo-gradient
with the sign flipped). FedAvg with a server learning rate steps along it; FedAdam keeps Adam
moments of it (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2).
"""

from __future__ import annotations

import math

import numpy as np

from common.run.config import ServerConfig, ServerOptimizer

__all__ = ["ServerOpt", "cosine_lr_scale", "make_server_optimizer"]

Arrays = dict[str, np.ndarray]


class ServerOpt:
    """Applies averaged client deltas to the global weights; its state survives a resume.

    Parameters
    ----------
    kind:
        ``fedavg`` (``w += lr * delta``) or ``fedadam``.
    lr:
        Server learning rate eta (> 0).
    beta1, beta2, tau:
        FedAdam moment decays and adaptivity (Reddi et al. 2021, Alg. 2: ``m = b1 m + (1-b1) d``,
        ``v = b2 v + (1-b2) d^2``, ``w += eta m / (sqrt(v) + tau)``). Unused by FedAvg.
    """

    def __init__(
        self,
        *,
        kind: ServerOptimizer,
        lr: float,
        beta1: float = 0.9,
        beta2: float = 0.999,
        tau: float = 1e-8,
    ) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a finite number > 0, got {tau}")
        self.kind = kind
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.m: Arrays = {}
        self.v: Arrays = {}
        self.steps = 0

    def step_inplace(self, weights: Arrays, delta: Arrays, *, lr_scale: float = 1.0) -> None:
        """Move ``weights`` (changed in place) along the averaged client update ``delta``.

        ``lr_scale`` multiplies the learning rate for this step (a schedule's factor).
        """
        if set(weights) != set(delta):
            raise ValueError("delta must have the same arrays as the weights")
        if not (math.isfinite(lr_scale) and lr_scale > 0):
            raise ValueError(f"lr_scale must be a finite number > 0, got {lr_scale}")
        self.steps += 1
        lr = self.lr * lr_scale
        for name, d in delta.items():
            if self.kind is ServerOptimizer.FEDAVG:
                weights[name] += lr * d
                continue
            m = self.m.setdefault(name, np.zeros_like(d))
            v = self.v.setdefault(name, np.zeros_like(d))
            m *= self.beta1
            m += (1.0 - self.beta1) * d
            v *= self.beta2
            v += (1.0 - self.beta2) * d * d
            weights[name] += lr * m / (np.sqrt(v) + self.tau)

    def state_dict(self) -> dict[str, object]:
        """Moments and step count, for checkpoints (copies: later steps do not change them)."""
        return {
            "steps": self.steps,
            "m": {k: v.copy() for k, v in self.m.items()},
            "v": {k: v.copy() for k, v in self.v.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` returned."""
        steps = state["steps"]
        if not isinstance(steps, int):
            raise ValueError("bad optimizer state: steps")
        self.steps = steps
        self.m = {k: np.array(v) for k, v in dict(state["m"]).items()}  # type: ignore[call-overload]
        self.v = {k: np.array(v) for k, v in dict(state["v"]).items()}  # type: ignore[call-overload]


def cosine_lr_scale(server_round: int, *, rounds: int, final_fraction: float) -> float:
    """Cosine decay from 1 at round 1 to ``final_fraction`` at round ``rounds``."""
    if rounds <= 1:
        return 1.0
    progress = min(max((server_round - 1) / (rounds - 1), 0.0), 1.0)
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_server_optimizer(cfg: ServerConfig) -> ServerOpt:
    """The optimizer that ``cfg`` describes."""
    return ServerOpt(kind=cfg.optimizer, lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, tau=cfg.tau)

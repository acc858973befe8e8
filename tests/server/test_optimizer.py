"""Server optimizers: hand-worked FedAvg and FedAdam steps, state round trip."""

from __future__ import annotations

import numpy as np
import pytest

from common.run.config import ServerOptimizer
from server.optimizer import ServerOpt


def test_fedavg_steps_along_delta_with_server_lr() -> None:
    opt = ServerOpt(kind=ServerOptimizer.FEDAVG, lr=0.5)
    w = {"a": np.array([1.0, 2.0])}
    opt.step_inplace(w, {"a": np.array([2.0, -4.0])})
    # 1 + 0.5*2 = 2, 2 + 0.5*(-4) = 0
    np.testing.assert_allclose(w["a"], [2.0, 0.0])


def test_fedadam_first_step_is_lr_times_sign() -> None:
    opt = ServerOpt(kind=ServerOptimizer.FEDADAM, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-9)
    w = {"a": np.array([0.0, 0.0])}
    opt.step_inplace(w, {"a": np.array([3.0, -0.5])})
    # m = 0.1*d, v = 0.01*d^2 -> m/sqrt(v) = sign(d); no bias correction (Reddi et al. Alg. 2)
    np.testing.assert_allclose(w["a"], [0.1, -0.1], rtol=1e-6)


def test_state_round_trip_continues_identically() -> None:
    a = ServerOpt(kind=ServerOptimizer.FEDADAM, lr=0.1)
    wa = {"x": np.ones(3)}
    a.step_inplace(wa, {"x": np.array([1.0, 2.0, 3.0])})
    b = ServerOpt(kind=ServerOptimizer.FEDADAM, lr=0.1)
    b.load_state_dict(a.state_dict())
    wb = {"x": wa["x"].copy()}
    d = {"x": np.array([-1.0, 0.5, 0.0])}
    a.step_inplace(wa, d)
    b.step_inplace(wb, d)
    np.testing.assert_array_equal(wa["x"], wb["x"])


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_lr_is_rejected(lr: float) -> None:
    with pytest.raises(ValueError, match="lr"):
        ServerOpt(kind=ServerOptimizer.FEDAVG, lr=lr)


def test_cosine_schedule_ends_at_final_fraction() -> None:
    from server.optimizer import cosine_lr_scale

    assert cosine_lr_scale(1, rounds=11, final_fraction=0.1) == pytest.approx(1.0)
    # halfway: 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    assert cosine_lr_scale(6, rounds=11, final_fraction=0.1) == pytest.approx(0.55)
    assert cosine_lr_scale(11, rounds=11, final_fraction=0.1) == pytest.approx(0.1)
    assert cosine_lr_scale(5, rounds=11, final_fraction=1.0) == pytest.approx(1.0)

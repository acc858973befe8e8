"""Tests for common.model: shapes, loss arithmetic, annealing, config checks, Opacus support."""

from __future__ import annotations

import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn

from common.model import (
    ModelConfig,
    ModelKind,
    MultDAE,
    MultVAE,
    VAEOutput,
    anneal_beta,
    beta_schedule,
    build_model,
    kl_divergence,
    multinomial_nll,
    vae_loss,
)

N_ITEMS = 12


def _tiny(kind: ModelKind = ModelKind.MULTVAE, dropout: float = 0.5) -> ModelConfig:
    return ModelConfig(kind=kind, n_items=N_ITEMS, dims=(8, 3), dropout=dropout)


def _batch(n: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, N_ITEMS, generator=g) < 0.4).float()  # (n, I)


def test_vae_shapes_and_layers() -> None:
    # Prepare
    model = build_model(_tiny())
    # Execute
    out = model(_batch())
    # Assert: I-8-(2*3) encoder, 3-8-I decoder, all parameters in nn.Linear submodules
    assert isinstance(model, MultVAE)
    assert out.logits.shape == (5, N_ITEMS)
    assert out.mu.shape == (5, 3)
    assert out.logvar is not None and out.logvar.shape == (5, 3)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(8, N_ITEMS), (8,), (6, 8), (6,), (8, 3), (8,), (N_ITEMS, 8), (N_ITEMS,)]
    assert all(isinstance(m, nn.Linear) for m in [*model.encoder, *model.decoder])
    assert not list(model.named_parameters(recurse=False))


def test_dae_shapes_and_no_logvar() -> None:
    model = build_model(_tiny(ModelKind.MULTDAE))
    out = model(_batch())
    assert isinstance(model, MultDAE)
    assert out.logits.shape == (5, N_ITEMS)
    assert out.mu.shape == (5, 3)
    assert out.logvar is None


def test_eval_mode_is_deterministic_and_uses_mu() -> None:
    model = MultVAE(_tiny()).eval()
    x = _batch()
    a, b = model(x), model(x)
    assert torch.equal(a.logits, b.logits)
    # z = mu in eval mode: decoding mu by hand gives the same logits
    z = torch.tanh(model.decoder[0](a.mu))
    assert torch.allclose(model.decoder[1](z), a.logits)


def test_train_mode_is_stochastic() -> None:
    model = build_model(_tiny()).train()
    x = _batch()
    assert not torch.equal(model(x).logits, model(x).logits)


def test_input_is_l2_normalised() -> None:
    # Scaling a row does not change the output: the encoder sees x / ||x||.
    model = build_model(_tiny(dropout=0.0)).eval()
    x = _batch()
    assert torch.allclose(model(x).logits, model(3.0 * x).logits, atol=1e-6)


def test_empty_row_is_finite() -> None:
    model = build_model(_tiny()).eval()
    out = model(torch.zeros(2, N_ITEMS))
    assert torch.isfinite(out.logits).all()


def test_init_biases_small_and_generator_reproducible() -> None:
    a = build_model(_tiny(), generator=torch.Generator().manual_seed(1))
    b = build_model(_tiny(), generator=torch.Generator().manual_seed(1))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    for name, p in a.named_parameters():
        if name.endswith("bias"):
            assert p.abs().max() <= 0.002  # truncated N(0, 0.001) at 2 std


def test_multinomial_nll_hand_computed() -> None:
    # logits (0, 0, ln 2): softmax = (1/4, 1/4, 1/2); x = (1, 0, 1)
    # nll = -(ln 1/4 + ln 1/2) = ln 8
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)]])
    x = torch.tensor([[1.0, 0.0, 1.0]])
    assert multinomial_nll(logits, x).item() == pytest.approx(math.log(8.0))


def test_kl_hand_computed() -> None:
    # mu = (1, 0), logvar = (0, ln 2): -0.5 * [(1 + 0 - 1 - 1) + (1 + ln 2 - 0 - 2)]
    # = -0.5 * (-1 + ln 2 - 1) = 1 - ln(2) / 2
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    assert kl_divergence(mu, logvar).item() == pytest.approx(1.0 - math.log(2.0) / 2)
    assert kl_divergence(torch.zeros(1, 2), torch.zeros(1, 2)).item() == 0.0


def test_vae_loss_combines_terms_and_averages() -> None:
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)], [0.0, 0.0, 0.0]])
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.zeros(2, 2)
    # nll = (ln 8, ln 3); kl = (0.5, 0); loss = mean(ln 8 + 0.2 * 0.5, ln 3)
    expected = (math.log(8.0) + 0.1 + math.log(3.0)) / 2
    got = vae_loss(VAEOutput(logits, mu, logvar), x, beta=0.2)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # DAE output: KL ignored
    dae = vae_loss(VAEOutput(logits, mu, None), x, beta=0.2)
    assert dae.item() == pytest.approx((math.log(8.0) + math.log(3.0)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="beta"):
        vae_loss(VAEOutput(logits, mu, logvar), x, beta=float("nan"))


def test_anneal_beta() -> None:
    assert anneal_beta(0, cap=0.2, total_steps=1000) == 0.0
    assert anneal_beta(100, cap=0.2, total_steps=1000) == pytest.approx(0.1)
    assert anneal_beta(200, cap=0.2, total_steps=1000) == pytest.approx(0.2)
    assert anneal_beta(10**6, cap=0.2, total_steps=1000) == 0.2
    schedule = beta_schedule(ModelConfig(n_items=3, beta_cap=0.5, anneal_steps=10))
    assert schedule(3) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="total_steps"):
        anneal_beta(1, cap=0.2, total_steps=0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"dims": ()}, "dims"),
        ({"dims": (600, 0)}, "dims"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": float("nan")}, "dropout"),
        ({"n_items": -1}, "n_items"),
        ({"beta_cap": float("inf")}, "beta_cap"),
        ({"anneal_steps": 0}, "anneal_steps"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], name: str) -> None:
    base: dict[str, object] = {"n_items": 10}
    with pytest.raises(ValueError, match=name):
        ModelConfig(**{**base, **kwargs})  # type: ignore[arg-type]


def test_build_needs_n_items() -> None:
    with pytest.raises(ValueError, match="n_items"):
        build_model(ModelConfig())


def test_config_round_trip() -> None:
    config = ModelConfig(kind=ModelKind.MULTDAE, n_items=7, dims=(5, 2), dropout=0.1)
    d = config.to_dict()
    assert d["kind"] == "multdae" and d["dims"] == [5, 2]
    assert ModelConfig.from_dict(d) == config
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**d, "bogus": 1})


def _per_sample_grads_from_loop(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Reference per-sample gradients, one backward per row, same noise as the batched forward."""
    torch.manual_seed(seed)
    rows = []
    out = model(x)
    losses = [vae_loss(VAEOutput(*(None if t is None else t[i : i + 1] for t in out)),
                       x[i : i + 1], beta=0.3)
              for i in range(x.shape[0])]  # fmt: skip
    for loss in losses:
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)  # (B, n_params)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_per_sample_grads(mode: str) -> None:
    # Prepare: a tiny VAE; per-sample grads by hand from the same dropout / randn draws
    torch.manual_seed(0)
    model = build_model(_tiny()).train()
    x = _batch(n=4)
    expected = _per_sample_grads_from_loop(model, x, seed=7)
    gsm = GradSampleModule(
        model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch"
    )
    # Execute
    torch.manual_seed(7)
    loss = vae_loss(gsm(x), x, beta=0.3)
    loss.backward()
    # Assert: every parameter has a (B, ...) grad_sample equal to the per-row gradient
    grad_samples = [getattr(p, "grad_sample", None) for p in model.parameters()]
    assert all(g is not None and g.shape[0] == 4 for g in grad_samples)
    got = torch.cat(
        [g.reshape(4, -1) for g in grad_samples if g is not None], dim=1
    )  # (B, n_params)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_ghost_clipping_norms() -> None:
    # Ghost clipping computes per-sample gradient norms without materialising the gradients.
    torch.manual_seed(0)
    model = build_model(_tiny()).train()
    x = _batch(n=4)
    expected = _per_sample_grads_from_loop(model, x, seed=7).norm(dim=1)  # (B,)
    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", max_grad_norm=1.0, use_ghost_clipping=True
    )
    torch.manual_seed(7)
    loss = vae_loss(gsm(x), x, beta=0.3)
    loss.backward()
    norms = gsm.get_norm_sample()
    assert norms.shape == (4,)
    assert torch.allclose(norms, expected, atol=1e-5)

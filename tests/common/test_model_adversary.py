"""The Adv-MultVAE adversary head: gradient reversal, its loss, training, config, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from opacus import GradSampleModule

from common.errors import ConfigError
from common.model import (
    ModelConfig,
    ModelKind,
    VAEOutput,
    adversary_loss,
    build_model,
    reverse_gradient,
    vae_loss,
)
from common.run.config import (
    ADVERSARY_CLASSES,
    check_fairness,
    load_run_config,
    run_model_config,
)
from common.training import latent_codes, score_users, train_epochs

N_ITEMS = 12


def _config(**kw: object) -> ModelConfig:
    base: dict[str, object] = {
        "n_items": N_ITEMS,
        "dims": (8, 3),
        "adversary_classes": 2,
        "adversary_hidden": 4,
        "adversary_scale": 2.5,
    }
    return ModelConfig(**{**base, **kw})  # type: ignore[arg-type]


def _batch(n: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, N_ITEMS, generator=g) < 0.4).float()  # (n, I)


def test_reverse_gradient_is_identity_forward_and_minus_scale_backward() -> None:
    z = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)

    out = reverse_gradient(z, 2.5)
    (out * upstream).sum().backward()

    assert torch.equal(out, z)  # bitwise: z - z is exactly 0
    assert z.grad is not None
    assert torch.allclose(z.grad, -2.5 * upstream)


def test_head_gets_plain_and_encoder_reversed_gradients() -> None:
    """d CE / d head as without the reversal; d CE / d encoder is -lambda times that one."""
    # Prepare: eval mode (no dropout, z = mu), labels with one unknown
    model = build_model(_config(), generator=torch.Generator().manual_seed(0)).eval()
    x = _batch()
    labels = torch.tensor([0, 1, -1, 1, 0])
    head = [model.adversary[0], model.adversary[1]]  # type: ignore[index]
    enc = list(model.encoder.parameters())
    adv = list(model.adversary.parameters())  # type: ignore[union-attr]

    def plain_ce() -> torch.Tensor:  # the same head without a reversal, by hand
        mu = model(x).mu
        logits = head[1](torch.tanh(head[0](mu)))
        return adversary_loss(VAEOutput(logits, mu, None, logits), labels).mean()

    expected_enc = torch.autograd.grad(plain_ce(), enc)
    expected_adv = torch.autograd.grad(plain_ce(), adv)
    # Execute
    got = adversary_loss(model(x), labels).mean()
    got_enc = torch.autograd.grad(got, enc, retain_graph=True)
    got_adv = torch.autograd.grad(got, adv)
    # Assert
    assert any(float(g.abs().max()) > 1e-6 for g in expected_enc)  # not vacuous
    for g, e in zip(got_enc, expected_enc, strict=True):
        assert torch.allclose(g, -2.5 * e, atol=1e-6)
    for g, e in zip(got_adv, expected_adv, strict=True):
        assert torch.allclose(g, e, atol=1e-7)


def test_decoder_gets_no_gradient_from_the_adversary() -> None:
    model = build_model(_config()).eval()
    loss = adversary_loss(model(_batch()), torch.tensor([0, 1, 1, 0, 1])).mean()

    grads = torch.autograd.grad(loss, list(model.decoder.parameters()), allow_unused=True)

    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)


def test_adversary_loss_masks_unknown_labels() -> None:
    # Prepare: logits with a hand-computable cross-entropy
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, -5.0]])
    out = VAEOutput(torch.zeros(3, N_ITEMS), torch.zeros(3, 3), None, logits)
    # Execute
    ce = adversary_loss(out, torch.tensor([1, 0, -1]))
    # Assert: log 2; log(1 + e^-2); 0 for the unknown label
    expected = torch.tensor([np.log(2.0), np.log1p(np.exp(-2.0)), 0.0], dtype=torch.float32)
    assert torch.allclose(ce, expected, atol=1e-6)


def test_vae_loss_adds_the_mean_of_per_user_adversary_terms() -> None:
    model = build_model(_config()).eval()
    x = _batch()
    labels = torch.tensor([0, 1, -1, 1, 0])
    out = model(x)

    with_adv = vae_loss(out, x, beta=0.2, labels=labels)
    without = vae_loss(out, x, beta=0.2)

    assert float((with_adv - without).detach()) == pytest.approx(
        float(adversary_loss(out, labels).sum() / 5), rel=1e-5
    )


def test_adversary_loss_needs_a_head() -> None:
    out = build_model(_config(adversary_classes=0))(_batch())
    assert out.adversary_logits is None
    with pytest.raises(ValueError, match="no adversary head"):
        adversary_loss(out, torch.zeros(5, dtype=torch.int64))


@pytest.mark.parametrize("kind", list(ModelKind))
def test_head_shapes_and_scoring_ignores_it(kind: ModelKind) -> None:
    # Prepare: the same encoder / decoder weights with and without a head
    gen = torch.Generator().manual_seed(3)
    plain = build_model(_config(kind=kind, adversary_classes=0), generator=gen)
    gen = torch.Generator().manual_seed(3)
    with_head = build_model(_config(kind=kind, adversary_classes=7), generator=gen)
    rows = sp.csr_matrix(_batch().numpy())
    # Execute
    out = with_head.eval()(_batch())
    # Assert: the head comes last, so the other weights draw the same initial values
    assert out.adversary_logits is not None and out.adversary_logits.shape == (5, 7)
    for k, v in plain.state_dict().items():
        assert torch.equal(with_head.state_dict()[k], v), k
    assert not list(with_head.named_parameters(recurse=False))
    np.testing.assert_array_equal(score_users(plain, rows), score_users(with_head, rows))
    np.testing.assert_array_equal(latent_codes(plain, rows), latent_codes(with_head, rows))
    assert latent_codes(with_head, rows).shape == (5, 3)


def test_old_model_config_dicts_load_without_a_head() -> None:
    old = {
        "kind": "multvae",
        "n_items": N_ITEMS,
        "dims": [8, 3],
        "dropout": 0.5,
        "beta_cap": 0.2,
        "anneal_steps": 100,
    }
    config = ModelConfig.from_dict(old)
    assert config.adversary_classes == 0
    assert not any(k.startswith("adversary") for k in build_model(config).state_dict())
    new = _config()
    assert ModelConfig.from_dict(new.to_dict()) == new


@pytest.mark.parametrize(
    ("key", "value"),
    [("adversary_classes", 1), ("adversary_classes", -1), ("adversary_scale", 0.0)],
)
def test_model_config_refuses_bad_adversary_values(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=key):
        _config(**{key: value})


def test_train_epochs_with_labels_trains_the_head_and_is_reproducible() -> None:
    # Prepare: users whose label is which half of the catalogue they like
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    half = np.arange(N_ITEMS) < N_ITEMS // 2
    p = np.where((labels[:, None] == 1) == half[None, :], 0.6, 0.05)
    data = sp.csr_matrix((rng.random((40, N_ITEMS)) < p).astype(np.float32))
    labels[::7] = -1  # some unknown

    def run() -> dict[str, torch.Tensor]:
        model = build_model(_config(), generator=torch.Generator().manual_seed(0))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        train_epochs(
            model,
            data,
            epochs=3,
            batch_size=8,
            optimizer=optimizer,
            beta_schedule=None,
            generator=torch.Generator().manual_seed(1),
            labels=labels,
        )
        return {k: v.clone() for k, v in model.state_dict().items()}

    init = build_model(_config(), generator=torch.Generator().manual_seed(0)).state_dict()
    # Execute
    first, second = run(), run()
    # Assert
    assert not torch.equal(first["adversary.1.weight"], init["adversary.1.weight"])
    for k in first:
        assert torch.equal(first[k], second[k]), k


def test_train_epochs_refuses_labels_of_the_wrong_length() -> None:
    model = build_model(_config())
    with pytest.raises(ValueError, match="labels must have shape"):
        train_epochs(
            model,
            sp.csr_matrix(_batch().numpy()),
            epochs=1,
            batch_size=2,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            beta_schedule=None,
            labels=np.zeros(3, dtype=np.int64),
        )


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_per_sample_grads_with_the_head(mode: str) -> None:
    """The reversal is plain tensor ops: Opacus' per-sample gradients (vmap) see through it."""
    # Prepare: per-row gradients by hand from the same dropout / randn draws
    torch.manual_seed(0)
    model = build_model(_config()).train()
    x = _batch(n=4)
    labels = torch.tensor([1, -1, 0, 1])
    torch.manual_seed(7)
    out = model(x)
    rows = []
    for i in range(4):
        row = VAEOutput(*(None if t is None else t[i : i + 1] for t in out))
        loss = vae_loss(row, x[i : i + 1], beta=0.3, labels=labels[i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    expected = torch.stack(rows)  # (B, n_params)
    gsm = GradSampleModule(
        model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch"
    )
    # Execute
    torch.manual_seed(7)
    vae_loss(gsm(x), x, beta=0.3, labels=labels).backward()
    # Assert
    samples = [getattr(p, "grad_sample", None) for p in model.parameters()]
    assert all(g is not None and g.shape[0] == 4 for g in samples)
    got = torch.cat([g.reshape(4, -1) for g in samples if g is not None], dim=1)
    assert torch.allclose(got, expected, atol=1e-5)


# ----------------------------------------------------------------------------- [fairness]


def test_fairness_section_builds_the_head_from_public_vocabularies() -> None:
    cfg = load_run_config(None, ["fairness.adversary=age", "fairness.adversary_weight=3"])

    model_cfg = run_model_config(cfg, N_ITEMS)

    assert model_cfg.adversary_classes == len(ADVERSARY_CLASSES["age"]) == 7
    assert model_cfg.adversary_scale == 3.0
    assert run_model_config(load_run_config(None, []), N_ITEMS).adversary_classes == 0


@pytest.mark.parametrize(
    "sets",
    [
        ["fairness.adversary=zip"],
        ["fairness.adversary=gender", "fairness.adversary_weight=0"],
        ["fairness.adversary=gender", "fairness.adversary_hidden=-1"],
    ],
)
def test_fairness_section_refuses_bad_values(sets: list[str]) -> None:
    key = sets[-1].split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_run_config(None, sets)
    assert err.value.key == key


def test_adversary_with_dpsgd_silos_is_refused() -> None:
    sets = ["fairness.adversary=gender", "privacy.mode=example", "privacy.noise_multiplier=1"]
    with pytest.raises(ConfigError, match=r"privacy\.mode = .example."):
        load_run_config(None, sets)


def test_an_attribute_the_data_lacks_is_refused() -> None:
    cfg = load_run_config(None, ["fairness.adversary=occupation"])

    check_fairness(cfg, ["gender", "age", "occupation"])  # present: accepted
    check_fairness(load_run_config(None, []), [])  # no adversary: nothing needed
    with pytest.raises(ConfigError, match="no user attribute 'occupation'") as err:
        check_fairness(cfg, ["gender"])
    assert err.value.key == "fairness.adversary"


# ----------------------------------------------------- several heads, balance, confusion


def test_several_heads_have_their_own_weights_and_average_their_cross_entropies() -> None:
    model = build_model(_config(adversary_heads=3), generator=torch.Generator().manual_seed(0))
    model.eval()
    labels = torch.tensor([0, 1, -1, 1, 0])

    out = model(_batch())

    assert out.adversary_logits is not None and out.adversary_logits.shape == (5, 3, 2)
    assert "adversary.2.1.weight" in model.state_dict()
    assert not torch.equal(out.adversary_logits[:, 0], out.adversary_logits[:, 1])
    per_head = [
        adversary_loss(VAEOutput(out.logits, out.mu, None, out.adversary_logits[:, k]), labels)
        for k in range(3)
    ]
    assert torch.allclose(adversary_loss(out, labels), torch.stack(per_head).mean(0), atol=1e-6)


def test_one_head_keeps_the_old_state_dict_names_and_initial_weights() -> None:
    old = build_model(_config(), generator=torch.Generator().manual_seed(4)).state_dict()
    new = build_model(
        _config(adversary_heads=1), generator=torch.Generator().manual_seed(4)
    ).state_dict()

    assert list(old) == list(new)
    assert all(torch.equal(old[k], new[k]) for k in old)


def test_class_weights_scale_each_users_cross_entropy_by_its_class() -> None:
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, -5.0]])
    out = VAEOutput(logits, torch.zeros(3, 1), None, logits)
    labels = torch.tensor([1, 0, -1])

    plain = adversary_loss(out, labels)
    weighted = adversary_loss(out, labels, (2.0, 0.5))

    assert torch.allclose(weighted, plain * torch.tensor([0.5, 2.0, 0.0]))


def test_confusion_gives_the_head_its_plain_gradient_and_the_encoder_the_uniform_target() -> None:
    """Objective confuse: the head descends CE(y) on a detached mu, the encoder descends
    lambda times the frozen head's CE to the uniform distribution."""
    cfg = _config(adversary_objective="confuse")
    model = build_model(cfg, generator=torch.Generator().manual_seed(0)).eval()
    x = _batch()
    labels = torch.tensor([0, 1, -1, 1, 0])
    head = [model.adversary[0], model.adversary[1]]  # type: ignore[index]
    enc = list(model.encoder.parameters())
    adv = list(model.adversary.parameters())  # type: ignore[union-attr]
    known = (labels >= 0).float()

    mu = model(x).mu
    logits = head[1](torch.tanh(head[0](mu)))  # (B, 2)
    ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    uniform = -F.log_softmax(logits, dim=1).mean(dim=1)  # (B,)
    expected_adv = torch.autograd.grad((ce * known).mean(), adv, retain_graph=True)
    expected_enc = torch.autograd.grad((2.5 * uniform * known).mean(), enc)

    got = adversary_loss(model(x), labels).mean()
    got_enc = torch.autograd.grad(got, enc, retain_graph=True)
    got_adv = torch.autograd.grad(got, adv)

    for g, e in zip(got_adv, expected_adv, strict=True):
        assert torch.allclose(g, e, atol=1e-6)
    for g, e in zip(got_enc, expected_enc, strict=True):
        assert torch.allclose(g, e, atol=1e-6)
    assert any(float(g.abs().max()) > 1e-6 for g in got_enc)


def test_new_adversary_keys_round_trip_and_old_dicts_load() -> None:
    cfg = _config(
        adversary_heads=2, adversary_class_weights=(1.5, 0.5), adversary_objective="confuse"
    )
    old = _config().to_dict()
    for key in ("adversary_heads", "adversary_class_weights", "adversary_objective"):
        del old[key]

    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(old) == _config()


@pytest.mark.parametrize(
    "kw",
    [
        {"adversary_heads": 0},
        {"adversary_class_weights": (1.0,)},
        {"adversary_class_weights": (1.0, 0.0)},
        {"adversary_objective": "ignore"},
    ],
)
def test_model_config_refuses_bad_new_adversary_values(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _config(**kw)


def test_fairness_balance_uses_the_public_prior() -> None:
    sets = ["fairness.adversary=gender", "fairness.adversary_balance=true"]

    default = run_model_config(load_run_config(None, sets), N_ITEMS)
    given = run_model_config(
        load_run_config(None, [*sets, "fairness.adversary_prior=[0.5, 0.5]"]), N_ITEMS
    )
    plain = run_model_config(load_run_config(None, sets[:1]), N_ITEMS)

    assert default.adversary_class_weights == pytest.approx((1 / 0.56, 1 / 1.44))
    assert given.adversary_class_weights == (1.0, 1.0)
    assert plain.adversary_class_weights == ()
    assert plain.adversary_objective.value == "reverse" and plain.adversary_heads == 1


@pytest.mark.parametrize(
    "sets",
    [
        ["fairness.adversary=gender", "fairness.adversary_heads=0"],
        ["fairness.adversary=gender", "fairness.adversary_objective=flip"],
        ["fairness.adversary=gender", "fairness.adversary_prior=[0.5, 0.6]"],
        ["fairness.adversary=age", "fairness.adversary_balance=true"],
    ],
)
def test_fairness_section_refuses_bad_new_values(sets: list[str]) -> None:
    with pytest.raises(ConfigError):
        load_run_config(None, sets)

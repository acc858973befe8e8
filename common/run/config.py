"""The federated run's configuration: one frozen dataclass tree, read by server and clients.

(Over 400 lines: one frozen dataclass per config section, each with its checks.)

An operator writes it as TOML (``simulations/configs/*.toml``) and overrides keys with
``--set dotted.key=value``. :func:`load_run_config` parses it once, at the edge; the resolved
config is written to ``RUN_DIR/config.toml`` and both the ServerApp and the ClientApps read that
file, so every party sees the same values.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common.config import load_config, load_toml
from common.errors import ConfigError
from common.model import AdversaryObjective, ModelConfig, ModelKind

__all__ = [
    "ADVERSARY_CLASSES",
    "COHORT_QUANTILE",
    "ClientConfig",
    "DataConfig",
    "EncryptionConfig",
    "FairnessConfig",
    "ModelSection",
    "Partition",
    "PrivacyConfig",
    "PrivacyMode",
    "RunConfig",
    "Sampling",
    "ServerConfig",
    "ServerOptimizer",
    "SimulationSection",
    "WarmStartConfig",
    "check_fairness",
    "check_run_data",
    "expected_cohort_floor",
    "load_run_config",
    "run_model_config",
]


class Partition(enum.StrEnum):
    """How training users are assigned to clients."""

    PER_USER = "per-user"
    """One client per user: the cross-device default."""
    SILOS = "silos"
    """K silos of users, at random or grouped by a user attribute."""
    DIRICHLET = "dirichlet"
    """K non-IID silos: each user's dominant genre is spread over silos by Dirichlet(alpha)."""


class Sampling(enum.StrEnum):
    """How the server picks a round's cohort."""

    POISSON = "poisson"
    """Each client independently with probability q (needed for amplification by sampling)."""
    FIXED = "fixed"
    """A fixed number of clients, uniformly without replacement."""


class ServerOptimizer(enum.StrEnum):
    """How the server applies the averaged client update."""

    FEDAVG = "fedavg"
    """w <- w + lr * mean(delta) (McMahan et al. 2017 with a server learning rate)."""
    FEDADAM = "fedadam"
    """Adam on the pseudo-gradient -mean(delta) (Reddi et al. 2021, Alg. 2)."""


class PrivacyMode(enum.StrEnum):
    """Which differential privacy a run gives."""

    OFF = "off"
    """No DP: updates carry no noise (warned about once)."""
    CLIENT = "client"
    """User-level DP-FedAvg: each client clips its update and adds its share of Gaussian noise."""
    EXAMPLE = "example"
    """DP-SGD (Opacus) inside each silo: user-level DP from each silo's update."""


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is split and how users are spread over clients."""

    dataset: str = "ml-100k"
    """``ml-100k``, ``ml-1m``, ``pinterest-20`` (fetched) or a path to a data file or folder."""
    min_rating: float = 4.0
    """Ratings at or above this are positives."""
    n_heldout_users: int | None = None
    """Validation and test users each (default: 100 on small sets, else 10%)."""
    partition: Partition = Partition.PER_USER
    """How training users become clients."""
    n_silos: int = 10
    """Number of silos for ``silos`` and ``dirichlet``."""
    silo_attribute: str = ""
    """User attribute that defines silos (e.g. ``occupation``); empty for random silos."""
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet partition; smaller is more skewed."""
    client_holdout_fraction: float = 0.2
    """Share of a client's own items it holds out to evaluate the global model locally (0: no
    local evaluation; every item is trained on and enters the warm-start statistics)."""
    strict: bool = False
    """Refuse the data file at its first bad row (with its file and line) instead of dropping
    bad rows and counting them in ``RUN_DIR/data/cleaning.json``."""

    def __post_init__(self) -> None:
        if not self.dataset.strip():
            raise ValueError("dataset must name ml-100k or a data file or folder, got ''")
        if not math.isfinite(self.min_rating):
            raise ValueError(f"min_rating must be a finite number, got {self.min_rating}")
        if self.n_heldout_users is not None:
            _at_least("n_heldout_users", self.n_heldout_users, 1)
        _at_least("n_silos", self.n_silos, 1)
        _positive("dirichlet_alpha", self.dirichlet_alpha)
        if not 0 <= self.client_holdout_fraction < 1:
            raise ValueError("client_holdout_fraction must be in [0, 1)")


@dataclass(frozen=True)
class ModelSection:
    """The Mult-VAE the federation trains."""

    kind: str = "multvae"
    """``multvae`` or ``multdae``."""
    dims: tuple[int, ...] = (600, 200)
    """Encoder hidden and latent sizes; the decoder mirrors them."""
    dropout: float = 0.5
    """Dropout on the normalized input."""
    beta_cap: float = 0.2
    """KL weight cap."""
    anneal_steps: int = 2000
    """Rounds over which beta grows to ``beta_cap`` (one step per round on a client)."""

    def __post_init__(self) -> None:
        kinds = [k.value for k in ModelKind]
        if self.kind not in kinds:
            raise ValueError(f"kind must be one of {kinds}, got {self.kind!r}")
        if not self.dims or any(d < 1 for d in self.dims):
            raise ValueError(
                f"dims must be a non-empty list of positive layer sizes, got {list(self.dims)}"
            )
        if not (math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.beta_cap) and self.beta_cap >= 0):
            raise ValueError(f"beta_cap must be a finite number >= 0, got {self.beta_cap}")
        _at_least("anneal_steps", self.anneal_steps, 1)

    def to_model_config(self, n_items: int) -> ModelConfig:
        """The network of this section for a catalogue of ``n_items``."""
        return ModelConfig(
            kind=ModelKind(self.kind),
            n_items=n_items,
            dims=self.dims,
            dropout=self.dropout,
            beta_cap=self.beta_cap,
            anneal_steps=self.anneal_steps,
        )


@dataclass(frozen=True)
class ClientConfig:
    """Local training on each client."""

    local_epochs: int = 1
    """Epochs over the client's own users per round (E)."""
    batch_size: int = 64
    """Users per local mini-batch (a per-user client has one)."""
    lr: float = 1e-3
    """Local learning rate."""
    optimizer: str = "sgd"
    """``sgd`` or ``adam`` (fresh every round: clients keep no optimizer state)."""
    max_grad_norm: float | None = None
    """Plain local training: scale each step's mini-batch gradient down to at most this L2
    norm (None: no clipping). A guard against divergence, not privacy: it keeps plain SGD stable
    at a learning rate tuned for DP-SGD, whose per-user clipping (``privacy.clip``) bounds the
    step already; DP-SGD ignores it."""

    def __post_init__(self) -> None:
        _at_least("local_epochs", self.local_epochs, 1)
        _at_least("batch_size", self.batch_size, 1)
        _positive("lr", self.lr)
        if self.max_grad_norm is not None:
            _positive("max_grad_norm", self.max_grad_norm)
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")


@dataclass(frozen=True)
class ServerConfig:
    """Sampling, timeouts and the server optimizer."""

    optimizer: ServerOptimizer = ServerOptimizer.FEDADAM
    """How the averaged update is applied."""
    lr: float = 1e-3
    """Server learning rate (eta)."""
    lr_final_fraction: float = 1.0
    """Cosine decay of the server learning rate to this fraction of ``lr`` by the last round
    (1.0 keeps it constant)."""
    beta1: float = 0.9
    """FedAdam first-moment decay."""
    beta2: float = 0.999
    """FedAdam second-moment decay."""
    tau: float = 1e-8
    """FedAdam adaptivity (epsilon)."""
    sampling: Sampling = Sampling.POISSON
    """Cohort selection."""
    sample_rate: float = 0.1
    """q: each client's chance to be invited to a round (``poisson``)."""
    clients_per_round: int = 100
    """Cohort size (``fixed``)."""
    min_clients: int = 1
    """A round with fewer returned updates is skipped (nothing applied)."""
    round_timeout: float = 600.0
    """Seconds to wait for replies; late clients are dropped from the round."""
    registration_timeout: float = 300.0
    """Seconds to wait for every client node to register before round 1."""

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        if not 0 < self.lr_final_fraction <= 1:
            raise ValueError(f"lr_final_fraction must be in (0, 1], got {self.lr_final_fraction}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        _at_least("clients_per_round", self.clients_per_round, 1)
        _at_least("min_clients", self.min_clients, 1)
        _positive("round_timeout", self.round_timeout)
        _positive("registration_timeout", self.registration_timeout)
        _positive("tau", self.tau)
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy of the run (docs/design.md, "One training round")."""

    mode: PrivacyMode = PrivacyMode.OFF
    """``off``, ``client`` (DP-FedAvg) or ``example`` (DP-SGD in each silo)."""
    clip: float = 1.0
    """C: L2 bound of a client's update (client mode) or of a user's gradient (example mode)."""
    noise_multiplier: float | None = None
    """z: noise std / C. Give this or ``target_epsilon``."""
    target_epsilon: float | None = None
    """Epsilon to reach after all rounds; fedrec picks the smallest z that stays below it."""
    delta: float | None = None
    """Delta of the guarantee; default 1 / N^1.1 for a population of N."""
    accountant: str = "prv"
    """Reported accountant (``prv`` or ``rdp``); the other is kept beside it as a check."""
    client_budget: float | None = None
    """Each client refuses to train once its own epsilon would exceed this."""
    participation_quantile: float = 0.025
    """Client mode with ``target_epsilon``: calibrate z for a round whose participant count is
    this lower quantile of Binomial(N, q), not its mean qN. With Poisson sampling fewer than qN
    clients often take part, and such a round's noise (relative to C) is z * sqrt(k / qN), so
    planning for the mean overshoots the target; 0.5 plans for the median."""
    noise_seed: int | None = None
    """Simulations only, NOT PRIVATE: client mode draws each client's noise from
    ``default_rng([noise_seed, round, client id])`` instead of OS entropy, so a DP simulation
    repeats exactly; whoever knows the seed can subtract the noise. Devices and ``fedrec deploy``
    refuse it; the ledger header records it."""

    def __post_init__(self) -> None:
        if self.noise_seed is not None and self.noise_seed < 0:
            raise ValueError(f"privacy.noise_seed must be >= 0, got {self.noise_seed}")
        if self.mode is PrivacyMode.OFF:
            return
        if self.noise_seed is not None and self.mode is not PrivacyMode.CLIENT:
            raise ValueError(
                "privacy.noise_seed seeds the client-level DP mod only (privacy.mode = 'client'); "
                "DP-SGD in silos draws its noise from OS entropy"
            )
        _positive("privacy.clip", self.clip)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "give exactly one of noise_multiplier and target_epsilon "
                f"(mode = {self.mode.value!r})"
            )
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None:
            _positive("privacy.target_epsilon", self.target_epsilon)
        if self.delta is not None and not (math.isfinite(self.delta) and 0 < self.delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.client_budget is not None:
            _positive("privacy.client_budget", self.client_budget)
        if not (math.isfinite(self.participation_quantile) and 0 < self.participation_quantile < 1):
            raise ValueError(
                "privacy.participation_quantile must be in (0, 1), "
                f"got {self.participation_quantile}"
            )
        if self.accountant not in ("prv", "rdp"):
            raise ValueError(f"accountant must be 'prv' or 'rdp', got {self.accountant!r}")


@dataclass(frozen=True)
class EncryptionConfig:
    """Encrypted aggregation (docs/design.md, "Encryption"): CKKS through TenSEAL."""

    enabled: bool = False
    """Clients send CKKS ciphertexts; the server adds them and key holders decrypt the sum."""
    mode: str = "threshold"
    """``"threshold"``: a key ceremony among ``key_holders`` devices makes a collective key that
    no party holds, and ``threshold`` of them decrypt each checked sum together
    (:mod:`common.he.threshold`). ``"single-key"``: every device holds one secret key that the
    operator makes (``fedrec keys init``), kept for comparison: whoever holds it reads every
    update."""
    keys: str | None = None
    """Key folder; default ``RUN_DIR/keys``. Threshold mode: the public folder the run's ceremony
    writes (or a previous ceremony's, on resume). Single-key mode: ``fedrec keys init``'s folder,
    made when missing (a simulation plays the operator)."""
    committee_size: int = 2
    """Single-key mode: clients of the round that each decrypt the sum; their outputs must agree
    (>= 2)."""
    key_holders: int = 5
    """Threshold mode: devices that take part in the ceremony and hold a share (>= 2)."""
    threshold: int | None = None
    """Threshold mode: partial decryptions a sum needs; default a majority,
    ``key_holders // 2 + 1``. Must be more than half of ``key_holders``: two committees then
    share a holder, and a holder decrypts each round once, so no two sums of one round can be
    decrypted and subtracted."""
    min_contributors: int = 10
    """Threshold mode: the fewest distinct registered senders a holder decrypts a sum of."""
    max_decryptions: int = 4096
    """Threshold mode: ciphertexts a share decrypts over its life; the flood is sized for it
    (each doubling adds a bit) and a holder stops when it is spent."""

    def keys_dir(self, run_dir: Path) -> Path:
        """The key folder: :attr:`keys`, else ``run_dir/keys``."""
        return Path(self.keys) if self.keys is not None else Path(run_dir) / "keys"

    @property
    def threshold_mode(self) -> bool:
        """Encrypted, with a threshold key."""
        return self.enabled and self.mode == "threshold"

    @property
    def decryption_threshold(self) -> int:
        """:attr:`threshold`, or its default majority."""
        return self.threshold if self.threshold is not None else self.key_holders // 2 + 1

    def __post_init__(self) -> None:
        if self.mode not in ("threshold", "single-key"):
            raise ValueError(
                f"encryption.mode must be 'threshold' or 'single-key', got {self.mode!r}"
            )
        if self.committee_size < 2:
            raise ValueError(f"encryption.committee_size must be >= 2, got {self.committee_size}")
        if self.key_holders < 2:
            raise ValueError(f"encryption.key_holders must be >= 2, got {self.key_holders}")
        t = self.decryption_threshold
        if not self.key_holders / 2 < t <= self.key_holders:
            raise ValueError(
                f"encryption.threshold must be more than half of key_holders "
                f"({self.key_holders}) and at most key_holders, got {t}"
            )
        if self.min_contributors < 2:
            raise ValueError(
                f"encryption.min_contributors must be >= 2, got {self.min_contributors}"
            )
        if self.max_decryptions < 1:
            raise ValueError(f"encryption.max_decryptions must be >= 1, got {self.max_decryptions}")


@dataclass(frozen=True)
class WarmStartConfig:
    """The DP warm start (:mod:`common.warmstart`): two releases before the training rounds.

    Every client sends its item popularity, then its item co-occurrence over the DP top items,
    clipped, noised and (with encryption) encrypted like an update; the server builds the
    Mult-VAE's first and last layers from the two noisy sums, then fine-tunes it with the rounds.
    """

    enabled: bool = False
    """Run the two releases before round 1."""
    share: float = 0.9
    """With ``privacy.target_epsilon``: the epsilon (at the run's delta) of the two releases
    alone, as a fraction of the target; the rounds' z is then calibrated so that releases and
    rounds together reach the target. Split between the two releases by ``popularity_share``.
    1 gives the releases the whole target and needs ``rounds = 0`` (no fine-tuning)."""
    popularity_share: float = 0.2
    """The popularity release's part p of the warm start's noise budget, in Gaussian units: the
    releases have z_pop = z / sqrt(p) and z_cooc = z / sqrt(1 - p), together one Gaussian
    release at z (composition at sample rate 1 adds 1 / z^2)."""
    vocabulary_threshold: float = 4.0
    """The co-occurrence release covers the items whose DP popularity is at least this many
    times the release's noise std."""
    min_vocabulary: int = 50
    """At least this many items in the co-occurrence release."""
    max_vocabulary: int = 1000
    """At most this many items: a client sends K (K + 1) / 2 values."""
    min_participation: float = 0.99
    """Each release is calibrated for this fraction f of the N clients answering (its noise is
    z * sqrt(k / N) for k answers), and the server releases it only if at least f N answered:
    the epsilon never exceeds the target, and ends within 1 - sqrt(f) of it when all answer."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.share) and 0 < self.share <= 1):
            raise ValueError(f"warm_start.share must be in (0, 1], got {self.share}")
        _positive("warm_start.vocabulary_threshold", self.vocabulary_threshold)
        if not (math.isfinite(self.popularity_share) and 0 < self.popularity_share < 1):
            raise ValueError(
                f"warm_start.popularity_share must be in (0, 1), got {self.popularity_share}"
            )
        _at_least("warm_start.min_vocabulary", self.min_vocabulary, 1)
        _at_least("warm_start.max_vocabulary", self.max_vocabulary, self.min_vocabulary)
        if not (math.isfinite(self.min_participation) and 0 < self.min_participation <= 1):
            raise ValueError(
                f"warm_start.min_participation must be in (0, 1], got {self.min_participation}"
            )


_ML100K_OCCUPATIONS = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive",
    "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer",
    "retired", "salesman", "scientist", "student", "technician", "writer",
)  # fmt: skip
"""ML-100K's ``u.occupation``: the 21 occupations of its README."""

ADVERSARY_CLASSES: dict[str, tuple[str, ...]] = {
    "gender": ("F", "M"),
    "age": ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"),
    "occupation": (*_ML100K_OCCUPATIONS, *(str(code) for code in range(21))),
}
"""The classes the adversary head predicts, per protected attribute: public configuration, never
read from the data (a vocabulary learnt from the clients' values would leak them).

``gender``: MovieLens' ``F`` and ``M``. ``age``: the seven ML-1M age groups (its README), to which
ML-100K's ages in years are bucketed by the same bounds
(:func:`common.fairness.groups.age_bucket`).
``occupation``: ML-100K's 21 occupation names followed by ML-1M's 21 occupation codes ``"0"`` to
``"20"`` (both documented in the data sets' READMEs): one vocabulary for both, whose unused half
the head learns to score low. A value outside the vocabulary counts as unknown."""


ADVERSARY_PRIORS: dict[str, tuple[float, ...]] = {"gender": (0.28, 0.72)}
"""Public class shares per protected attribute, for ``fairness.adversary_balance`` when
``fairness.adversary_prior`` is not given: published figures, never read from the clients.
``gender``: MovieLens' documented user tables, 273 of ML-100K's 943 users and 1,709 of ML-1M's
6,040 are ``F`` (29% and 28%)."""


def _group_weight_table(raw: object) -> tuple[tuple[str, float], ...]:
    """``fairness.reweight`` as sorted ``((class, weight), ...)`` from a TOML table, a list of
    ``[class, weight]`` pairs (the form :func:`common.config.to_dict` writes back) or ``()``.

    Raises
    ------
    ValueError
        For another shape, a repeated class, or a weight that is not a finite number > 0.
    """
    if isinstance(raw, Mapping):
        pairs = list(raw.items())
    elif isinstance(raw, list | tuple) and all(
        isinstance(p, list | tuple) and len(p) == 2 for p in raw
    ):
        pairs = [(p[0], p[1]) for p in raw]
    else:
        raise ValueError(
            f"fairness.reweight must be a table of class = weight (e.g. {{F = 2.0, M = 1.0}}), "
            f"got {raw!r}"
        )
    table: dict[str, float] = {}
    for group, weight in pairs:
        if not isinstance(group, str) or group in table:
            raise ValueError(f"fairness.reweight has {group!r}: not a new class name")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(
                f"fairness.reweight weight of {group!r} must be a number, got {weight!r}"
            )
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(
                f"fairness.reweight weight of {group!r} must be finite and > 0, got {weight!r}"
            )
        table[group] = float(weight)
    return tuple(sorted(table.items()))


@dataclass(frozen=True)
class FairnessConfig:
    """On-device adversarial debiasing (Adv-MultVAE, Ganhor et al. SIGIR 2022).

    With ``adversary`` set, the model carries an adversary head that predicts that attribute
    from the latent code through a gradient reversal; each client trains it on its own users'
    attribute, which never leaves the device: only the weights do, averaged (and clipped, noised,
    encrypted) like the rest.
    """

    adversary: str = ""
    """Protected attribute the encoder is trained to hide: ``gender``, ``age`` or
    ``occupation`` (classes in :data:`ADVERSARY_CLASSES`); ``""`` (default): no adversary."""
    adversary_weight: float = 1.0
    """lambda of the gradient reversal (> 0): the encoder descends the recommendation loss minus
    lambda times the adversary's cross-entropy; the head descends the cross-entropy itself."""
    adversary_hidden: int = 64
    """Hidden width of the adversary MLP on the latent code (0: a linear head)."""
    adversary_speed: float = 1.0
    """How many times faster the adversary head learns than the rest under FedAdam (> 0; see
    ``common.model.ModelConfig.adversary_speed``): a slow head is fooled by a flip of the
    attribute's direction in the code, which a fresh attacker still reads."""
    adversary_heads: int = 1
    """Independent adversary heads (>= 1) whose cross-entropies are averaged: the encoder must
    fool every one (``common.model.ModelConfig.adversary_heads``)."""
    adversary_objective: str = "reverse"
    """What the encoder does against the heads: ``reverse`` (default, the gradient reversal of
    Adv-MultVAE) or ``confuse`` (push the heads' prediction to uniform; see
    ``common.model.AdversaryObjective``)."""
    adversary_balance: bool = False
    """Weight each user's head cross-entropy by ``1 / (K p_c)`` for its class ``c``, with public
    class shares ``p`` (``adversary_prior``, else :data:`ADVERSARY_PRIORS`): the rare class counts
    as much as the common one, and an uninformative code makes a head predict uniform."""
    adversary_prior: tuple[float, ...] = ()
    """Public class shares for ``adversary_balance`` (one positive number per class, summing to
    1); ``()`` (default): :data:`ADVERSARY_PRIORS` for the attribute."""
    reweight: Any = ()
    """Group re-weighting of the local loss: a public table ``{F = 2.0, M = 1.0}`` of a weight
    (finite, > 0) per class of ``reweight_attribute`` (names from :data:`ADVERSARY_CLASSES`;
    ML-100K ages by their ML-1M bucket). Each client multiplies each of its users' loss term by
    the weight of that user's class (1 for a class not in the table, or an unknown value) before
    the batch mean; the attribute stays on the device. Given as a TOML table (or a list of
    ``[class, weight]`` pairs); held as ``((class, weight), ...)`` sorted by class. ``()``
    (default): off, every user weighs 1."""
    reweight_attribute: str = "gender"
    """The protected attribute whose classes ``reweight`` weighs (a key of
    :data:`ADVERSARY_CLASSES`); independent of ``adversary``, so either mitigation runs alone."""

    def __post_init__(self) -> None:
        if self.adversary and self.adversary not in ADVERSARY_CLASSES:
            raise ValueError(
                f"fairness.adversary must be '' or one of {sorted(ADVERSARY_CLASSES)}, "
                f"got {self.adversary!r}"
            )
        _positive("fairness.adversary_weight", self.adversary_weight)
        _at_least("fairness.adversary_hidden", self.adversary_hidden, 0)
        _positive("fairness.adversary_speed", self.adversary_speed)
        _at_least("fairness.adversary_heads", self.adversary_heads, 1)
        objectives = [o.value for o in AdversaryObjective]
        if self.adversary_objective not in objectives:
            raise ValueError(
                f"fairness.adversary_objective must be one of {objectives}, "
                f"got {self.adversary_objective!r}"
            )
        object.__setattr__(self, "adversary_prior", tuple(float(p) for p in self.adversary_prior))
        prior = self.adversary_prior
        if prior and (
            not all(math.isfinite(p) and p > 0 for p in prior) or abs(sum(prior) - 1.0) > 1e-6
        ):
            raise ValueError(
                f"fairness.adversary_prior must be positive shares summing to 1, got {list(prior)}"
            )
        object.__setattr__(self, "reweight", _group_weight_table(self.reweight))
        if self.reweight_attribute not in ADVERSARY_CLASSES:
            raise ValueError(
                f"fairness.reweight_attribute must be one of {sorted(ADVERSARY_CLASSES)}, "
                f"got {self.reweight_attribute!r}"
            )
        vocabulary = ADVERSARY_CLASSES[self.reweight_attribute]
        unknown = [g for g, _ in self.reweight if g not in vocabulary]
        if unknown:
            raise ValueError(
                f"fairness.reweight names classes {unknown} that {self.reweight_attribute!r} does "
                f"not have (its classes: {list(vocabulary)})"
            )
        if self.adversary and self.adversary_balance:
            shares = prior or ADVERSARY_PRIORS.get(self.adversary, ())
            if len(shares) != len(self.classes):
                raise ValueError(
                    f"fairness.adversary_balance needs fairness.adversary_prior: "
                    f"{len(self.classes)} class shares for {self.adversary!r}"
                )

    @property
    def class_weights(self) -> tuple[float, ...]:
        """The heads' per-class weights ``1 / (K p_c)`` with ``adversary_balance``, else ``()``."""
        if not (self.adversary and self.adversary_balance):
            return ()
        shares = self.adversary_prior or ADVERSARY_PRIORS[self.adversary]
        return tuple(1.0 / (len(shares) * p) for p in shares)

    @property
    def group_weights(self) -> dict[str, float]:
        """``reweight`` as ``{class: weight}``; empty when re-weighting is off."""
        return dict(self.reweight)

    @property
    def classes(self) -> tuple[str, ...]:
        """The adversary's classes; empty without an adversary."""
        return ADVERSARY_CLASSES.get(self.adversary, ())

    def model_config(self, base: ModelConfig) -> ModelConfig:
        """``base`` with this section's adversary head (unchanged without an adversary)."""
        if not self.adversary:
            return base
        return replace(
            base,
            adversary_classes=len(self.classes),
            adversary_hidden=self.adversary_hidden,
            adversary_scale=self.adversary_weight,
            adversary_speed=self.adversary_speed,
            adversary_heads=self.adversary_heads,
            adversary_class_weights=self.class_weights,
            adversary_objective=AdversaryObjective(self.adversary_objective),
        )


@dataclass(frozen=True)
class SimulationSection:
    """Flower simulation engine resources."""

    num_cpus_per_client: float = 1.0
    """CPU share of one ClientApp actor (Ray backend)."""
    max_clients: int | None = None
    """Cap the population (take the first N clients); for quick runs."""
    fail_clients: tuple[int, ...] = ()
    """Fault injection: these client ids raise an error whenever asked to train."""
    lying_clients: tuple[int, ...] = ()
    """Fault injection: these client ids return a wrong decryption when on the committee."""
    ray_address: str | None = None
    """Run on this existing Ray cluster (``HOST:PORT`` of its head); None starts a local Ray.

    ``fedrec simulate --ray-address`` overrides it. Every node must see the run folder."""

    def __post_init__(self) -> None:
        if self.ray_address is not None and not self.ray_address.strip():
            raise ValueError("simulation.ray_address must be HOST:PORT of a Ray head, got ''")
        _positive("num_cpus_per_client", self.num_cpus_per_client)
        if self.max_clients is not None:
            _at_least("max_clients", self.max_clients, 1)
        for name in ("fail_clients", "lying_clients"):
            bad = [c for c in getattr(self, name) if c < 0]
            if bad:
                raise ValueError(f"{name} must hold client ids >= 0, got {bad}")


@dataclass(frozen=True)
class RunConfig:
    """A whole federated run (``fedrec simulate``)."""

    name: str = "fedrec"
    """Label shown in reports."""
    seed: int = 0
    """Seed of the split, the initialization, the sampling and the clients."""
    rounds: int = 50
    """Federated rounds (after the warm start's releases, if any); 0 only with a warm start."""
    eval_every: int = 5
    """Evaluate the global model on the held-out test users every K rounds (and at the end)."""
    reference: bool = True
    """Also train the centralized model of the same architecture on the same split, to compare."""
    reference_epochs: int = 200
    """Epoch cap of that centralized reference (it stops early on validation NDCG@100)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    fairness: FairnessConfig = field(default_factory=FairnessConfig)
    simulation: SimulationSection = field(default_factory=SimulationSection)

    def __post_init__(self) -> None:
        if self.rounds < 0 or (self.rounds == 0 and not self.warm_start.enabled):
            raise ValueError(f"rounds must be >= 1 (0 only with warm_start), got {self.rounds}")
        dp_on = self.privacy.mode is not PrivacyMode.OFF
        if self.warm_start.enabled and dp_on and (self.warm_start.share == 1) != (self.rounds == 0):
            raise ValueError(
                "warm_start.share = 1 gives the releases the whole budget and needs rounds = 0; "
                f"rounds = 0 needs warm_start.share = 1 (got share {self.warm_start.share}, "
                f"rounds {self.rounds})"
            )
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        _at_least("reference_epochs", self.reference_epochs, 1)
        server = self.server
        if server.sampling is Sampling.FIXED and server.min_clients > server.clients_per_round:
            raise ValueError(
                f"server.min_clients = {server.min_clients} can never be met: a round invites "
                f"server.clients_per_round = {server.clients_per_round} clients"
            )
        if (
            self.encryption.enabled
            and self.encryption.mode == "single-key"
            and server.sampling is Sampling.FIXED
            and self.encryption.committee_size > server.clients_per_round
        ):
            raise ValueError(
                f"encryption.committee_size = {self.encryption.committee_size} can never be met: "
                f"a round invites server.clients_per_round = {server.clients_per_round} clients"
            )
        if self.privacy.mode is PrivacyMode.CLIENT and self.server.sampling is not Sampling.POISSON:
            raise ValueError(
                "privacy.mode = 'client' needs server.sampling = 'poisson': the accounting relies "
                "on amplification by Poisson sampling"
            )
        if self.warm_start.enabled and self.privacy.mode is PrivacyMode.EXAMPLE:
            raise ValueError(
                "warm_start.enabled needs privacy.mode = 'client' or 'off': its releases are "
                "client-level sums"
            )
        if (
            self.warm_start.enabled
            and self.privacy.mode is PrivacyMode.CLIENT
            and self.privacy.target_epsilon is None
        ):
            raise ValueError(
                "warm_start.enabled with privacy.mode = 'client' needs privacy.target_epsilon: "
                "warm_start.share splits it between the releases and the rounds"
            )
        if self.fairness.adversary and self.privacy.mode is PrivacyMode.EXAMPLE:
            raise ValueError(
                "fairness.adversary is not supported with privacy.mode = 'example': the DP-SGD "
                "silos (client.dpsgd) train without the adversary's labels; use privacy.mode = "
                "'client' or 'off'"
            )
        if self.fairness.reweight and self.privacy.mode is PrivacyMode.EXAMPLE:
            raise ValueError(
                "fairness.reweight is not supported with privacy.mode = 'example': the DP-SGD "
                "silos (client.dpsgd) take no per-user weights; use privacy.mode = 'client' or "
                "'off'"
            )
        if self.privacy.mode is PrivacyMode.EXAMPLE and self.client.optimizer != "sgd":
            raise ValueError(
                "privacy.mode = 'example' runs DP-SGD (Opacus, plain SGD steps): set "
                f"client.optimizer = 'sgd', got {self.client.optimizer!r}"
            )


def load_run_config(path: Path | None, sets: list[str] | None = None) -> RunConfig:
    """Parse a TOML run config (or the defaults) with ``--set`` overrides applied.

    Every value is checked here, before anything runs or is written; what can only be checked
    against the data is checked by :func:`check_run_data` once the data is read.

    Raises
    ------
    ConfigError
        One line naming the file (and line) or the ``--set`` item at fault, e.g.
        ``config.toml:3: unknown config key 'rouds' (did you mean 'rounds'?)``; also
        ``config.toml: empty config file`` for a file that sets nothing.
    """
    if path is not None and not load_toml(path):
        raise ConfigError(f"{path}: empty config file")
    return load_config(RunConfig, path, sets or [])


def run_model_config(cfg: RunConfig, n_items: int) -> ModelConfig:
    """The network every party of ``cfg`` builds for a catalogue of ``n_items``: the model
    section's, with the fairness section's adversary head when one is configured."""
    return cfg.fairness.model_config(cfg.model.to_model_config(n_items))


def check_fairness(cfg: RunConfig, attributes: Collection[str]) -> None:
    """Refuse an adversary, or a re-weighting, by a user attribute the data set does not have.

    Parameters
    ----------
    cfg:
        The run.
    attributes:
        The user attributes of the data set (e.g. ``Dataset.user_features``' keys; empty when
        it has no user file).

    Raises
    ------
    ConfigError
        Naming ``fairness.adversary`` (or ``fairness.reweight_attribute``) and the attributes
        the data has.
    """
    have = ", ".join(sorted(attributes)) or "none"
    checks = [("fairness.adversary", cfg.fairness.adversary)]
    if cfg.fairness.reweight:
        checks.append(("fairness.reweight_attribute", cfg.fairness.reweight_attribute))
    for key, wanted in checks:
        if wanted and wanted not in attributes:
            raise ConfigError(
                f"{key} = {wanted!r}: {cfg.data.dataset} has no user attribute {wanted!r} "
                f"(its user attributes: {have})",
                key=key,
            )


COHORT_QUANTILE = 0.025
"""The low quantile of a round's participant count that a run must be able to work with: a
requirement that only a cohort above it can meet (a decryption committee) is refused."""


def expected_cohort_floor(server: ServerConfig, n_clients: int) -> int:
    """Participants of a round at its :data:`COHORT_QUANTILE` quantile, for ``n_clients``.

    ``poisson``: that quantile of Binomial(N, q); ``fixed``: ``min(clients_per_round, N)``.
    """
    if server.sampling is Sampling.FIXED:
        return min(server.clients_per_round, n_clients)
    from scipy.stats import binom  # lazily: loading a config stays cheap

    return int(binom.ppf(COHORT_QUANTILE, n_clients, server.sample_rate))


def check_run_data(cfg: RunConfig, *, n_users: int, n_clients: int | None = None) -> None:
    """Check the values of ``cfg`` that depend on the data, before anything is written.

    Parameters
    ----------
    cfg:
        The run.
    n_users:
        Users of the cleaned data set (before the split).
    n_clients:
        Clients of the partition; ``None`` checks the split alone (call again with it).

    Raises
    ------
    ConfigError
        Naming the key (``data.n_heldout_users``, ``server.min_clients``,
        ``encryption.committee_size``) and what the data allows.
    """
    from common.data.split import SMALL_DATASET_USERS

    held = cfg.data.n_heldout_users
    most = max((n_users - 1) // 2, 0)
    if held is not None and 2 * held >= n_users:
        raise ConfigError(
            f"data.n_heldout_users = {held} leaves no training users: {cfg.data.dataset} has "
            f"{n_users} users, and validation and test take {held} each (give at most {most})",
            key="data.n_heldout_users",
        )
    if held is None and n_users <= SMALL_DATASET_USERS and n_users <= 2 * 100:
        raise ConfigError(
            "data.n_heldout_users is not set and its default (100 validation and 100 test users "
            f"on a data set of up to {SMALL_DATASET_USERS} users) leaves no training users of "
            f"the {n_users} in {cfg.data.dataset}: set data.n_heldout_users (at most {most})",
            key="data.n_heldout_users",
        )
    if held is None:  # the split's default (common.data.split)
        held = 100 if n_users <= SMALL_DATASET_USERS else round(0.1 * n_users)
    n_train = n_users - 2 * held
    data = cfg.data
    if (
        data.partition is not Partition.PER_USER
        and not (data.partition is Partition.SILOS and data.silo_attribute)
        and data.n_silos > n_train
    ):
        raise ConfigError(
            f"data.n_silos = {data.n_silos} exceeds the {n_train} training users: a silo would "
            "be empty",
            key="data.n_silos",
        )
    if n_clients is None:
        return
    server = cfg.server
    if server.min_clients > n_clients:
        raise ConfigError(
            f"server.min_clients = {server.min_clients} exceeds the {n_clients} clients of the "
            "partition: no round could be applied",
            key="server.min_clients",
        )
    if cfg.encryption.threshold_mode:
        holders = cfg.encryption.key_holders
        if holders > n_clients:
            raise ConfigError(
                f"encryption.key_holders = {holders} exceeds the {n_clients} clients of the "
                "partition",
                key="encryption.key_holders",
            )
        floor = n_clients if cfg.rounds == 0 else expected_cohort_floor(server, n_clients)
        least = cfg.encryption.min_contributors
        if least > floor:
            raise ConfigError(
                f"encryption.min_contributors = {least} exceeds the participants of a round "
                f"({floor} or fewer in {COHORT_QUANTILE:.1%} of rounds, {n_clients} clients): "
                "the key holders would refuse to decrypt. Lower encryption.min_contributors "
                "or raise server.sample_rate",
                key="encryption.min_contributors",
            )
    elif cfg.encryption.enabled:
        floor = expected_cohort_floor(server, n_clients)
        size = cfg.encryption.committee_size
        if size > floor:
            how = (
                f"a round's participants are Binomial({n_clients}, {server.sample_rate:g}) "
                f"(server.sample_rate), {floor} or fewer in {COHORT_QUANTILE:.1%} of rounds"
                if server.sampling is Sampling.POISSON
                else f"a round has {floor} participants ({n_clients} clients)"
            )
            raise ConfigError(
                f"encryption.committee_size = {size} exceeds the participants of a round: {how}; "
                "a round without a full committee is discarded (its privacy still spent). Lower "
                "encryption.committee_size or raise server.sample_rate",
                key="encryption.committee_size",
            )

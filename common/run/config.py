"""The federated run's configuration: one frozen dataclass tree, read by server and clients.

An operator writes it as TOML (``simulations/configs/*.toml``) and overrides keys with
``--set dotted.key=value``. :func:`load_run_config` parses it once, at the edge; the resolved
config is written to ``RUN_DIR/config.toml`` and both the ServerApp and the ClientApps read that
file, so every party sees the same values.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from pathlib import Path

from common.config import load_config
from common.model import ModelConfig, ModelKind

__all__ = [
    "ClientConfig",
    "DataConfig",
    "EncryptionConfig",
    "ModelSection",
    "Partition",
    "PrivacyConfig",
    "PrivacyMode",
    "RunConfig",
    "Sampling",
    "ServerConfig",
    "ServerOptimizer",
    "SimulationSection",
    "load_run_config",
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
    """Share of a client's own items it holds out to evaluate the global model locally."""

    def __post_init__(self) -> None:
        if self.n_silos < 1:
            raise ValueError(f"n_silos must be >= 1, got {self.n_silos}")
        _positive("dirichlet_alpha", self.dirichlet_alpha)
        if not 0 < self.client_holdout_fraction < 1:
            raise ValueError("client_holdout_fraction must be in (0, 1)")


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

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        _positive("lr", self.lr)
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
        if self.clients_per_round < 1:
            raise ValueError("clients_per_round must be >= 1")
        if self.min_clients < 1:
            raise ValueError("min_clients must be >= 1")
        _positive("round_timeout", self.round_timeout)
        _positive("registration_timeout", self.registration_timeout)
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1)")


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
    """Clients send CKKS ciphertexts; the server adds them and a committee decrypts the sum."""
    keys: str | None = None
    """Key folder of ``fedrec keys init``; default ``RUN_DIR/keys``, made when missing (a
    simulation plays the operator). Clients load ``client.ctx``, the server only ``server.ctx``."""
    committee_size: int = 2
    """Clients of the round that each decrypt the sum; their outputs must agree (>= 2)."""

    def keys_dir(self, run_dir: Path) -> Path:
        """The key folder: :attr:`keys`, else ``run_dir/keys``."""
        return Path(self.keys) if self.keys is not None else Path(run_dir) / "keys"

    def __post_init__(self) -> None:
        if self.committee_size < 2:
            raise ValueError(f"encryption.committee_size must be >= 2, got {self.committee_size}")


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


@dataclass(frozen=True)
class RunConfig:
    """A whole federated run (``fedrec simulate``)."""

    name: str = "fedrec"
    """Label shown in reports."""
    seed: int = 0
    """Seed of the split, the initialization, the sampling and the clients."""
    rounds: int = 50
    """Federated rounds."""
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
    simulation: SimulationSection = field(default_factory=SimulationSection)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.privacy.mode is PrivacyMode.CLIENT and self.server.sampling is not Sampling.POISSON:
            raise ValueError(
                "privacy.mode = 'client' needs server.sampling = 'poisson': the accounting relies "
                "on amplification by Poisson sampling"
            )
        if self.privacy.mode is PrivacyMode.EXAMPLE and self.client.optimizer != "sgd":
            raise ValueError(
                "privacy.mode = 'example' runs DP-SGD (Opacus, plain SGD steps): set "
                f"client.optimizer = 'sgd', got {self.client.optimizer!r}"
            )


def load_run_config(path: Path | None, sets: list[str] | None = None) -> RunConfig:
    """Parse a TOML run config (or the defaults) with ``--set`` overrides applied.

    Raises
    ------
    ConfigError
        One line naming the file (and line) or the ``--set`` item at fault, e.g.
        ``config.toml:3: unknown config key 'rouds' (did you mean 'rounds'?)``.
    """
    return load_config(RunConfig, path, sets or [])

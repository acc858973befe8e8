"""What the server announces with a round (:mod:`common.protocol`): the round's settings
(:class:`RoundConfig`) and the DP mechanism (:class:`ClientDPConfig`, :class:`ExampleDPConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord

from common.protocol.keys import (
    BETA,
    CONFIG_RECORD,
    DP_ACCOUNTING_NOISE_MULTIPLIER,
    DP_CLIP,
    DP_DELTA,
    DP_DENOMINATOR,
    DP_NOISE_MULTIPLIER,
    DP_NOISE_STD,
    DP_SAMPLE_RATE,
    DPSGD_CLIP,
    DPSGD_DELTA,
    DPSGD_MAX_SAMPLE_RATE,
    DPSGD_MAX_STEPS,
    DPSGD_NOISE_MULTIPLIER,
    RELEASE,
    RELEASE_VOCABULARY,
    SERVER_ROUND,
)
from common.protocol.records import (
    ProtocolError,
    keys_absent,
    read_float,
    read_int,
    read_optional_float,
    read_str,
)

__all__ = [
    "ClientDPConfig",
    "ExampleDPConfig",
    "RoundConfig",
    "read_accounting_noise_multiplier",
]


# -------------------------------------------------------------------------- server -> client


@dataclass(frozen=True)
class RoundConfig:
    """What every train, evaluate and decrypt config carries.

    Attributes
    ----------
    server_round:
        The round number (``server-round``); in a warm-start release, the release's position
        (1, 2): the round its ledger line and the committee's co-signatures state.
    beta:
        The round's KL weight (``beta``); train messages only.
    release:
        A warm-start release's name (``release``, :data:`common.privacy.plan.RELEASE_NAMES`):
        the train message asks for that statistic (:func:`common.warmstart.statistic`) instead
        of a model update; ``None`` in a training round.
    vocabulary:
        The co-occurrence release's item columns (``release-vocabulary``), or ``None``.
    """

    server_round: int
    beta: float | None = None
    release: str | None = None
    vocabulary: tuple[int, ...] | None = None

    def write(self, config: ConfigRecord) -> None:
        """Add these settings to a message's ``config`` record (beta, release and vocabulary
        only when set)."""
        config[SERVER_ROUND] = self.server_round
        if self.beta is not None:
            config[BETA] = self.beta
        if self.release is not None:
            config[RELEASE] = self.release
        if self.vocabulary is not None:
            config[RELEASE_VOCABULARY] = [int(i) for i in self.vocabulary]

    def to_record(self) -> ConfigRecord:
        """A new ``config`` record holding only these settings."""
        config = ConfigRecord()
        self.write(config)
        return config

    @classmethod
    def read(cls, config: ConfigRecord) -> RoundConfig:
        """The round settings of a message's ``config`` record.

        Raises
        ------
        ProtocolError
            If ``server-round`` is missing or not an int, ``beta`` is there but not a number,
            ``release`` is there but not a str, or ``release-vocabulary`` is there but not a
            list of non-negative ints.
        """
        return cls(
            server_round=read_int(config, SERVER_ROUND, record_name=CONFIG_RECORD),
            beta=read_optional_float(config, BETA, record_name=CONFIG_RECORD),
            release=(
                read_str(config, RELEASE, record_name=CONFIG_RECORD) if RELEASE in config else None
            ),
            vocabulary=_read_vocabulary(config),
        )

    def require_beta(self) -> float:
        """The round's ``beta``, which a train message must carry.

        Raises
        ------
        ProtocolError
            If the message carried none.
        """
        if self.beta is None:
            raise ProtocolError("is missing", key=BETA, record=CONFIG_RECORD)
        return self.beta


def _read_vocabulary(config: ConfigRecord) -> tuple[int, ...] | None:
    """The ``release-vocabulary`` of ``config`` (``None`` when it has none)."""
    if RELEASE_VOCABULARY not in config:
        return None
    value = config[RELEASE_VOCABULARY]
    items: list[int] = []
    for i in value if isinstance(value, list) else [None]:
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ProtocolError(
                "must be a list of non-negative ints", key=RELEASE_VOCABULARY, record=CONFIG_RECORD
            )
        items.append(i)
    return tuple(items)


def read_accounting_noise_multiplier(config: ConfigRecord) -> float:
    """The per-round z a client-level DP client accounts with.

    ``dp-accounting-noise-multiplier``, or ``dp-noise-multiplier`` when an older server sent
    only that.

    Raises
    ------
    ProtocolError
        If neither is there, or the one read is not a number.
    """
    key = (
        DP_ACCOUNTING_NOISE_MULTIPLIER
        if DP_ACCOUNTING_NOISE_MULTIPLIER in config
        else DP_NOISE_MULTIPLIER
    )
    return read_float(config, key, record_name=CONFIG_RECORD)


_CLIENT_DP_KEYS = (
    DP_CLIP,
    DP_NOISE_MULTIPLIER,
    DP_ACCOUNTING_NOISE_MULTIPLIER,
    DP_NOISE_STD,
    DP_DENOMINATOR,
    DP_SAMPLE_RATE,
    DP_DELTA,
)


@dataclass(frozen=True)
class ClientDPConfig:
    """Client-level DP-FedAvg parameters the server announces in a train config (``dp-*``).

    Attributes
    ----------
    clip:
        Clipping norm C of an unweighted update (``dp-clip``).
    noise_multiplier:
        Configured noise multiplier z (``dp-noise-multiplier``).
    accounting_noise_multiplier:
        The per-round z the server's accountant charges (``dp-accounting-noise-multiplier``);
        a client's own accountant uses it.
    noise_std:
        This client's share of the noise std (``dp-noise-std``).
    denominator:
        The fixed denominator m = qN (``dp-denominator``).
    sample_rate:
        Poisson sampling rate q (``dp-sample-rate``).
    delta:
        Target delta (``dp-delta``).
    """

    clip: float
    noise_multiplier: float
    accounting_noise_multiplier: float
    noise_std: float
    denominator: float
    sample_rate: float
    delta: float

    def write(self, config: ConfigRecord) -> None:
        """Add the ``dp-*`` keys to a train message's ``config`` record."""
        config[DP_CLIP] = self.clip
        config[DP_NOISE_MULTIPLIER] = self.noise_multiplier
        config[DP_ACCOUNTING_NOISE_MULTIPLIER] = self.accounting_noise_multiplier
        config[DP_NOISE_STD] = self.noise_std
        config[DP_DENOMINATOR] = self.denominator
        config[DP_SAMPLE_RATE] = self.sample_rate
        config[DP_DELTA] = self.delta

    @classmethod
    def read(cls, config: ConfigRecord) -> ClientDPConfig | None:
        """The client-level DP parameters of a train config; ``None`` when it has no ``dp-*``.

        A missing ``dp-accounting-noise-multiplier`` (an older server) falls back to
        ``dp-noise-multiplier``.

        Raises
        ------
        ProtocolError
            If some ``dp-*`` keys are there but one is missing or not a number.
        """
        if keys_absent(config, _CLIENT_DP_KEYS):
            return None
        return cls(
            clip=read_float(config, DP_CLIP, record_name=CONFIG_RECORD),
            noise_multiplier=read_float(config, DP_NOISE_MULTIPLIER, record_name=CONFIG_RECORD),
            accounting_noise_multiplier=read_accounting_noise_multiplier(config),
            noise_std=read_float(config, DP_NOISE_STD, record_name=CONFIG_RECORD),
            denominator=read_float(config, DP_DENOMINATOR, record_name=CONFIG_RECORD),
            sample_rate=read_float(config, DP_SAMPLE_RATE, record_name=CONFIG_RECORD),
            delta=read_float(config, DP_DELTA, record_name=CONFIG_RECORD),
        )


_EXAMPLE_DP_KEYS = (
    DPSGD_CLIP,
    DPSGD_NOISE_MULTIPLIER,
    DPSGD_DELTA,
    DPSGD_MAX_STEPS,
    DPSGD_MAX_SAMPLE_RATE,
)


@dataclass(frozen=True)
class ExampleDPConfig:
    """Example-level DP-SGD parameters for silos, in a train config (``dpsgd-*``).

    Attributes
    ----------
    clip:
        Per-example clipping norm (``dpsgd-clip``).
    noise_multiplier:
        DP-SGD noise multiplier (``dpsgd-noise-multiplier``).
    delta:
        Target delta (``dpsgd-delta``).
    max_steps:
        The plan's bound on a silo's DP-SGD steps in a round (``dpsgd-max-steps``).
    max_sample_rate:
        The plan's bound on a silo's batch sampling rate (``dpsgd-max-sample-rate``).
    """

    clip: float
    noise_multiplier: float
    delta: float
    max_steps: int
    max_sample_rate: float

    def write(self, config: ConfigRecord) -> None:
        """Add the ``dpsgd-*`` keys to a train message's ``config`` record."""
        config[DPSGD_CLIP] = self.clip
        config[DPSGD_NOISE_MULTIPLIER] = self.noise_multiplier
        config[DPSGD_DELTA] = self.delta
        config[DPSGD_MAX_STEPS] = self.max_steps
        config[DPSGD_MAX_SAMPLE_RATE] = self.max_sample_rate

    @classmethod
    def read(cls, config: ConfigRecord) -> ExampleDPConfig | None:
        """The DP-SGD parameters of a train config; ``None`` when it has no ``dpsgd-*`` key.

        Raises
        ------
        ProtocolError
            If some ``dpsgd-*`` keys are there but one is missing or has the wrong type.
        """
        if keys_absent(config, _EXAMPLE_DP_KEYS):
            return None
        return cls(
            clip=read_float(config, DPSGD_CLIP, record_name=CONFIG_RECORD),
            noise_multiplier=read_float(config, DPSGD_NOISE_MULTIPLIER, record_name=CONFIG_RECORD),
            delta=read_float(config, DPSGD_DELTA, record_name=CONFIG_RECORD),
            max_steps=read_int(config, DPSGD_MAX_STEPS, record_name=CONFIG_RECORD),
            max_sample_rate=read_float(config, DPSGD_MAX_SAMPLE_RATE, record_name=CONFIG_RECORD),
        )

"""What a client replies (:mod:`common.protocol`): the metrics of an update
(:class:`TrainMetrics`), a refusal over its budget (:class:`Refusal`), a training run that
diverged (:class:`Divergence`) and its local evaluation (:class:`EvalMetrics`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.app.typing import MetricRecordValues

from common.protocol.keys import (
    CONFIG_RECORD,
    DIVERGED,
    DIVERGED_REASON,
    DPSGD_SAMPLE_RATE,
    DPSGD_STEPS,
    EPSILON_IF_TRAINED,
    EVAL_METRIC_PREFIXES,
    EVAL_USERS,
    LOSS,
    METRICS_RECORD,
    NUM_EXAMPLES,
    REFUSED,
    SECONDS_SUFFIX,
    WEIGHT,
)
from common.protocol.records import (
    ProtocolError,
    is_number,
    read_float,
    read_int,
    read_optional_float,
    read_optional_int,
    read_seconds,
    read_str,
)

__all__ = [
    "DIVERGENCE_REASON_CHARS",
    "Divergence",
    "EvalMetrics",
    "Refusal",
    "TrainMetrics",
    "is_divergence",
    "is_refusal",
]


# -------------------------------------------------------------------------- client -> server


@dataclass(frozen=True)
class TrainMetrics:
    """The ``metrics`` record of a train reply that carries an update.

    Attributes
    ----------
    weight:
        The weight the update is pre-multiplied by (``weight``).
    num_examples:
        Users trained on (``num-examples``).
    loss:
        Mean local training loss (``loss``).
    seconds:
        Every client-side duration, keyed by its ``*-seconds`` name (``train-seconds``,
        ``he-encrypt-seconds``...), in record order.
    dpsgd_steps:
        DP-SGD steps the silo took (``dpsgd-steps``), under example-level DP.
    dpsgd_sample_rate:
        The silo's batch sampling rate (``dpsgd-sample-rate``), under example-level DP.
    """

    weight: float
    num_examples: int
    loss: float
    seconds: dict[str, float] = field(default_factory=dict)
    dpsgd_steps: int | None = None
    dpsgd_sample_rate: float | None = None

    def __post_init__(self) -> None:
        bad = [key for key in self.seconds if not key.endswith(SECONDS_SUFFIX)]
        if bad:
            raise ValueError(f"seconds keys must end with {SECONDS_SUFFIX!r}, got {bad}")

    def to_record(self) -> MetricRecord:
        """The reply's ``metrics`` record: weight, num-examples, loss, seconds, DP-SGD counts."""
        values: dict[str, MetricRecordValues] = {
            WEIGHT: self.weight,
            NUM_EXAMPLES: self.num_examples,
            LOSS: self.loss,
            **self.seconds,
        }
        if self.dpsgd_steps is not None:
            values[DPSGD_STEPS] = self.dpsgd_steps
        if self.dpsgd_sample_rate is not None:
            values[DPSGD_SAMPLE_RATE] = self.dpsgd_sample_rate
        return MetricRecord(values)

    @classmethod
    def read(cls, record: MetricRecord) -> TrainMetrics:
        """The metrics of a train reply (check :func:`is_refusal` first: a refusal has none).

        Raises
        ------
        ProtocolError
            If ``weight``, ``num-examples`` or ``loss`` is missing, or a value has the wrong
            type.
        """
        name = METRICS_RECORD
        return cls(
            weight=read_float(record, WEIGHT, record_name=name),
            num_examples=read_int(record, NUM_EXAMPLES, record_name=name),
            loss=read_float(record, LOSS, record_name=name),
            seconds=read_seconds(record, record_name=name),
            dpsgd_steps=read_optional_int(record, DPSGD_STEPS, record_name=name),
            dpsgd_sample_rate=read_optional_float(record, DPSGD_SAMPLE_RATE, record_name=name),
        )


@dataclass(frozen=True)
class Refusal:
    """A client refusing a round over its privacy budget: counted by the server, not an error.

    Attributes
    ----------
    epsilon_if_trained:
        The epsilon the client would have reached by training (``epsilon-if-trained``).
    """

    epsilon_if_trained: float

    def to_record(self) -> MetricRecord:
        """The reply's ``metrics`` record: ``{"refused": 1, "weight": 0.0, ...}``."""
        return MetricRecord({REFUSED: 1, WEIGHT: 0.0, EPSILON_IF_TRAINED: self.epsilon_if_trained})

    @classmethod
    def read(cls, record: MetricRecord) -> Refusal:
        """The refusal in a reply's metrics.

        Raises
        ------
        ProtocolError
            If the record is not a refusal, or its ``epsilon-if-trained`` is missing or not a
            number.
        """
        if not is_refusal(record):
            raise ProtocolError("is not a refusal", key=REFUSED, record=METRICS_RECORD)
        return cls(read_float(record, EPSILON_IF_TRAINED, record_name=METRICS_RECORD))


def is_refusal(record: MetricRecord | None) -> bool:
    """True when a reply's ``metrics`` record refuses the round (``refused`` is a nonzero number).

    ``None`` (a reply without metrics) is not a refusal.
    """
    if record is None:
        return False
    value = record.get(REFUSED)
    return is_number(value) and value != 0


DIVERGENCE_REASON_CHARS = 200
"""A divergence reason is cut to this many characters (it is the client's free text)."""


@dataclass(frozen=True)
class Divergence:
    """A client whose local training went non-finite: it sends no update, only why.

    The server counts it as failed, with the reason (``diverged: loss is inf at update 2``).

    Attributes
    ----------
    reason:
        What went non-finite (``diverged-reason`` in the ``config`` record), at most
        :data:`DIVERGENCE_REASON_CHARS` characters.
    """

    reason: str

    def to_content(self) -> RecordDict:
        """The reply's content: ``metrics`` ``{"diverged": 1, "weight": 0.0}`` and ``config``
        ``{"diverged-reason": ...}``; no ``arrays``."""
        return RecordDict(
            {
                METRICS_RECORD: MetricRecord({DIVERGED: 1, WEIGHT: 0.0}),
                CONFIG_RECORD: ConfigRecord(
                    {DIVERGED_REASON: self.reason[:DIVERGENCE_REASON_CHARS]}
                ),
            }
        )

    @classmethod
    def read(cls, content: RecordDict) -> Divergence:
        """The divergence in a reply's content; a missing reason reads ``"no reason given"``.

        Raises
        ------
        ProtocolError
            If the reply is not a divergence, or its reason is not a string.
        """
        if not is_divergence(content.metric_records.get(METRICS_RECORD)):
            raise ProtocolError("is not a divergence", key=DIVERGED, record=METRICS_RECORD)
        config = content.config_records.get(CONFIG_RECORD)
        if config is None or DIVERGED_REASON not in config:
            return cls("no reason given")
        reason = read_str(config, DIVERGED_REASON, record_name=CONFIG_RECORD)
        return cls(reason[:DIVERGENCE_REASON_CHARS])


def is_divergence(record: MetricRecord | None) -> bool:
    """True when a train reply's ``metrics`` record says local training diverged (``diverged``
    is a nonzero number); ``None`` is not one."""
    if record is None:
        return False
    value = record.get(DIVERGED)
    return is_number(value) and value != 0


@dataclass(frozen=True)
class EvalMetrics:
    """The ``metrics`` record of an evaluate reply.

    Attributes
    ----------
    eval_users:
        Users the client scored (``eval-users``), the weight of its metrics; 0 when it has no
        held-out items.
    metrics:
        The ranking metrics, keyed ``ndcg@K`` / ``recall@K``, in record order.
    """

    eval_users: float
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [key for key in self.metrics if not key.startswith(EVAL_METRIC_PREFIXES)]
        if bad:
            raise ValueError(f"metric keys must start with {EVAL_METRIC_PREFIXES}, got {bad}")

    def to_record(self) -> MetricRecord:
        """The reply's ``metrics`` record: the ranking metrics, then ``eval-users``."""
        return MetricRecord({**self.metrics, EVAL_USERS: self.eval_users})

    @classmethod
    def read(cls, record: MetricRecord | Mapping[str, object]) -> EvalMetrics:
        """The metrics of an evaluate reply (keys other than ``eval-users``, ``ndcg@K`` and
        ``recall@K`` are ignored).

        Raises
        ------
        ProtocolError
            If ``eval-users`` is missing, or a value has the wrong type.
        """
        name = METRICS_RECORD
        return cls(
            eval_users=read_float(record, EVAL_USERS, record_name=name),
            metrics={
                key: read_float(record, key, record_name=name)
                for key in record
                if key.startswith(EVAL_METRIC_PREFIXES)
            },
        )

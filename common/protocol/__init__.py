"""The wire protocol between the ServerApp and the ClientApp: record names, keys, typed readers.

Every Flower message of a fedrec round is a :class:`flwr.app.RecordDict` whose records and keys
are named here, once, so that the server (:mod:`server.strategy`, :mod:`server.dp`,
:mod:`server.he`, :mod:`server.federation`) and the client (:mod:`client.app` and its mods)
cannot drift apart. The strings are part of the protocol and of the privacy ledgers (the
server's and a device's): they never change.

Messages
--------
train (server -> client)
    ``arrays`` (the global model), ``config``: :class:`RoundConfig` (``server-round``,
    ``beta``), the DP mechanism when there is one (:class:`ClientDPConfig`, ``dp-*``, or
    :class:`ExampleDPConfig`, ``dpsgd-*``), ``he-fingerprint`` in an encrypted run and the run
    info of a deployment (``fedrec-run-config``, ``fedrec-item-ids``; :mod:`common.run.info`).
    A warm-start release's train message (:mod:`common.warmstart`) carries the release's
    name (``release``), its vocabulary (``release-vocabulary``, co-occurrence only) and zeros
    of the statistic's size as ``arrays`` (``statistic``); its reply is that statistic in place
    of the update, through the same DP and HE mods.
train reply (client -> server)
    ``arrays`` (the pre-weighted update) or, encrypted, the ``he`` config record; ``metrics``:
    :class:`TrainMetrics`, or a :class:`Refusal` (no update) when one more round would exceed
    the client's privacy budget, or a :class:`Divergence` (no update; its reason in ``config``)
    when local training went non-finite.
evaluate (server -> client) and its reply
    ``arrays`` and ``config`` (:class:`RoundConfig`); ``metrics``: :class:`EvalMetrics`.
decrypt (server -> committee member) and its reply
    ``he-sum`` (the encrypted sum) and ``config`` (:class:`RoundConfig`); ``arrays``.

Readers check the runtime type of a value (a number is an ``int`` or a ``float``, never a
``bool``) and raise :class:`ProtocolError`, naming the key and the record, when a key is missing
or its value has the wrong type. Writers store values as given, so what goes over the wire is
exactly what the caller computed.

This module imports nothing heavy (no torch, Opacus or TenSEAL): both sides and the tools that
read ledgers can import it cheaply.
"""

from common.protocol.announce import (
    ClientDPConfig,
    ExampleDPConfig,
    RoundConfig,
    read_accounting_noise_multiplier,
)
from common.protocol.keys import (
    ARRAYS_RECORD,
    BETA,
    CONFIG_RECORD,
    DECRYPT_MESSAGE_TYPE,
    DESERIALIZE_SECONDS,
    DIVERGED,
    DIVERGED_REASON,
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
    DPSGD_SAMPLE_RATE,
    DPSGD_STEPS,
    EPSILON_IF_TRAINED,
    EVAL_METRIC_PREFIXES,
    EVAL_USERS,
    HE_AGGREGATE_SECONDS,
    HE_CEREMONY,
    HE_DECRYPT_SECONDS,
    HE_ENCRYPT_SECONDS,
    HE_FINGERPRINT,
    HE_PUBLIC_CONTEXT,
    HE_RECORD,
    HE_REGISTRY,
    HE_SLOT,
    HE_SUM_RECORD,
    HE_UPLOAD_RECORD,
    ITEM_IDS_KEY,
    KEYGEN_MESSAGE_TYPE,
    LOSS,
    METRICS_RECORD,
    NUM_EXAMPLES,
    REFUSED,
    RELEASE,
    RELEASE_STATISTIC,
    RELEASE_VOCABULARY,
    RUN_CONFIG_KEY,
    SECONDS_SUFFIX,
    SERIALIZE_SECONDS,
    SERVER_ROUND,
    TAG_MESSAGE_TYPE,
    THRESHOLD_MESSAGE_TYPE,
    THRESHOLD_RECORD,
    TRAIN_SECONDS,
    WEIGHT,
)
from common.protocol.records import (
    ProtocolError,
    read_float,
    read_int,
    read_optional_float,
    read_optional_int,
    read_seconds,
    read_str,
)
from common.protocol.replies import (
    Divergence,
    EvalMetrics,
    Refusal,
    TrainMetrics,
    is_divergence,
    is_refusal,
)

__all__ = [
    "ARRAYS_RECORD",
    "BETA",
    "CONFIG_RECORD",
    "DECRYPT_MESSAGE_TYPE",
    "DESERIALIZE_SECONDS",
    "DIVERGED",
    "DIVERGED_REASON",
    "DPSGD_CLIP",
    "DPSGD_DELTA",
    "DPSGD_MAX_SAMPLE_RATE",
    "DPSGD_MAX_STEPS",
    "DPSGD_NOISE_MULTIPLIER",
    "DPSGD_SAMPLE_RATE",
    "DPSGD_STEPS",
    "DP_ACCOUNTING_NOISE_MULTIPLIER",
    "DP_CLIP",
    "DP_DELTA",
    "DP_DENOMINATOR",
    "DP_NOISE_MULTIPLIER",
    "DP_NOISE_STD",
    "DP_SAMPLE_RATE",
    "EPSILON_IF_TRAINED",
    "EVAL_METRIC_PREFIXES",
    "EVAL_USERS",
    "HE_AGGREGATE_SECONDS",
    "HE_CEREMONY",
    "HE_DECRYPT_SECONDS",
    "HE_ENCRYPT_SECONDS",
    "HE_FINGERPRINT",
    "HE_PUBLIC_CONTEXT",
    "HE_RECORD",
    "HE_REGISTRY",
    "HE_SLOT",
    "HE_SUM_RECORD",
    "HE_UPLOAD_RECORD",
    "ITEM_IDS_KEY",
    "KEYGEN_MESSAGE_TYPE",
    "LOSS",
    "METRICS_RECORD",
    "NUM_EXAMPLES",
    "REFUSED",
    "RELEASE",
    "RELEASE_STATISTIC",
    "RELEASE_VOCABULARY",
    "RUN_CONFIG_KEY",
    "SECONDS_SUFFIX",
    "SERIALIZE_SECONDS",
    "SERVER_ROUND",
    "TAG_MESSAGE_TYPE",
    "THRESHOLD_MESSAGE_TYPE",
    "THRESHOLD_RECORD",
    "TRAIN_SECONDS",
    "WEIGHT",
    "ClientDPConfig",
    "Divergence",
    "EvalMetrics",
    "ExampleDPConfig",
    "ProtocolError",
    "Refusal",
    "RoundConfig",
    "TrainMetrics",
    "is_divergence",
    "is_refusal",
    "read_accounting_noise_multiplier",
    "read_float",
    "read_int",
    "read_optional_float",
    "read_optional_int",
    "read_seconds",
    "read_str",
]

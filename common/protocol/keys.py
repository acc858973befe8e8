"""Record names and keys of the messages between ServerApp and ClientApp (:mod:`common.protocol`).

The strings are part of the protocol and of the privacy ledgers: they never change.
"""

from __future__ import annotations

from typing import Final

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
]

# ------------------------------------------------------------------------------ record names

ARRAYS_RECORD: Final = "arrays"
"""Array record: the global model (to a client), an update or a decrypted sum (from one)."""
CONFIG_RECORD: Final = "config"
"""Config record of every server message: the round's settings (:class:`RoundConfig`, ...)."""
METRICS_RECORD: Final = "metrics"
"""Metric record of every train and evaluate reply (:class:`TrainMetrics`, :class:`EvalMetrics`,
:class:`Refusal`)."""
HE_RECORD: Final = "he"
"""Config record of an encrypted train reply: the CKKS ciphertext of the update."""
HE_SUM_RECORD: Final = "he-sum"
"""Config record of a committee request: the encrypted sum to decrypt."""
DECRYPT_MESSAGE_TYPE: Final = "query.decrypt"
"""Message type of a committee request (a Flower query with action ``decrypt``)."""
KEYGEN_MESSAGE_TYPE: Final = "query.keygen"
"""Message type of a key-ceremony step sent to a key holder (threshold mode)."""
THRESHOLD_MESSAGE_TYPE: Final = "query.threshold"
"""Message type of a threshold decryption step sent to a key holder (commit, decrypt)."""
TAG_MESSAGE_TYPE: Final = "query.tag"
"""Message type asking a sender to tag its own upload for the holders' check."""
THRESHOLD_RECORD: Final = "threshold"
"""Config record of the key-ceremony, threshold-decryption and tag messages and replies."""
HE_UPLOAD_RECORD: Final = "he-upload"
"""Config record of an encrypted train reply in threshold mode: the sender's signed digest."""

# ------------------------------------------------------------------------ config-record keys

SERVER_ROUND: Final = "server-round"
"""The round number (int, from 1), in every server message."""
BETA: Final = "beta"
"""The round's KL weight of the Mult-VAE loss (float), in train messages."""
RELEASE: Final = "release"
"""A warm-start release's name (str, :mod:`common.warmstart`), in its train messages: the client
replies with that statistic instead of a model update."""
RELEASE_VOCABULARY: Final = "release-vocabulary"
"""The co-occurrence release's vocabulary (list of item columns), in its train messages."""
RELEASE_STATISTIC: Final = "statistic"
"""The one array of a warm-start release: zeros of the statistic's size in the train message (its
layout), the client's statistic in the reply."""

DP_CLIP: Final = "dp-clip"
"""Client-level DP: the clipping norm C of an unweighted update."""
DP_NOISE_MULTIPLIER: Final = "dp-noise-multiplier"
"""Client-level DP: the configured noise multiplier z."""
DP_ACCOUNTING_NOISE_MULTIPLIER: Final = "dp-accounting-noise-multiplier"
"""Client-level DP: the per-round z the server's accountant charges (older servers omit it)."""
DP_NOISE_STD: Final = "dp-noise-std"
"""Client-level DP: this client's share of the noise std, ``z C / sqrt(m)``."""
DP_DENOMINATOR: Final = "dp-denominator"
"""Client-level DP: the fixed denominator m = qN every client divides by."""
DP_SAMPLE_RATE: Final = "dp-sample-rate"
"""Client-level DP: the Poisson sampling rate q of a client."""
DP_DELTA: Final = "dp-delta"
"""Client-level DP: the target delta."""

DPSGD_CLIP: Final = "dpsgd-clip"
"""Example-level DP: the per-example clipping norm of DP-SGD."""
DPSGD_NOISE_MULTIPLIER: Final = "dpsgd-noise-multiplier"
"""Example-level DP: the noise multiplier of DP-SGD."""
DPSGD_DELTA: Final = "dpsgd-delta"
"""Example-level DP: the target delta."""
DPSGD_MAX_STEPS: Final = "dpsgd-max-steps"
"""Example-level DP: the most DP-SGD steps a silo may take in a round (the plan's bound)."""
DPSGD_MAX_SAMPLE_RATE: Final = "dpsgd-max-sample-rate"
"""Example-level DP: the largest batch sampling rate of any silo (the plan's bound)."""

HE_FINGERPRINT: Final = "he-fingerprint"
"""Train-config key announcing the key pair the server expects updates encrypted under."""
HE_SLOT: Final = "he-slot"
"""Train-config key (threshold mode): the decryption slot the upload is for (run, round or
release); the sender signs it with the upload's digest."""
HE_PUBLIC_CONTEXT: Final = "he-public-context"
"""Train-config key (threshold mode, deployments): the collective public context's bytes."""
HE_CEREMONY: Final = "he-ceremony"
"""Train-config key (threshold mode, deployments): the ceremony's record (JSON), with every
holder's signature of the key, which the device checks before it encrypts."""
HE_REGISTRY: Final = "he-registry"
"""Config key (threshold mode, deployments): the operator's device registry (JSON), relayed."""

RUN_CONFIG_KEY: Final = "fedrec-run-config"
"""Config-record key of the resolved run config (TOML text; :mod:`common.run.info`)."""
ITEM_IDS_KEY: Final = "fedrec-item-ids"
"""Config-record key of the catalogue: one original item id (str) per model column."""

# ------------------------------------------------------------------------ metric-record keys

WEIGHT: Final = "weight"
"""Train reply: the weight the update is pre-multiplied by (examples, or 1/m under DP)."""
NUM_EXAMPLES: Final = "num-examples"
"""Train reply: the users the client trained on (int)."""
LOSS: Final = "loss"
"""Train reply: the mean local training loss."""
SECONDS_SUFFIX: Final = "-seconds"
"""Every train-reply key ending with this is a client-side duration in seconds."""
DESERIALIZE_SECONDS: Final = "deserialize-seconds"
"""Train reply: seconds spent reading the received model."""
TRAIN_SECONDS: Final = "train-seconds"
"""Train reply: seconds of local training."""
SERIALIZE_SECONDS: Final = "serialize-seconds"
"""Train reply: seconds spent packing the update."""
HE_ENCRYPT_SECONDS: Final = "he-encrypt-seconds"
"""Train reply of an encrypted run: seconds spent encrypting the update."""
HE_AGGREGATE_SECONDS: Final = "he-aggregate-seconds"
"""Server-side timing (ledger): seconds spent checking and adding ciphertexts."""
HE_DECRYPT_SECONDS: Final = "he-decrypt-seconds"
"""Server-side timing (ledger): seconds of the committee's decryption round trip."""
DPSGD_STEPS: Final = "dpsgd-steps"
"""Train reply of a DP-SGD silo: the DP-SGD steps it took (int)."""
DPSGD_SAMPLE_RATE: Final = "dpsgd-sample-rate"
"""Train reply of a DP-SGD silo: its batch sampling rate q_s."""
REFUSED: Final = "refused"
"""Refusal reply: 1 when the client refuses the round over its privacy budget."""
EPSILON_IF_TRAINED: Final = "epsilon-if-trained"
"""Refusal reply: the epsilon the client would have reached by training."""
DIVERGED: Final = "diverged"
"""Divergence reply: 1 when local training gave a non-finite loss or update (nothing sent)."""
DIVERGED_REASON: Final = "diverged-reason"
"""Divergence reply, in its ``config`` record: what went non-finite (``loss is inf at update
2``)."""
EVAL_USERS: Final = "eval-users"
"""Evaluate reply: the users the client scored (the weight of its metrics)."""
EVAL_METRIC_PREFIXES: Final = ("ndcg@", "recall@")
"""Evaluate reply: the ranking metrics the server averages (``ndcg@100``, ``recall@20``...)."""

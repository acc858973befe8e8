"""Client-side encryption as a Flower mod, and the committee's decryption of the sum.

:func:`make_client_he_mod` wraps training (outside the DP mod, so the noise is added before
encryption; docs/design.md, "One training round", step 3): the reply's pre-weighted, clipped
and noised update leaves the device only as CKKS ciphertext under the key pair the server
announced. A refusal or an error passes through unchanged. :func:`decrypt_for_committee` is
what a committee member runs (round step 5): decrypt the server's sum with the secret key,
flood and round it, reply.

Keys come from the node's ``keys`` folder (a device) or the run's (a simulation); the secret-key
context is loaded once per process.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable

from common.he import (
    ClientKeys,
    decrypt_sum,
    default_flood_std,
    encrypt_update,
    load_client_context,
    sum_from_record,
    to_record,
)
from common.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    HE_ENCRYPT_SECONDS,
    HE_FINGERPRINT,
    HE_RECORD,
    HE_SUM_RECORD,
    METRICS_RECORD,
    read_str,
)

__all__ = ["KeysLookup", "client_keys", "decrypt_for_committee", "make_client_he_mod"]

logger = logging.getLogger(__name__)

KeysLookup = Callable[[Context], Path]
"""Where the mod finds this client's key folder (node config, run folder...)."""


@functools.lru_cache(maxsize=4)
def client_keys(keydir: str) -> ClientKeys:
    """The secret-key context of ``keydir`` (checked against its parameter set), loaded once."""
    return load_client_context(Path(keydir))


def make_client_he_mod(
    keys_of: KeysLookup,
) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """A mod that encrypts this client's training replies (see module docstring)."""

    def client_he_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        config = msg.content.config_records.get(CONFIG_RECORD, ConfigRecord())
        if HE_FINGERPRINT not in config:
            return call_next(msg, context)
        expected = read_str(config, HE_FINGERPRINT, record_name=CONFIG_RECORD)
        keys = client_keys(str(keys_of(context)))
        if keys.fingerprint != expected:
            raise ValueError(
                f"the server expects key pair {expected[:16]}..., "
                f"this device holds {keys.fingerprint[:16]}...: nothing sent"
            )
        reply = call_next(msg, context)
        if reply.has_error() or ARRAYS_RECORD not in reply.content.array_records:
            return reply  # an error or a refusal: nothing to encrypt
        start = time.perf_counter()
        arrays = {k: v.numpy() for k, v in reply.content.array_records[ARRAYS_RECORD].items()}
        record = to_record(encrypt_update(arrays, keys=keys))
        seconds = time.perf_counter() - start
        metrics = reply.content.metric_records.get(METRICS_RECORD, MetricRecord())
        metrics[HE_ENCRYPT_SECONDS] = seconds
        return Message(RecordDict({HE_RECORD: record, METRICS_RECORD: metrics}), reply_to=msg)

    return client_he_mod


def decrypt_for_committee(msg: Message, keys: ClientKeys, *, tamper: float = 0.0) -> RecordDict:
    """Decrypt, flood and round the server's encrypted sum (a committee member's reply).

    The flood std is chosen here from the parameter set and the number of updates summed,
    not taken from the server, so the server cannot ask for an unflooded decryption.
    ``tamper`` (fault injection in simulations only) is added to every released value.
    """
    total = sum_from_record(msg.content.config_records[HE_SUM_RECORD])
    flood_std = default_flood_std(keys.params, n_updates=total.n_updates)
    out = decrypt_sum(total, keys=keys, flood_std=flood_std, rng=np.random.default_rng())
    if tamper:
        out = {k: v + np.asarray(tamper, dtype=v.dtype) for k, v in out.items()}
    arrays = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()})
    return RecordDict({ARRAYS_RECORD: arrays})

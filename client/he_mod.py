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
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import tenseal as ts
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
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

from client.threshold import sign_upload
from common.he import (
    ClientKeys,
    EncryptedSum,
    ParamSet,
    ServerKeys,
    decrypt_sum,
    default_flood_std,
    encrypt_update,
    fingerprint_of,
    load_client_context,
    load_server_context,
    sum_from_record,
    to_record,
)
from common.he.keys import FINGERPRINT
from common.he.shares import Transcript, check_transcript, load_transcript
from common.privacy.signing import (
    COSIGN_REQUEST_RECORD,
    COSIGNATURE_RECORD,
    Cosignature,
    statement_from_request,
    sum_digest,
)
from common.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    HE_CEREMONY,
    HE_ENCRYPT_SECONDS,
    HE_FINGERPRINT,
    HE_PUBLIC_CONTEXT,
    HE_RECORD,
    HE_SLOT,
    HE_SUM_RECORD,
    HE_UPLOAD_RECORD,
    METRICS_RECORD,
    RoundConfig,
    read_str,
)

__all__ = [
    "KeysLookup",
    "RegistryLookup",
    "SignerLookup",
    "client_keys",
    "cosign_decryption",
    "decrypt_for_committee",
    "make_client_he_mod",
    "public_keys",
    "public_keys_from_bytes",
    "sender_keys",
]

logger = logging.getLogger(__name__)

KeysLookup = Callable[[Context], Path]
"""Where the mod finds this client's key folder (node config, run folder...)."""
SignerLookup = Callable[[Context], "tuple[int, Ed25519PrivateKey] | None"]
"""This client's id and device signing key (threshold mode signs every upload)."""
RegistryLookup = Callable[[Context, ConfigRecord], Mapping[str, str]]
"""The registered device keys this client trusts (the run's, or relayed by the server)."""


@functools.lru_cache(maxsize=4)
def client_keys(keydir: str) -> ClientKeys:
    """The secret-key context of ``keydir`` (checked against its parameter set), loaded once."""
    return load_client_context(Path(keydir))


def public_keys(keydir: str) -> ServerKeys:
    """The public context of ``keydir`` (a threshold key's collective one), loaded once per key
    (a new ceremony's key in the same folder is loaded anew)."""
    try:
        fingerprint = (Path(keydir) / FINGERPRINT).read_text().strip()
    except OSError:
        fingerprint = ""
    return _public_keys(keydir, fingerprint)


@functools.lru_cache(maxsize=8)
def _public_keys(keydir: str, fingerprint: str) -> ServerKeys:
    return load_server_context(Path(keydir))


@functools.lru_cache(maxsize=4)
def public_keys_from_bytes(data: bytes) -> ServerKeys:
    """The collective public context the server sent (deployments), checked like a file."""
    context = ts.context_from(data, n_threads=1)
    if context.has_secret_key():
        raise ValueError("the server sent a context with a secret key; refused")
    params = ParamSet.THRESHOLD.params
    return ServerKeys(context=context, params=params, fingerprint=fingerprint_of(context))


def make_client_he_mod(
    keys_of: KeysLookup,
    signer_of: SignerLookup | None = None,
    registry_of: RegistryLookup | None = None,
) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """A mod that encrypts this client's training replies (see module docstring).

    In threshold mode (the train config names a slot, ``he-slot``) the update is encrypted under
    the collective public key, once the device has checked that every key holder signed that
    key (:func:`common.he.shares.check_transcript`, with the device registry of
    ``registry_of``), and its digest is signed with the device key (``signer_of``).
    """

    def client_he_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        config = msg.content.config_records.get(CONFIG_RECORD, ConfigRecord())
        if HE_FINGERPRINT not in config:
            return call_next(msg, context)
        expected = read_str(config, HE_FINGERPRINT, record_name=CONFIG_RECORD)
        threshold = HE_SLOT in config
        keys = None
        if threshold:
            registry = registry_of(context, config) if registry_of is not None else {}
            keys = sender_keys(config, str(keys_of(context)), registry)
        if keys is None:
            keys = client_keys(str(keys_of(context)))
        if keys.fingerprint != expected:
            raise ValueError(
                f"the server expects key {expected[:16]}..., "
                f"this device holds {keys.fingerprint[:16]}...: nothing sent"
            )
        signer = signer_of(context) if (threshold and signer_of is not None) else None
        if threshold and signer is None:
            raise ValueError("threshold mode signs every upload; this device has no signing key")
        reply = call_next(msg, context)
        if reply.has_error() or ARRAYS_RECORD not in reply.content.array_records:
            return reply  # an error or a refusal: nothing to encrypt
        start = time.perf_counter()
        arrays = {k: v.numpy() for k, v in reply.content.array_records[ARRAYS_RECORD].items()}
        encrypted = encrypt_update(arrays, keys=keys)
        content = RecordDict({HE_RECORD: to_record(encrypted)})
        if signer is not None:
            client, key = signer
            content[HE_UPLOAD_RECORD] = sign_upload(
                context,
                config,
                list(encrypted.chunks),
                fingerprint=keys.fingerprint,
                client=client,
                signing_key=key,
            )
        seconds = time.perf_counter() - start
        metrics = reply.content.metric_records.get(METRICS_RECORD, MetricRecord())
        metrics[HE_ENCRYPT_SECONDS] = seconds
        content[METRICS_RECORD] = metrics
        return Message(content, reply_to=msg)

    return client_he_mod


def sender_keys(config: ConfigRecord, keydir: str, registry: Mapping[str, str]) -> ServerKeys:
    """A sender's public context in threshold mode, checked to be the ceremony's.

    The context is the server's (deployments send it with the message, and the ceremony's
    record with it) or the key folder's (a simulation); either way the device encrypts only
    after every key holder's signature of its fingerprint has checked out against the
    registry: a server handing out a key of its own is refused.
    """
    data = config.get(HE_PUBLIC_CONTEXT)
    if isinstance(data, bytes):
        keys = public_keys_from_bytes(data)
        raw = config.get(HE_CEREMONY)
        transcript = Transcript.from_json(
            json.loads(raw) if isinstance(raw, str) else None, where="the server's message"
        )
    else:
        keys = public_keys(keydir)
        transcript = load_transcript(Path(keydir))
    key = (keys.fingerprint, transcript.plan_digest, json.dumps(sorted(registry.items())))
    if key not in _CHECKED:
        check_transcript(transcript, fingerprint=keys.fingerprint, registry=registry)
        _CHECKED.add(key)
    return keys


_CHECKED: set[tuple[str, str | None, str]] = set()
"""Ceremony records already checked in this process (key, plan, registry)."""


def decrypt_for_committee(
    msg: Message,
    keys: ClientKeys,
    *,
    tamper: float = 0.0,
    signing_key: Ed25519PrivateKey | None = None,
    announced: Mapping[str, float] | None = None,
) -> RecordDict:
    """Decrypt, flood and round the server's encrypted sum (a committee member's reply).

    The flood std is chosen here from the parameter set and the number of updates summed,
    not taken from the server, so the server cannot ask for an unflooded decryption.
    ``tamper`` (fault injection in simulations only) is added to every released value.

    When the request asks for a co-signature and the member has a ``signing_key``, the reply
    also carries the member's signed statement of the round, the sum's update count and
    digest, and the announced mechanism (:mod:`common.privacy.signing`). ``announced``: the
    mechanism the member itself recorded for the round (a device's ledger); the member does
    not co-sign a request that states another one.
    """
    total = sum_from_record(msg.content.config_records[HE_SUM_RECORD])
    flood_std = default_flood_std(keys.params, n_updates=total.n_updates)
    out = decrypt_sum(total, keys=keys, flood_std=flood_std, rng=np.random.default_rng())
    if tamper:
        out = {k: v + np.asarray(tamper, dtype=v.dtype) for k, v in out.items()}
    arrays = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()})
    content = RecordDict({ARRAYS_RECORD: arrays})
    request = msg.content.config_records.get(COSIGN_REQUEST_RECORD)
    if signing_key is not None and request is not None:
        cosignature = cosign_decryption(msg, request, total, signing_key, announced)
        if cosignature is not None:
            content[COSIGNATURE_RECORD] = ConfigRecord(dict(cosignature.to_wire()))
    return content


def cosign_decryption(
    msg: Message,
    request: ConfigRecord,
    total: EncryptedSum,
    signing_key: Ed25519PrivateKey,
    announced: Mapping[str, float] | None,
) -> Cosignature | None:
    """The member's co-signature of the round it decrypted, or ``None`` (logged) if the request
    is malformed or states another mechanism than the member recorded."""
    server_round = RoundConfig.read(msg.content.config_records[CONFIG_RECORD]).server_round
    statement = statement_from_request(
        request,
        server_round=server_round,
        contributors=total.n_updates,
        sum_sha256=sum_digest(total.header.fingerprint, total.n_updates, total.chunks),
    )
    if statement is None:
        logger.warning("round %d: malformed co-signing request; not co-signed", server_round)
        return None
    for name, value in (announced or {}).items():
        if not math.isclose(float(statement[name]), float(value), rel_tol=1e-9):
            logger.warning(
                "round %d: the server asks to co-sign %s %s, this device was told %s; not "
                "co-signed",
                server_round,
                name,
                statement[name],
                value,
            )
            return None
    return Cosignature.make(signing_key, statement)

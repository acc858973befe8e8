"""The key ceremony of the threshold scheme: three steps every key holder takes, no dealer.

The server only relays (docs/design.md, "Threshold decryption"); what it relays is either public
or sealed to one holder:

1. **start** (:func:`holder_start`): holder ``i`` draws its secret ``s_i``, its public share
   ``p_i = -a s_i + e_i`` (:func:`common.he.threshold.keygen_party`) and a fresh X25519 key for
   the ceremony; it publishes ``p_i`` and the X25519 public key. The Flower layer signs both with
   the holder's registered device key, so the server cannot substitute its own exchange key.
2. **deal** (:func:`holder_deal`): holder ``i`` Shamir-shares ``s_i`` (degree ``t - 1``) and seals
   share ``f_i(j)`` to each holder ``j`` with AES-GCM under a key derived (HKDF-SHA256) from their
   X25519 exchange, bound to the ceremony, dealer and recipient.
3. **finish** (:func:`holder_finish`): holder ``j`` opens what was sealed to it, keeps
   ``S_j = sum_i f_i(j)``, computes the collective public key ``(sum p_i, a)`` and its fingerprint
   and returns the fingerprint and a digest committing to its share. The server accepts the
   ceremony only when every holder reports the same fingerprint.

Between steps a holder keeps its pending state (:class:`HolderState`, secret) in an owner-only
file. :func:`run_local` plays every holder in one process (``fedrec keys ceremony``, tests): the
holders' secrets exist only in their own states and the collective secret is never formed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.he.keys import fingerprint_of
from common.he.params import HEParams
from common.he.threshold import (
    KeyShare,
    ThresholdError,
    collective_public_key,
    combine_shares,
    common_polynomial,
    deal_shares,
    keygen_party,
    public_context,
    ring_of,
)

__all__ = [
    "CeremonyPlan",
    "HolderState",
    "LocalCeremony",
    "exchange_statement",
    "holder_deal",
    "holder_finish",
    "holder_start",
    "new_plan",
    "run_local",
]


@dataclass(frozen=True)
class CeremonyPlan:
    """What the server announces: the ceremony's id, parameters, seed of ``a`` and holders."""

    ceremony_id: str
    """Hex id, fresh per ceremony; binds every sealed share and signature to it."""
    params: HEParams
    seed: bytes
    """Public seed of the common polynomial ``a``."""
    holders: tuple[int, ...]
    """The holders' Shamir indices, 1..n."""
    threshold: int
    """Partial decryptions a decryption needs."""
    clients: tuple[int, ...] | None = None
    """The client (device registry id) of each holder, in index order: who may sign holder
    ``j``'s steps. ``None`` in a ceremony played in one process (:func:`run_local`)."""

    def __post_init__(self) -> None:
        if self.clients is not None and (
            len(self.clients) != len(self.holders) or len(set(self.clients)) != len(self.clients)
        ):
            raise ThresholdError(f"clients must name each holder once, got {self.clients}")
        if sorted(self.holders) != list(range(1, len(self.holders) + 1)):
            raise ThresholdError(f"holders must be 1..n, got {list(self.holders)}")
        if not 1 <= self.threshold <= len(self.holders):
            raise ThresholdError(
                f"threshold must lie in [1, {len(self.holders)}], got {self.threshold}"
            )

    def to_json(self) -> str:
        """Compact JSON (travels in a Flower config record)."""
        return json.dumps(
            {
                "ceremony_id": self.ceremony_id,
                "params": self.params.to_json(),
                "seed": self.seed.hex(),
                "holders": list(self.holders),
                "threshold": self.threshold,
                "clients": None if self.clients is None else list(self.clients),
            },
            separators=(",", ":"),
        )

    def digest(self) -> str:
        """SHA-256 of :meth:`to_json`: every signature of the ceremony binds the whole plan, so
        a server that showed two holders two different plans is caught."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def client_of(self, index: int) -> int | None:
        """The client that holder ``index`` must be, or ``None`` if the plan names none."""
        return None if self.clients is None else self.clients[index - 1]

    @classmethod
    def from_json(cls, text: str) -> CeremonyPlan:
        """Parse :meth:`to_json`; :class:`ThresholdError` naming what is wrong."""
        try:
            raw = json.loads(text)
            return cls(
                ceremony_id=str(raw["ceremony_id"]),
                params=HEParams.from_json(raw["params"]),
                seed=bytes.fromhex(raw["seed"]),
                holders=tuple(int(j) for j in raw["holders"]),
                threshold=int(raw["threshold"]),
                clients=None
                if raw.get("clients") is None
                else tuple(int(c) for c in raw["clients"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ThresholdError(f"malformed ceremony plan: {err}") from None


def new_plan(
    params: HEParams, *, holders: int, threshold: int, clients: Sequence[int] | None = None
) -> CeremonyPlan:
    """A fresh plan: random id and seed (OS CSPRNG), holders ``1..holders`` (their clients)."""
    return CeremonyPlan(
        ceremony_id=os.urandom(16).hex(),
        params=params,
        seed=os.urandom(32),
        holders=tuple(range(1, holders + 1)),
        threshold=threshold,
        clients=None if clients is None else tuple(clients),
    )


@dataclass(frozen=True)
class HolderState:
    """A holder's pending state between the steps (secret: keep it owner-only)."""

    plan: CeremonyPlan
    index: int
    secret: np.ndarray
    """``s_i`` in NTT form at the key level."""
    exchange_private: bytes
    """Raw X25519 private key of this ceremony."""

    def to_bytes(self) -> bytes:
        """JSON with the arrays in base64."""
        return json.dumps(
            {
                "plan": self.plan.to_json(),
                "index": self.index,
                "secret": base64.b64encode(self.secret.astype("<u8").tobytes()).decode(),
                "secret_shape": list(self.secret.shape),
                "exchange_private": self.exchange_private.hex(),
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> HolderState:
        """Parse :meth:`to_bytes`."""
        try:
            raw = json.loads(data)
            secret = np.frombuffer(base64.b64decode(raw["secret"]), dtype="<u8")
            return cls(
                plan=CeremonyPlan.from_json(raw["plan"]),
                index=int(raw["index"]),
                secret=secret.reshape(tuple(raw["secret_shape"])).astype(np.uint64),
                exchange_private=bytes.fromhex(raw["exchange_private"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ThresholdError(f"malformed ceremony state: {err}") from None

    def exchange_public(self) -> bytes:
        """Raw X25519 public key."""
        return (
            X25519PrivateKey.from_private_bytes(self.exchange_private)
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )


def exchange_statement(
    plan: CeremonyPlan, index: int, share_sha256: str, exchange_key: bytes
) -> bytes:
    """The bytes a holder signs in step 1: the plan's digest, its index, the SHA-256 of its
    ``p_i`` (hex) and its exchange key."""
    return (
        f"fedrec-ceremony-start\x00{plan.digest()}\x00{index}\x00{share_sha256}\x00"
        f"{exchange_key.hex()}"
    ).encode()


def holder_start(plan: CeremonyPlan, index: int) -> tuple[HolderState, bytes, bytes]:
    """Step 1: the holder's state, its public share ``p_i`` (raw residues) and exchange key."""
    if index not in plan.holders:
        raise ThresholdError(f"holder {index} is not in the ceremony's {list(plan.holders)}")
    ring = ring_of(plan.params)
    a = common_polynomial(ring, plan.seed)
    secret, share = keygen_party(ring, a)
    private = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    state = HolderState(plan=plan, index=index, secret=secret, exchange_private=private)
    return state, share.astype("<u8").tobytes(), state.exchange_public()


def _aead(state: HolderState, peer: bytes, dealer: int, recipient: int) -> tuple[AESGCM, bytes]:
    own = X25519PrivateKey.from_private_bytes(state.exchange_private)
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError as err:
        raise ThresholdError(f"bad exchange key of holder {dealer}/{recipient}: {err}") from None
    info = f"fedrec-share\x00{state.plan.ceremony_id}\x00{dealer}\x00{recipient}".encode()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
    return AESGCM(key), info


def holder_deal(state: HolderState, exchange_keys: Mapping[int, bytes]) -> dict[int, bytes]:
    """Step 2: ``f_i(j)`` sealed to each holder ``j`` (nonce + AES-GCM ciphertext)."""
    plan = state.plan
    missing = [j for j in plan.holders if j not in exchange_keys]
    if missing:
        raise ThresholdError(f"no exchange key from holders {missing}")
    ring = ring_of(plan.params)
    shares = deal_shares(ring, state.secret, holders=plan.holders, threshold=plan.threshold)
    sealed = {}
    for j, share in shares.items():
        aead, info = _aead(state, exchange_keys[j], state.index, j)
        nonce = os.urandom(12)
        sealed[j] = nonce + aead.encrypt(nonce, share.astype("<u8").tobytes(), info)
    return sealed


def holder_finish(
    state: HolderState,
    *,
    public_shares: Mapping[int, bytes],
    sealed: Mapping[int, bytes],
    exchange_keys: Mapping[int, bytes],
) -> tuple[KeyShare, bytes]:
    """Step 3: this holder's :class:`KeyShare` and the collective public key (SEAL bytes).

    ``sealed`` maps each dealer to what it sealed to this holder. Raises
    :class:`ThresholdError` for a missing or malformed public share, or a sealed share that does
    not open (tampered in transit, or sealed to someone else).
    """
    plan = state.plan
    ring = ring_of(plan.params)
    key_shape = (len(ring.key_primes), ring.degree)
    data_shape = (len(ring.data_primes), ring.degree)
    parts = []
    for dealer in plan.holders:
        if dealer not in sealed or dealer not in exchange_keys:
            raise ThresholdError(f"nothing sealed to holder {state.index} from holder {dealer}")
        aead, info = _aead(state, exchange_keys[dealer], dealer, state.index)
        blob = sealed[dealer]
        try:
            plain = aead.decrypt(blob[:12], blob[12:], info)
        except InvalidTag:
            raise ThresholdError(
                f"the share holder {dealer} sealed to holder {state.index} does not open: "
                "tampered with, or sealed for another ceremony"
            ) from None
        parts.append(_residues(plain, data_shape, f"holder {dealer}'s dealt share"))
    residues = combine_shares(ring, parts)
    publics = []
    for j in plan.holders:
        if j not in public_shares:
            raise ThresholdError(f"no public share from holder {j}")
        share = _residues(public_shares[j], key_shape, f"holder {j}'s public share")
        if bool((share >= np.asarray(ring.key_primes, dtype=np.uint64)[:, None]).any()):
            raise ThresholdError(f"holder {j}'s public share has a residue above its prime")
        publics.append(share)
    a = common_polynomial(ring, plan.seed)
    public_key = collective_public_key(ring, a, publics)
    fingerprint = fingerprint_of(public_context(plan.params, public_key))
    key_share = KeyShare(
        index=state.index,
        holders=plan.holders,
        threshold=plan.threshold,
        params=plan.params,
        fingerprint=fingerprint,
        residues=residues,
    )
    return key_share, public_key


def _residues(data: bytes, shape: tuple[int, int], what: str) -> np.ndarray:
    if len(data) != 8 * shape[0] * shape[1]:
        raise ThresholdError(f"{what} has {len(data)} bytes, expected {8 * shape[0] * shape[1]}")
    return np.frombuffer(data, dtype="<u8").reshape(shape).astype(np.uint64)


@dataclass(frozen=True)
class LocalCeremony:
    """What :func:`run_local` returns."""

    plan: CeremonyPlan
    context: ts.Context
    """The collective public context (no secret key)."""
    public_key: bytes
    shares: tuple[KeyShare, ...]
    """One per holder, in index order."""


def run_local(params: HEParams, *, holders: int, threshold: int) -> LocalCeremony:
    """Play every holder's three steps in this process (see the module docstring)."""
    plan = new_plan(params, holders=holders, threshold=threshold)
    states, publics, exchange = {}, {}, {}
    for j in plan.holders:
        states[j], publics[j], exchange[j] = holder_start(plan, j)
    dealt = {i: holder_deal(states[i], exchange) for i in plan.holders}
    shares, keys = [], set()
    for j in plan.holders:
        share, public_key = holder_finish(
            states[j],
            public_shares=publics,
            sealed={i: dealt[i][j] for i in plan.holders},
            exchange_keys=exchange,
        )
        shares.append(share)
        keys.add(public_key)
    if len(keys) != 1:
        raise ThresholdError("holders computed different collective keys")
    public_key = keys.pop()
    return LocalCeremony(
        plan=plan,
        context=public_context(params, public_key),
        public_key=public_key,
        shares=tuple(shares),
    )

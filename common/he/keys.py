"""CKKS key folders: one secret-key context for the devices, one public context for the server.

``fedrec keys init --out KEYDIR`` (:func:`init_keys`) writes::

    KEYDIR/            0o700
      client.ctx       0o600  TenSEAL context WITH the secret key: devices (committee) only
      server.ctx       0o600  the same context without the secret key: the server
      fingerprint      0o600  hex SHA-256 of server.ctx, names the key pair in every header
      params.json      0o600  the parameter set (name, ring degree, primes, scale)

The server context is ``client.serialize(save_secret_key=False)`` with no relinearization or
Galois keys (the server only adds), so the secret key is never in anything the server loads:
:func:`load_server_context` refuses a context that holds one, and the tests prove the server's
context cannot decrypt. The fingerprint is the SHA-256 of the public context's bytes, which both
loaders recompute: a client and a server agree on it exactly when they hold the same key pair.

Both loaders apply the HE Standard check (:func:`common.he.params.check_security`) to what the
context itself reports (ring degree, total coefficient bits, read from SEAL's modulus chain) and
compare it with ``params.json``; TenSEAL does not expose the individual prime sizes, so those come
from ``params.json`` and are checked for consistency with the chain's length and total.

Known limit (docs/design.md, "Encryption"): all devices share one secret key, so a device
colluding with the server could read others' ciphertexts; the DP noise each device adds is the
second line of defence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import tenseal as ts

from common.errors import FedrecError
from common.he._seal import SealTools
from common.he.params import HEParams, check_security
from common.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "CLIENT_CONTEXT",
    "FINGERPRINT",
    "PARAMS",
    "SERVER_CONTEXT",
    "ClientKeys",
    "KeyDirError",
    "KeyFiles",
    "ServerKeys",
    "fingerprint_of",
    "generate_keys",
    "init_keys",
    "load_client_context",
    "load_server_context",
    "new_context",
]

logger = logging.getLogger(__name__)

CLIENT_CONTEXT = "client.ctx"
SERVER_CONTEXT = "server.ctx"
FINGERPRINT = "fingerprint"
PARAMS = "params.json"

_FILE_MODE = 0o600
_DIR_MODE = 0o700


class KeyDirError(FedrecError, ValueError):
    """A key folder is missing, already holds keys, or holds a context that fails a check."""


@dataclass(frozen=True)
class ServerKeys:
    """A public CKKS context (no secret key), its parameter set and key fingerprint."""

    context: ts.Context
    """TenSEAL context without a secret key: can check and add ciphertexts, not decrypt them."""
    params: HEParams
    """The parameter set the context was made with."""
    fingerprint: str
    """Hex SHA-256 of the public context (:func:`fingerprint_of`)."""

    @cached_property
    def seal(self) -> SealTools:
        """SEAL encoder and evaluator of :attr:`context`, made once."""
        return SealTools(self.context)


@dataclass(frozen=True)
class ClientKeys(ServerKeys):
    """A secret-key CKKS context: encrypts updates and decrypts (committee) the sum."""

    def public(self) -> ServerKeys:
        """The same keys without the secret key, as the server holds them."""
        context = ts.context_from(_public_bytes(self.context), n_threads=1)
        return ServerKeys(context=context, params=self.params, fingerprint=self.fingerprint)


@dataclass(frozen=True)
class KeyFiles:
    """Paths written by :func:`init_keys`."""

    client: Path
    """Secret-key context, for devices only."""
    server: Path
    """Public context, for the server."""
    fingerprint: Path
    """Hex SHA-256 naming the key pair."""
    params: Path
    """The parameter set as JSON."""
    value: str
    """The fingerprint itself."""


def _public_bytes(context: ts.Context) -> bytes:
    return context.serialize(
        save_public_key=True,
        save_secret_key=False,
        save_galois_keys=False,
        save_relin_keys=False,
    )


def fingerprint_of(context: ts.Context) -> str:
    """Hex SHA-256 of the context's public part (public key, parameters, scale).

    The same for a client context and the server context made from it; different for every key
    pair, since the public key is random.
    """
    return hashlib.sha256(_public_bytes(context)).hexdigest()


def new_context(params: HEParams) -> ts.Context:
    """A fresh TenSEAL CKKS context of ``params`` (with a key pair of its own), one thread."""
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        n_threads=1,
    )
    context.global_scale = params.scale
    return context


def generate_keys(params: HEParams) -> ClientKeys:
    """Make a fresh key pair in memory (tests and benchmarks; :func:`init_keys` writes one)."""
    context = new_context(params)
    _check_context(context, params)
    return ClientKeys(context=context, params=params, fingerprint=fingerprint_of(context))


def init_keys(out_dir: Path, *, params: HEParams, force: bool = False) -> KeyFiles:
    """Provision a key folder (see the module docstring for its files).

    Parameters
    ----------
    out_dir:
        Folder to write; made with mode ``0o700`` (an existing one is narrowed to it).
    params:
        The CKKS parameter set, e.g. ``ParamSet.FEDREC.params``.
    force:
        Replace keys already in ``out_dir``. Devices holding the old ``client.ctx`` can no longer
        take part: their fingerprint no longer matches.

    Raises
    ------
    KeyDirError
        When ``out_dir`` already holds keys and ``force`` is false.
    """
    out_dir = Path(out_dir)
    names = (CLIENT_CONTEXT, SERVER_CONTEXT, FINGERPRINT, PARAMS)
    existing = [name for name in names if (out_dir / name).exists()]
    if existing and not force:
        raise KeyDirError(
            f"{out_dir} already holds keys ({', '.join(existing)}); use --force to replace them"
        )
    out_dir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(out_dir, _DIR_MODE)
    keys = generate_keys(params)
    public = _public_bytes(keys.context)
    secret = keys.context.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    files = KeyFiles(
        client=out_dir / CLIENT_CONTEXT,
        server=out_dir / SERVER_CONTEXT,
        fingerprint=out_dir / FINGERPRINT,
        params=out_dir / PARAMS,
        value=keys.fingerprint,
    )
    atomic_write_text(files.params, json.dumps(params.to_json(), indent=2) + "\n", mode=_FILE_MODE)
    atomic_write_bytes(files.server, public, mode=_FILE_MODE)
    atomic_write_bytes(files.client, secret, mode=_FILE_MODE)
    atomic_write_text(files.fingerprint, keys.fingerprint + "\n", mode=_FILE_MODE)
    logger.info("wrote CKKS keys %s (%s) to %s", keys.fingerprint[:16], params.name, out_dir)
    return files


def load_client_context(keydir: Path) -> ClientKeys:
    """Load a device's secret-key context from ``keydir/client.ctx``, with every check.

    Raises
    ------
    KeyDirError
        A file is missing or unreadable, the context has no secret key, fails the security check,
        or its fingerprint or parameters differ from ``fingerprint`` / ``params.json``.
    """
    keydir = Path(keydir)
    path = keydir / CLIENT_CONTEXT
    _warn_if_shared(path)
    context, params, fingerprint = _load(keydir, path)
    if not context.has_secret_key():
        raise KeyDirError(f"{path}: no secret key in this context; devices need client.ctx")
    return ClientKeys(context=context, params=params, fingerprint=fingerprint)


def load_server_context(keydir: Path) -> ServerKeys:
    """Load the server's public context from ``keydir/server.ctx``, with every check.

    Raises
    ------
    KeyDirError
        As :func:`load_client_context`, and when the context holds a secret key: the server must
        never load one (a copied ``client.ctx`` is refused).
    """
    keydir = Path(keydir)
    path = keydir / SERVER_CONTEXT
    context, params, fingerprint = _load(keydir, path)
    if context.has_secret_key():
        raise KeyDirError(
            f"{path}: this context holds the secret key; the server must load the public "
            "server.ctx written by 'fedrec keys init', never client.ctx"
        )
    return ServerKeys(context=context, params=params, fingerprint=fingerprint)


def _load(keydir: Path, path: Path) -> tuple[ts.Context, HEParams, str]:
    params = _read_params(keydir / PARAMS)
    try:
        expected = (keydir / FINGERPRINT).read_text().strip()
        data = path.read_bytes()
    except OSError as err:
        raise KeyDirError(f"{keydir}: cannot read keys ({err.strerror}: {err.filename})") from None
    try:
        context = ts.context_from(data, n_threads=1)
    except Exception as err:  # TenSEAL/SEAL raise several types for bad bytes
        raise KeyDirError(f"{path}: not a valid TenSEAL context ({err})") from None
    try:
        _check_context(context, params)
    except ValueError as err:
        raise KeyDirError(f"{path}: {err}") from None
    fingerprint = fingerprint_of(context)
    if fingerprint != expected:
        raise KeyDirError(
            f"{path}: fingerprint {fingerprint[:16]}... does not match {keydir / FINGERPRINT} "
            f"({expected[:16]}...): the files come from different 'fedrec keys init' runs"
        )
    return context, params, fingerprint


def _read_params(path: Path) -> HEParams:
    try:
        return HEParams.from_json(json.loads(path.read_text()))
    except OSError as err:
        raise KeyDirError(f"{path}: cannot read ({err.strerror})") from None
    except ValueError as err:  # JSONDecodeError is a ValueError
        raise KeyDirError(f"{path}: {err}") from None


def _check_context(context: ts.Context, params: HEParams) -> None:
    """Check a context against the HE Standard on its own terms, then against ``params``.

    Raises ``ValueError`` naming the parameter that is off.
    """
    seal_context = context.seal_context().data
    key_level = seal_context.key_context_data()
    degree = key_level.parms().poly_modulus_degree()
    # bits of the product of all primes: sum of the prime sizes, or up to one less per prime
    total_bits = key_level.total_coeff_modulus_bit_count()
    check_security(poly_modulus_degree=degree, total_coeff_bits=total_bits)
    if degree != params.poly_modulus_degree:
        raise ValueError(
            f"poly_modulus_degree of the context is {degree}, "
            f"params.json says {params.poly_modulus_degree}"
        )
    primes = _chain_length(seal_context)
    expected_total = sum(params.coeff_mod_bit_sizes)
    if primes != len(params.coeff_mod_bit_sizes) or not (
        expected_total - primes < total_bits <= expected_total
    ):
        raise ValueError(
            f"coeff_mod_bit_sizes of the context ({primes} primes, {total_bits} bits) do not "
            f"match params.json {list(params.coeff_mod_bit_sizes)}"
        )
    scale_bits = _log2_exact(context.global_scale)
    if scale_bits != params.scale_bits:
        raise ValueError(
            f"scale_bits of the context is log2({context.global_scale}), "
            f"params.json says {params.scale_bits}"
        )


def _chain_length(seal_context: object) -> int:
    """Number of primes: the key level plus one per level of the modulus-switching chain."""
    count = 0
    level = seal_context.key_context_data()  # type: ignore[attr-defined]
    while level is not None:
        count += 1
        level = level.next_context_data()
    return count


def _log2_exact(value: float) -> int | None:
    """``k`` when ``value == 2**k`` exactly, else ``None``."""
    if not math.isfinite(value) or value <= 0:
        return None
    mantissa, exponent = math.frexp(value)
    return exponent - 1 if mantissa == 0.5 else None


def _warn_if_shared(path: Path) -> None:
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return  # _load reports the missing file
    if mode & 0o077:
        logger.warning(
            "%s holds the CKKS secret key but is readable by others (mode %o); chmod 600 it",
            path,
            mode,
        )

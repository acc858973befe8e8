"""Cost of encrypted aggregation: fedrec's CKKS codec against NVIDIA FLARE's default and plaintext.

One run encrypts ``--updates`` synthetic updates of ``--values`` float32 values each (values drawn
from ``N(0, 1e-3^2)``, the size of a DP-noised update scaled by ``1 / m``), adds them as the server
does, decrypts the sum and compares it with the float64 plaintext sum. Rows:

- ``fedrec single-key``: :mod:`common.he.codec` with :attr:`ParamSet.FEDREC` (n=4096, one 52-bit
  data prime, seeded symmetric-key ciphertexts; every device holds the one secret key);
- ``fedrec threshold 2-of-3``: :mod:`common.he.threshold` with :attr:`ParamSet.THRESHOLD`
  (n=8192, primes [60, 60, 60], scale 2^104): a collective key of 3 parties (no one holds the
  secret), each party's secret Shamir-shared 2-of-3; public-key encryption under the collective
  key (:func:`~common.he.codec.encrypt_update`), the server's add
  (:func:`~common.he.codec.add_updates`), a partial decryption by each of the 2 committee members,
  flooded as ``plan_flood(..., n_updates=updates, parties=3, members=2, max_decryptions=1024)``
  says, and the combination (:func:`~common.he.codec.combine_sum`). Its "dec" column is the whole
  decryption (both partial decryptions and the combination); two rows under it give one member's
  partial decryption (time, and the bytes it sends) and the combination. Its errors are those of
  the released values, flood included (the flood is part of every threshold decryption). The
  caption gives key generation per party (``keygen_party`` and ``deal_shares``) and the flood.
  Targets: ``<= 32`` bytes per value uploaded, ``<= 0.6`` microseconds per value for encryption
  and for a partial decryption;
- ``fedrec, FLARE params``: the single-key codec with FLARE's parameters (shows what the
  parameter choice alone buys);
- ``FLARE default``: what NVIDIA FLARE does, TenSEAL ``CKKSVector`` with a public-key context,
  n=8192, primes [60, 40, 40], scale 2^40, ``serialize()``;
- ``plaintext f32``: raw bytes, summed in float32.

Columns: client encrypt+serialize and server add (deserialize, check, add, serialize the sum) in
CPU microseconds per value and update, decryption (deserialize, decrypt, decode) in microseconds per
value of the sum, bytes per value on the wire, and the error of the decrypted sum against the
float64 sum (for the single-key rows before the committee's noise flooding, which is reported
separately). Single-key targets: ``<= 32`` bytes and ``<= 0.5`` microseconds per value per core for
encryption, ``1e-5`` relative RMS error. Bytes per value count the padding of the last chunk (a
chunk holds n values). Single-threaded::

    python -m simulations.bench_he                  # 200,000 values x 10 updates
    python -m simulations.bench_he --values 20000   # a few seconds
    fedrec bench he --json bench_he.json
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tenseal as ts
from rich.console import Console
from rich.table import Table

from common.he import (
    ParamSet,
    add_updates,
    decrypt_sum,
    default_flood_std,
    encrypt_update,
    generate_keys,
    layout_of,
)
from common.he import threshold as th
from common.he.codec import (
    _decrypt_flat,  # raw decryption: measured here, never released
    combine_sum,
)
from common.he.keys import ServerKeys, fingerprint_of
from common.io import atomic_write_json

__all__ = [
    "FEDREC_ROW",
    "THRESHOLD_ROW",
    "BenchHEConfig",
    "BenchHEResult",
    "SchemeResult",
    "ThresholdResult",
    "main",
    "render",
    "run_bench",
    "to_json",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

TARGET_BYTES_PER_VALUE = 32.0
"""Largest acceptable ciphertext bytes per value on the wire."""
TARGET_ENCRYPT_US = 0.5
"""Largest acceptable client encrypt+serialize time, microseconds per value per core."""
TARGET_RELATIVE_RMS = 1e-5
"""Largest acceptable RMS error of the decrypted sum relative to the sum's RMS."""
TARGET_THRESHOLD_BYTES_PER_VALUE = 32.0
"""Threshold row: largest acceptable upload (public-key ciphertext) bytes per value."""
TARGET_THRESHOLD_US = 0.6
"""Threshold row: largest acceptable encryption, and partial decryption per member, microseconds
per value per core."""

FEDREC_ROW = "fedrec single-key"
"""Row of fedrec's single-key codec (the ratios are of this row)."""
THRESHOLD_ROW = "fedrec threshold 2-of-3"
"""Row of fedrec's threshold scheme."""
THRESHOLD_PARTIES = 3
"""Key holders of the threshold row, each one a party of the collective key."""
THRESHOLD_T = 2
"""Partial decryptions the threshold row's key needs."""
THRESHOLD_MAX_DECRYPTIONS = 1024
"""Decryptions over the key's life the threshold row's flood is sized for."""


@dataclass(frozen=True)
class BenchHEConfig:
    """Sizes of the benchmark."""

    values: int = 200_000
    """Values per update (a Mult-VAE delta has 280k to 2M)."""
    updates: int = 10
    """Updates summed."""
    std: float = 1e-3
    """Standard deviation of the synthetic update values."""
    seed: int = 0
    """Seed of the synthetic updates and of the flooding noise (the one seed here)."""

    def __post_init__(self) -> None:
        if self.values < 1:
            raise ValueError(f"values must be >= 1, got {self.values}")
        if self.updates < 1:
            raise ValueError(f"updates must be >= 1, got {self.updates}")
        if not (math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"std must be a finite number > 0, got {self.std}")


@dataclass(frozen=True)
class SchemeResult:
    """Measurements of one scheme (one table row)."""

    name: str
    """Row label."""
    encrypt_us: float
    """Client encrypt + serialize, microseconds per value."""
    bytes_per_value: float
    """Bytes on the wire per value of one update."""
    add_us: float
    """Server deserialize + check + add (+ serialize the sum), microseconds per value and update."""
    decrypt_us: float
    """Deserialize + decrypt + decode the sum, microseconds per value."""
    max_error: float
    """Largest absolute error of the decrypted sum against the float64 sum."""
    rms_error: float
    """RMS error of the decrypted sum."""
    relative_rms_error: float
    """``rms_error`` over the RMS of the float64 sum."""


@dataclass(frozen=True)
class ThresholdResult:
    """Per-step costs of the threshold row (:data:`THRESHOLD_ROW`)."""

    parties: int
    """Parties of the collective key, each one a key holder."""
    threshold: int
    """Partial decryptions needed (the committee's size here)."""
    keygen_ms: float
    """One party's key generation, milliseconds: its secret and public share
    (:func:`~common.he.threshold.keygen_party`) and the Shamir shares it deals."""
    encrypt_us: float
    """Client public-key encrypt + serialize, microseconds per value."""
    add_us: float
    """Server deserialize + check + add (+ serialize the sum), microseconds per value and update."""
    partial_us: float
    """One member's partial decryption (with its flood), microseconds per value of the sum; the
    mean over the committee."""
    combine_us: float
    """Check the sum, combine the partial decryptions and decode, microseconds per value."""
    upload_bytes_per_value: float
    """Bytes a client uploads per value (one encrypted update)."""
    partial_bytes_per_value: float
    """Bytes one member sends per value (its partial decryption of the sum)."""
    flood_bits: int
    """``F`` of :func:`~common.he.threshold.plan_flood`: each member's flood is below ``2**F``."""
    flood_value_std: float
    """Standard deviation the committee's floods give a decoded value."""


def _timed(fn: Callable[[], _T]) -> tuple[_T, float]:
    # CPU time of this process: "per core", and not inflated when other work shares the machine
    start = time.process_time()
    result = fn()
    return result, time.process_time() - start


def _errors(got: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    err = got - reference
    rms = float(np.sqrt(np.mean(err**2)))
    return float(np.abs(err).max()), rms, rms / float(np.sqrt(np.mean(reference**2)))


def _fedrec_codec(
    name: str, param_set: ParamSet, updates: list[np.ndarray], reference: np.ndarray, seed: int
) -> tuple[SchemeResult, float, float]:
    """Time fedrec's codec; also returns the flood std and the released (flooded) RMS error."""
    client = generate_keys(param_set.params)
    server = client.public()
    n_values = updates[0].size
    layout = layout_of({"delta": updates[0]})
    encrypted, t_enc = _timed(lambda: [encrypt_update({"delta": u}, keys=client) for u in updates])
    # add_updates checks each update as check_update does (one deserialization), then adds
    total, t_add = _timed(lambda: add_updates(encrypted, keys=server, expected_layout=layout))
    raw, t_dec = _timed(lambda: _decrypt_flat(total, client))
    flood_std = default_flood_std(client.params, n_updates=len(updates))
    rng = np.random.default_rng(seed)
    released = decrypt_sum(total, keys=client, flood_std=flood_std, rng=rng)["delta"]
    n_total = n_values * len(updates)
    result = SchemeResult(
        name,
        1e6 * t_enc / n_total,
        encrypted[0].nbytes / n_values,
        1e6 * t_add / n_total,
        1e6 * t_dec / n_values,
        *_errors(raw, reference),
    )
    return result, flood_std, _errors(released.astype(np.float64), reference)[1]


def _threshold(
    updates: list[np.ndarray], reference: np.ndarray, seed: int
) -> tuple[SchemeResult, ThresholdResult]:
    """Time the threshold scheme, 2-of-3 over a collective key of 3 parties, step by step."""
    params = ParamSet.THRESHOLD.params
    ring = th.ring_of(params)
    holders = tuple(range(1, THRESHOLD_PARTIES + 1))
    committee = holders[:THRESHOLD_T]
    a = th.common_polynomial(ring, hashlib.sha256(f"fedrec-bench-he-{seed}".encode()).digest())

    def party() -> tuple[np.ndarray, dict[int, np.ndarray]]:
        secret, share = th.keygen_party(ring, a)
        return share, th.deal_shares(ring, secret, holders=holders, threshold=THRESHOLD_T)

    parties, t_keygen = _timed(lambda: [party() for _ in holders])
    public_key = th.collective_public_key(ring, a, [share for share, _ in parties])
    context = th.public_context(params, public_key)
    keys = ServerKeys(context=context, params=params, fingerprint=fingerprint_of(context))
    shares = {
        j: th.KeyShare(
            index=j,
            holders=holders,
            threshold=THRESHOLD_T,
            params=params,
            fingerprint=keys.fingerprint,
            residues=th.combine_shares(ring, [dealt[j] for _, dealt in parties]),
        )
        for j in holders
    }
    plan = th.plan_flood(
        params,
        n_updates=len(updates),
        parties=THRESHOLD_PARTIES,
        members=THRESHOLD_T,
        max_decryptions=THRESHOLD_MAX_DECRYPTIONS,
    )
    n_values = updates[0].size
    layout = layout_of({"delta": updates[0]})
    encrypted, t_enc = _timed(lambda: [encrypt_update({"delta": u}, keys=keys) for u in updates])
    total, t_add = _timed(lambda: add_updates(encrypted, keys=keys, expected_layout=layout))
    partials: dict[int, list[bytes]] = {}
    t_partial = 0.0
    for j in committee:
        partials[j], elapsed = _timed(
            partial(shares[j].partial_decrypt, total.chunks, committee=committee, flood=plan.bits)
        )
        t_partial += elapsed
    out, t_combine = _timed(
        lambda: combine_sum(total, partials, keys=keys, threshold=THRESHOLD_T)["delta"]
    )
    n_total = n_values * len(updates)
    row = SchemeResult(
        THRESHOLD_ROW,
        1e6 * t_enc / n_total,
        encrypted[0].nbytes / n_values,
        1e6 * t_add / n_total,
        1e6 * (t_partial + t_combine) / n_values,
        *_errors(out.astype(np.float64), reference),
    )
    steps = ThresholdResult(
        parties=THRESHOLD_PARTIES,
        threshold=THRESHOLD_T,
        keygen_ms=1e3 * t_keygen / THRESHOLD_PARTIES,
        encrypt_us=row.encrypt_us,
        add_us=row.add_us,
        partial_us=1e6 * t_partial / len(committee) / n_values,
        combine_us=1e6 * t_combine / n_values,
        upload_bytes_per_value=row.bytes_per_value,
        partial_bytes_per_value=sum(len(c) for c in partials[committee[0]]) / n_values,
        flood_bits=plan.bits,
        flood_value_std=plan.value_std,
    )
    return row, steps


def _flare_default(updates: list[np.ndarray], reference: np.ndarray) -> SchemeResult:
    """NVIDIA FLARE's way: TenSEAL CKKSVector, public-key context, FLARE's default parameters."""
    params = ParamSet.FLARE_DEFAULT.params
    context = generate_keys(params).context  # same parameters, same key generation
    public = ts.context_from(context.serialize(save_secret_key=False), n_threads=1)
    slots, n_values = params.slots, updates[0].size

    def encrypt(u: np.ndarray) -> list[bytes]:
        return [
            ts.ckks_vector(context, u[i : i + slots].tolist()).serialize()
            for i in range(0, n_values, slots)
        ]

    encrypted, t_enc = _timed(lambda: [encrypt(u) for u in updates])

    def add() -> list[bytes]:
        sums = [ts.ckks_vector_from(public, chunk) for chunk in encrypted[0]]
        for update in encrypted[1:]:
            for acc, chunk in zip(sums, update, strict=True):
                acc.add_(ts.ckks_vector_from(public, chunk))
        return [acc.serialize() for acc in sums]

    total, t_add = _timed(add)

    def decrypt() -> np.ndarray:
        parts = [ts.ckks_vector_from(context, chunk).decrypt() for chunk in total]
        return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])[:n_values]

    decrypted, t_dec = _timed(decrypt)
    n_total = n_values * len(updates)
    return SchemeResult(
        "FLARE default",
        1e6 * t_enc / n_total,
        sum(len(c) for c in encrypted[0]) / n_values,
        1e6 * t_add / n_total,
        1e6 * t_dec / n_values,
        *_errors(decrypted, reference),
    )


def _plaintext(updates: list[np.ndarray], reference: np.ndarray) -> SchemeResult:
    """Plain float32 bytes, summed in float32 as an unencrypted server would."""
    n_values = updates[0].size
    wire, t_enc = _timed(lambda: [u.astype("<f4").tobytes() for u in updates])

    def add() -> np.ndarray:
        acc = np.frombuffer(wire[0], dtype="<f4").copy()
        for data in wire[1:]:
            acc += np.frombuffer(data, dtype="<f4")
        return acc

    total, t_add = _timed(add)
    decoded, t_dec = _timed(lambda: np.frombuffer(total.tobytes(), dtype="<f4"))
    n_total = n_values * len(updates)
    return SchemeResult(
        "plaintext f32",
        1e6 * t_enc / n_total,
        len(wire[0]) / n_values,
        1e6 * t_add / n_total,
        1e6 * t_dec / n_values,
        *_errors(decoded.astype(np.float64), reference),
    )


@dataclass(frozen=True)
class BenchHEResult:
    """All rows of one run, plus the committee's flooding for fedrec."""

    config: BenchHEConfig
    """What was run."""
    rows: tuple[SchemeResult, ...]
    """fedrec single-key, fedrec threshold, single-key codec with FLARE params, FLARE default,
    plaintext float32."""
    flood_std: float
    """Flooding noise std fedrec's single-key committee adds for this many updates."""
    released_rms_error: float
    """RMS error of fedrec's single-key released (flooded, rounded) sum against the float64 sum."""
    threshold: ThresholdResult
    """Per-step costs of the threshold row."""

    def row(self, name: str) -> SchemeResult:
        """The row called ``name``."""
        return next(r for r in self.rows if r.name == name)


def run_bench(cfg: BenchHEConfig) -> BenchHEResult:
    """Run every scheme on the same synthetic updates (see the module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    updates = [rng.normal(0.0, cfg.std, cfg.values).astype(np.float32) for _ in range(cfg.updates)]
    reference = np.sum([u.astype(np.float64) for u in updates], axis=0)
    fedrec, flood_std, released = _fedrec_codec(
        FEDREC_ROW, ParamSet.FEDREC, updates, reference, cfg.seed
    )
    threshold, steps = _threshold(updates, reference, cfg.seed)
    fedrec_flare, _, _ = _fedrec_codec(
        "fedrec, FLARE params", ParamSet.FLARE_DEFAULT, updates, reference, cfg.seed
    )
    rows = (
        fedrec,
        threshold,
        fedrec_flare,
        _flare_default(updates, reference),
        _plaintext(updates, reference),
    )
    return BenchHEResult(cfg, rows, flood_std, released, steps)


_COLUMNS = (
    ("enc us/v", "encrypt_us", "{:.3f}"),
    ("B/v", "bytes_per_value", "{:.2f}"),
    ("add us/v", "add_us", "{:.3f}"),
    ("dec us/v", "decrypt_us", "{:.3f}"),
    ("max err", "max_error", "{:.2e}"),
    ("RMS err", "rms_error", "{:.2e}"),
    ("rel RMS", "relative_rms_error", "{:.2e}"),
)


def render(result: BenchHEResult) -> Table:
    """The rows (the threshold row with its per-member partial decryption and combination under
    it), then the ratios fedrec single-key / FLARE default and / plaintext."""
    cfg = result.config
    steps = result.threshold
    table = Table(
        title=f"HE aggregation: {cfg.updates} updates x {cfg.values:,} values "
        f"~ N(0, {cfg.std:g}^2), CPU time, 1 thread",
        caption=f"fedrec single-key targets: <= {TARGET_BYTES_PER_VALUE:g} bytes/value, "
        f"<= {TARGET_ENCRYPT_US:g} us/value encrypt, <= {TARGET_RELATIVE_RMS:g} relative RMS. "
        f"Committee flood std {result.flood_std:.3g}: released RMS error "
        f"{result.released_rms_error:.3g}. "
        f"Threshold ({steps.threshold}-of-{steps.parties}, n=8192) targets: "
        f"<= {TARGET_THRESHOLD_BYTES_PER_VALUE:g} bytes/value upload, <= {TARGET_THRESHOLD_US:g} "
        f"us/value encrypt and partial decryption; key generation {steps.keygen_ms:.1f} ms/party; "
        f"flood 2^{steps.flood_bits} per member (value std {steps.flood_value_std:.3g}), "
        "included in its errors.",
    )
    table.add_column("scheme")
    for header, _, _ in _COLUMNS:
        table.add_column(header, justify="right")
    for row in result.rows:
        table.add_row(row.name, *(fmt.format(getattr(row, key)) for _, key, fmt in _COLUMNS))
        if row.name == THRESHOLD_ROW:
            blank = ["-"] * (len(_COLUMNS) - 4)
            table.add_row(
                "  partial decryption, per member",
                "-",
                f"{steps.partial_bytes_per_value:.2f}",
                "-",
                f"{steps.partial_us:.3f}",
                *blank,
                style="dim",
            )
            table.add_row(
                "  combine", "-", "-", "-", f"{steps.combine_us:.3f}", *blank, style="dim"
            )
    fedrec = result.row(FEDREC_ROW)
    for other in ("FLARE default", "plaintext f32"):
        base = result.row(other)
        cells = []
        for _, key, _ in _COLUMNS:
            denominator = getattr(base, key)
            cells.append(f"{getattr(fedrec, key) / denominator:.3g}x" if denominator else "-")
        table.add_row(f"fedrec / {other.split()[0]}", *cells, style="bold")
    return table


def to_json(result: BenchHEResult) -> dict[str, Any]:
    """The result as a JSON-ready dict (``--json``)."""
    fedrec = result.row(FEDREC_ROW)
    ratios = {
        other: {
            key: (getattr(fedrec, key) / getattr(result.row(other), key))
            if getattr(result.row(other), key)
            else None
            for _, key, _ in _COLUMNS
        }
        for other in ("FLARE default", "plaintext f32")
    }
    return {
        "config": asdict(result.config),
        "rows": [asdict(r) for r in result.rows],
        "ratios_fedrec_over": ratios,
        "flood_std": result.flood_std,
        "released_rms_error": result.released_rms_error,
        "threshold": asdict(result.threshold),
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: parse flags, run, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=BenchHEConfig.values)
    parser.add_argument("--updates", type=int, default=BenchHEConfig.updates)
    parser.add_argument("--seed", type=int, default=BenchHEConfig.seed)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run_bench(BenchHEConfig(values=args.values, updates=args.updates, seed=args.seed))
    console = Console()
    # rich falls back to 80 columns off a terminal, which wraps every cell of this table
    (console if console.is_terminal else Console(width=120)).print(render(result))
    if args.json is not None:
        atomic_write_json(args.json, to_json(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

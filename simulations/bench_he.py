"""Cost of encrypted aggregation: fedrec's CKKS codec against NVIDIA FLARE's default and plaintext.

One run encrypts ``--updates`` synthetic updates of ``--values`` float32 values each (values drawn
from ``N(0, 1e-3^2)``, the size of a DP-noised update scaled by ``1 / m``), adds them as the server
does, decrypts the sum and compares it with the float64 plaintext sum. Rows:

- ``fedrec``: :mod:`common.he.codec` with :attr:`ParamSet.FEDREC` (n=4096, one 52-bit data prime,
  seeded symmetric-key ciphertexts);
- ``fedrec, FLARE params``: the same codec with FLARE's parameters (shows what the
  parameter choice alone buys);
- ``FLARE default``: what NVIDIA FLARE does, TenSEAL ``CKKSVector`` with a public-key context,
  n=8192, primes [60, 40, 40], scale 2^40, ``serialize()``;
- ``plaintext f32``: raw bytes, summed in float32.

Columns: client encrypt+serialize and server add (deserialize, check, add, serialize the sum) in
CPU microseconds per value and update, decryption (deserialize, decrypt, decode) in microseconds per
value of the sum, bytes per value on the wire, and the error of the decrypted sum against the
float64 sum (before the committee's noise flooding, which is reported separately). Targets:
``<= 32`` bytes and ``<= 0.5`` microseconds per value per core for encryption, ``1e-5``
relative RMS error. Single-threaded::

    python -m simulations.bench_he                  # 200,000 values x 10 updates
    python -m simulations.bench_he --values 20000   # a few seconds
    fedrec bench he --json bench_he.json
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
from common.he.codec import _decrypt_flat  # raw decryption: measured here, never released
from common.io import atomic_write_json

__all__ = ["BenchHEConfig", "SchemeResult", "main", "render", "run_bench", "to_json"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

TARGET_BYTES_PER_VALUE = 32.0
"""Largest acceptable ciphertext bytes per value on the wire."""
TARGET_ENCRYPT_US = 0.5
"""Largest acceptable client encrypt+serialize time, microseconds per value per core."""
TARGET_RELATIVE_RMS = 1e-5
"""Largest acceptable RMS error of the decrypted sum relative to the sum's RMS."""


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
    """fedrec, fedrec codec with FLARE params, FLARE default, plaintext float32."""
    flood_std: float
    """Flooding noise std fedrec's committee adds for this many updates."""
    released_rms_error: float
    """RMS error of fedrec's released (flooded, rounded) sum against the float64 sum."""

    def row(self, name: str) -> SchemeResult:
        """The row called ``name``."""
        return next(r for r in self.rows if r.name == name)


def run_bench(cfg: BenchHEConfig) -> BenchHEResult:
    """Run every scheme on the same synthetic updates (see the module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    updates = [rng.normal(0.0, cfg.std, cfg.values).astype(np.float32) for _ in range(cfg.updates)]
    reference = np.sum([u.astype(np.float64) for u in updates], axis=0)
    fedrec, flood_std, released = _fedrec_codec(
        "fedrec", ParamSet.FEDREC, updates, reference, cfg.seed
    )
    fedrec_flare, _, _ = _fedrec_codec(
        "fedrec, FLARE params", ParamSet.FLARE_DEFAULT, updates, reference, cfg.seed
    )
    rows = (
        fedrec,
        fedrec_flare,
        _flare_default(updates, reference),
        _plaintext(updates, reference),
    )
    return BenchHEResult(cfg, rows, flood_std, released)


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
    """The rows, then the ratios fedrec / FLARE default and fedrec / plaintext."""
    cfg = result.config
    table = Table(
        title=f"HE aggregation: {cfg.updates} updates x {cfg.values:,} values "
        f"~ N(0, {cfg.std:g}^2), CPU time, 1 thread",
        caption=f"fedrec targets: <= {TARGET_BYTES_PER_VALUE:g} bytes/value, "
        f"<= {TARGET_ENCRYPT_US:g} us/value encrypt, <= {TARGET_RELATIVE_RMS:g} relative RMS. "
        f"Committee flood std {result.flood_std:.3g}: released RMS error "
        f"{result.released_rms_error:.3g}.",
    )
    table.add_column("scheme")
    for header, _, _ in _COLUMNS:
        table.add_column(header, justify="right")
    for row in result.rows:
        table.add_row(row.name, *(fmt.format(getattr(row, key)) for _, key, fmt in _COLUMNS))
    fedrec = result.row("fedrec")
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
    fedrec = result.row("fedrec")
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

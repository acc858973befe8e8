"""Shared plumbing of the ``fedrec`` command line, and the commands that need only ``common/``.

The CLI owns the terminal: it configures logging, draws progress bars and turns
:class:`~common.errors.FedrecError` into a one-line message and a non-zero exit. Each layer
registers its own commands: this module the data, key and ledger-audit commands
(:func:`add_common_commands`), :mod:`client.cli` the device's, :mod:`server.deploy.cli` the
deployment's, and :mod:`simulations.cli` the operator's, together with the console script's
parser and ``main``. Commands import their heavy modules (torch, flwr) lazily so
``fedrec --help`` is instant.

Every command module uses the same :data:`console` (stderr: status, progress, warnings) and
:data:`out` (stdout: results), sets a :data:`Handler` as the parser's ``handler`` default and
leaves errors and exit codes to :func:`run_handler`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from common.errors import FedrecError

__all__ = [
    "Handler",
    "Subparsers",
    "add_audit_commands",
    "add_common_commands",
    "add_data_commands",
    "add_keys_commands",
    "add_set_option",
    "configure_logging",
    "console",
    "out",
    "run_handler",
]

console = Console(stderr=True)
"""Status lines, progress bars, warnings and errors (stderr)."""
out = Console()
"""Results: tables, paths, JSON (stdout)."""

Handler = Callable[[argparse.Namespace], int]
"""A command: its parsed arguments in, the process exit code out."""

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What ``ArgumentParser.add_subparsers`` returns; commands are added to it."""


# ------------------------------------------------------------------------------------ plumbing


def configure_logging(verbosity: int) -> None:
    """Send log records to :data:`console`: WARNING by default, INFO with ``-v``, DEBUG with
    ``-vv``."""
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
    )


def run_handler(args: argparse.Namespace) -> int:
    """Run the command chosen by ``args`` (its ``handler``) and return the process exit code.

    A :class:`~common.errors.FedrecError` becomes one red line and exit code 2; Ctrl-C exit
    code 130. Any other exit code is the command's own.
    """
    handler: Handler = args.handler
    try:
        return handler(args)
    except FedrecError as err:
        console.print(
            f"fedrec: error: {err}", style="red", markup=False, highlight=False, soft_wrap=True
        )
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted")
        return 130


def add_set_option(p: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE`` (repeatable): a run-config override, collected in ``args.set``.

    Parameters
    ----------
    p
        The command's parser.
    example
        Shown at the end of the help text, e.g. ``"e.g. --set rounds=20"``.
    """
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a dotted config key (repeatable), {example}",
    )


# --------------------------------------------------------------------------------------- data


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from common.data import fetch_ml100k

    if args.name != "ml-100k":
        raise FedrecError(
            f"unknown data set {args.name!r}: only 'ml-100k' is embedded; other data sets are "
            "read from a path (GroupLens ml-100k/ml-1m/ml-20m folders, RecBole files, plain CSV)"
        )
    with console.status("fetching ml-100k"):
        path = fetch_ml100k(args.cache_dir)
    out.print(str(path))
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from common.data import dataset_stats, load_dataset

    with console.status(f"reading {args.dataset}"):
        ds = load_dataset(args.dataset, cache_dir=args.cache_dir, min_rating=args.min_rating)
    stats = dataset_stats(ds)
    if args.json:
        out.print_json(json.dumps(stats))
        return 0
    table = Table(title=f"{ds.name} ({ds.sha256[:12]})", show_header=False)
    for key, value in stats.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.6g}"
        table.add_row(str(key), str(value))
    out.print(table)
    return 0


def _cmd_data_export_split(args: argparse.Namespace) -> int:
    from common.data import export_split, load_dataset, split_strong_generalization

    with console.status(f"reading {args.dataset}"):
        ds = load_dataset(args.dataset, cache_dir=args.cache_dir, min_rating=args.min_rating)
        split = split_strong_generalization(ds, seed=args.seed)
        paths = export_split(split, ds, args.out)
    for path in paths:
        out.print(str(path))
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from common.data import synthesize

    with console.status(f"generating {args.users} users x {args.items} items"):
        path = synthesize(args.users, args.items, seed=args.seed, out_dir=args.out)
    out.print(str(path))
    return 0


# -------------------------------------------------------------------------------------- audit


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from common.privacy.audit import AuditStatus, render, verify_ledger

    path = Path(args.run_dir)
    ledger = path / "ledger.jsonl" if path.is_dir() else path
    if not ledger.is_file():
        raise FedrecError(f"{ledger}: no ledger (was the run made with privacy on?)")
    report = verify_ledger(ledger, budget=args.budget)
    if args.json:
        out.print_json(json.dumps(report.to_json()))
    else:
        out.print(render(report), markup=False, highlight=False)
    if report.status is AuditStatus.VERIFIED:
        return 0
    if report.status is AuditStatus.UNFINISHED:
        console.print(
            f"fedrec: unfinished: {report.reason}", markup=False, highlight=False, soft_wrap=True
        )
        return 3
    console.print(
        f"fedrec: audit failed: {report.reason}",
        style="red",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 1


# --------------------------------------------------------------------------------------- keys


def _cmd_keys_init(args: argparse.Namespace) -> int:
    from common.he import ParamSet, init_keys

    params = ParamSet(args.params).params
    with console.status(f"generating CKKS keys ({params.name})"):
        files = init_keys(args.out, params=params, force=args.force)
    out.print(f"fingerprint {files.value}")
    out.print(f"devices (secret key, keep private): {files.client}")
    out.print(f"server (no secret key):             {files.server}")
    return 0


# ------------------------------------------------------------------------------------- parser


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, default=None, help="data cache ($FEDREC_DATA)")
    p.add_argument("--min-rating", type=float, default=4.0, help="ratings >= this are positives")


def add_data_commands(sub: Subparsers) -> None:
    """``fedrec data fetch|stats|export-split|synth``."""
    data = sub.add_parser("data", help="fetch, inspect, split and synthesize data sets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = dsub.add_parser("fetch", help="fetch an embedded data set into the cache")
    p.add_argument("name", help="data set name (ml-100k)")
    p.add_argument("--cache-dir", type=Path, default=None, help="data cache ($FEDREC_DATA)")
    p.set_defaults(handler=_cmd_data_fetch)

    p = dsub.add_parser("stats", help="counts, density, quantiles and what cleaning dropped")
    p.add_argument("dataset", help="ml-100k or a path to a data file or folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_data_options(p)
    p.set_defaults(handler=_cmd_data_stats)

    p = dsub.add_parser("export-split", help="write the exact split a run uses as CSV files")
    p.add_argument("dataset")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    _add_data_options(p)
    p.set_defaults(handler=_cmd_data_export_split)

    p = dsub.add_parser("synth", help="write a synthetic data set for scale tests")
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--items", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_data_synth)


def add_audit_commands(sub: Subparsers) -> Subparsers:
    """``fedrec audit verify``; returns the ``audit`` group so that other layers add their own
    audits to it (:mod:`simulations.cli` adds ``audit empirical``)."""
    audit = sub.add_parser("audit", help="verify a run's privacy ledger (for auditors)")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    p = asub.add_parser(
        "verify",
        help="check the ledger's hash chain and recompute epsilon (exit 0 verified, 1 failed, "
        "3 unfinished)",
    )
    p.add_argument("run_dir", help="run folder or ledger.jsonl")
    p.add_argument("--budget", type=float, default=None, help="epsilon the run must not exceed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_audit_verify)
    return asub


def add_keys_commands(sub: Subparsers) -> None:
    """``fedrec keys init``."""
    keys = sub.add_parser("keys", help="provision homomorphic-encryption (CKKS) keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = ksub.add_parser(
        "init", help="write client.ctx (secret, devices), server.ctx (public), fingerprint"
    )
    p.add_argument("--out", type=Path, required=True, metavar="KEYDIR", help="key folder")
    p.add_argument("--force", action="store_true", help="replace keys already in KEYDIR")
    p.add_argument(
        "--params", default="fedrec", choices=["fedrec", "flare-default"], help="CKKS parameters"
    )
    p.set_defaults(handler=_cmd_keys_init)


def add_common_commands(sub: Subparsers) -> Subparsers:
    """Every command of this module: ``data ...``, ``audit verify`` and ``keys init``.

    Returns the ``audit`` group (see :func:`add_audit_commands`). :mod:`simulations.cli` calls
    the three ``add_*_commands`` one by one instead, to interleave the other layers' commands in
    the order ``fedrec --help`` lists them.
    """
    add_data_commands(sub)
    audit = add_audit_commands(sub)
    add_keys_commands(sub)
    return audit

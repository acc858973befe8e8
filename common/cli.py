"""Shared plumbing of the ``fedrec`` command line, and the commands that need only ``common/``.

(Over 400 lines: the shared CLI plumbing and the commands of the ground floor, one parser tree.)

The CLI owns the terminal: it configures logging, draws progress bars and turns
:class:`~common.errors.FedrecError` into a one-line message and a non-zero exit. Each layer
registers its own commands: this module the data, key and ledger-audit commands
(:func:`add_common_commands`), :mod:`client.cli` the device's, :mod:`server.deploy.cli` the
deployment's, and :mod:`simulations.cli` the operator's, together with the console script's
parser and ``main``. Commands import their heavy modules (torch, flwr) lazily so
``fedrec --help`` is instant.

Every command module uses the same :data:`console` (stderr: status, progress, warnings) and
:data:`out` (stdout: results), sets a :data:`Handler` as the parser's ``handler`` default and
leaves errors and exit codes to :func:`run_handler` (:class:`ExitCode`). Rich redraws a bar or
a spinner only on a terminal: off one (CI logs, ``2>&1 | tee``) a long command prints plain lines
(:func:`interactive`, :func:`note`, :func:`activity`).

The ``fedrec`` parser is a :class:`CommandParser`; ``add_subparsers`` makes every subcommand's
parser one too, so each shows its defaults in ``--help`` and takes ``-v`` after the subcommand.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from common.errors import FedrecError

__all__ = [
    "CACHE_DIR_HELP",
    "EXIT_CODES_HELP",
    "CommandParser",
    "ExitCode",
    "Handler",
    "HelpFormatter",
    "Subparsers",
    "activity",
    "add_audit_commands",
    "add_common_commands",
    "add_data_commands",
    "add_keys_commands",
    "add_set_option",
    "configure_logging",
    "console",
    "interactive",
    "note",
    "out",
    "positive_int",
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


class ExitCode(enum.IntEnum):
    """The exit codes of ``fedrec`` (listed by ``fedrec --help``)."""

    OK = 0
    """The command did what was asked."""
    FAILED = 1
    """Verification failed (``audit verify`` only)."""
    USAGE = 2
    """Bad input or usage: a wrong option or value, a missing or unreadable file, a bad config."""
    UNFINISHED = 3
    """The run is not finished (``audit verify``: no final ledger line)."""
    INTERNAL = 4
    """An unexpected internal error (a bug): one line, the traceback with ``-vv``."""
    INTERRUPTED = 130
    """Ctrl-C."""
    TERMINATED = 143
    """SIGTERM (``client join``)."""


EXIT_CODES_HELP = """exit codes:
  0    ok
  1    verification failed (audit verify only)
  2    bad input or usage (options, files, config)
  3    unfinished (audit verify: the run has no final line)
  4    internal error (a bug; -vv shows the traceback)
  130  interrupted (143: terminated)"""
"""The ``fedrec --help`` epilog: :class:`ExitCode` for users."""


# -------------------------------------------------------------------------------------- parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with each option's default (``(default: 0)``) where it has a telling one.

    Left out: no default (``None``, a flag's ``False``, an empty list), a required option, and a
    help text that already says its default.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or not action.option_strings
            or action.required
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or isinstance(action, argparse._CountAction | argparse._VersionAction)
            or (isinstance(default, list | tuple) and not default)
        ):
            return action.help
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class _Subcommands(argparse._SubParsersAction):
    """Subcommands whose ``-v`` counts add up with the command line's earlier ones.

    argparse parses a subcommand into a fresh namespace and copies it over the caller's, so
    ``fedrec -v simulate -v`` would count 1; this action adds the counts (2). A subcommand's
    ``help`` is also its ``--help`` description.
    """

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if "help" in kwargs:
            kwargs.setdefault("description", kwargs["help"])
        parser: argparse.ArgumentParser = super().add_parser(name, **kwargs)
        return parser

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        before = int(getattr(namespace, "verbose", 0) or 0)
        if hasattr(namespace, "verbose"):
            delattr(namespace, "verbose")
        super().__call__(parser, namespace, values, option_string)
        namespace.verbose = before + int(getattr(namespace, "verbose", 0) or 0)


class CommandParser(argparse.ArgumentParser):
    """An ``argparse`` parser for ``fedrec``: it shows defaults in ``--help``
    (:class:`HelpFormatter`), accepts ``-v/--verbose`` (counted into ``verbose``) and passes
    both on to the parsers of its subcommands, which ``add_subparsers`` makes of this class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Subcommands)
        self.add_argument(
            "-v",
            "--verbose",
            action="count",
            default=argparse.SUPPRESS,
            help="more log output: -v info, -vv debug and tracebacks (before or after the command)",
        )


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1 (else a usage error, exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


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


_PATH_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
)
"""OSErrors about a path the user gave: a usage error (exit code 2), not a bug."""


def run_handler(args: argparse.Namespace) -> int:
    """Run the command chosen by ``args`` (its ``handler``) and return the process exit code.

    A :class:`~common.errors.FedrecError`, or an OSError about a path (missing, existing, not
    allowed, not a folder), becomes one red line and exit code 2; Ctrl-C exit code 130. Any other
    exception is a bug: one ``internal error`` line and exit code 4, its traceback only with
    ``-vv`` (``args.verbose >= 2``). Any other exit code is the command's own (:class:`ExitCode`).
    """
    handler: Handler = args.handler
    try:
        return handler(args)
    except FedrecError as err:
        _error(f"fedrec: error: {err}")
        return ExitCode.USAGE
    except _PATH_ERRORS as err:
        _error(f"fedrec: error: {_path_error(err)}")
        return ExitCode.USAGE
    except KeyboardInterrupt:
        console.print("[yellow]interrupted")
        return ExitCode.INTERRUPTED
    except Exception as err:
        verbose = int(getattr(args, "verbose", 0) or 0)
        if verbose >= 2:
            console.print(
                "".join(traceback.format_exception(err)).rstrip(), markup=False, highlight=False
            )
        hint = "" if verbose >= 2 else "; run with -vv for the traceback"
        message = str(err).splitlines()[0] if str(err) else ""
        _error(f"fedrec: internal error: {type(err).__name__}: {message}{hint}")
        return ExitCode.INTERNAL


def _error(line: str) -> None:
    console.print(line, style="red", markup=False, highlight=False, soft_wrap=True)


def _path_error(err: OSError) -> str:
    """``PATH: reason`` (``SRC -> DST: reason`` for a rename) for an OSError about a path."""
    reason = err.strerror or str(err)
    if err.filename is None:
        return str(err)
    where = str(err.filename)
    if err.filename2 is not None:
        where += f" -> {err.filename2}"
    return f"{where}: {reason}"


# ---------------------------------------------------------------------------- plain progress


def interactive() -> bool:
    """Whether stderr is a terminal, where rich redraws progress bars and spinners; off one (a
    CI log, ``2>&1 | tee``) commands print :func:`note` lines instead."""
    return console.is_terminal


def note(line: str) -> None:
    """One plain line on stderr (no markup), e.g. a round's progress off a terminal."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


@contextmanager
def activity(message: str) -> Iterator[Callable[[str], None]]:
    """A spinner showing ``message`` on a terminal, else one :func:`note` line.

    Yields a function that reports the next step: it updates the spinner, or prints a line.
    """
    if interactive():
        with console.status(message) as status:
            yield status.update
    else:
        note(message)
        yield note


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
    from common.data.fetch import EMBEDDED_DATASETS, fetch_dataset

    if args.name not in EMBEDDED_DATASETS:
        known = ", ".join(repr(name) for name in EMBEDDED_DATASETS)
        raise FedrecError(
            f"unknown data set {args.name!r}: the embedded ones are {known}; other data sets "
            "are read from a path (GroupLens ml-100k/ml-1m/ml-20m folders, RecBole files, NCF "
            ".rating files, plain CSV)"
        )
    with console.status(f"fetching {args.name}"):
        path = fetch_dataset(args.name, args.cache_dir)
    out.print(str(path))
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from common.data import dataset_stats, load_dataset

    with console.status(f"reading {args.dataset}"):
        ds = load_dataset(
            args.dataset, cache_dir=args.cache_dir, min_rating=args.min_rating, strict=args.strict
        )
    stats = dataset_stats(ds)
    if args.json:
        out.print_json(json.dumps(stats))
        return 0
    table = Table(title=ds.name, show_header=False)
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold")  # long values wrap, never cut with an ellipsis
    for key, value in stats.items():
        if key not in ("sha256", "cleaning"):
            table.add_row(str(key), _stat(value))
    out.print(table)
    out.print(_cleaning_table(stats["cleaning"]))
    # on a line of its own, so that no table width cuts it: it identifies the file
    out.print(f"sha256 {ds.sha256}", markup=False, highlight=False, soft_wrap=True)
    return 0


def _cleaning_table(cleaning: dict[str, Any]) -> Table:
    """``data stats``' cleaning report: each reason found with its count and first lines."""
    from common.data.types import BAD_ROW_REASONS

    table = Table(title="cleaning", show_header=False)
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("rows read", str(cleaning["rows_read"]))
    found = {r: b for r, b in cleaning["bad_rows"].items() if b["count"]}
    if not found:
        table.add_row("bad rows", "none")
    for reason, bad in found.items():
        table.add_row(
            BAD_ROW_REASONS.get(reason, reason),
            f"{bad['count']} dropped (first {', '.join(bad['first'])})",
        )
    for key in ("below_threshold_dropped", "users_dropped", "rows_of_dropped_users"):
        table.add_row(key.replace("_", " "), str(cleaning[key]))
    table.add_row("id types", _stat(cleaning["id_types"]))
    return table


def _stat(value: Any) -> str:
    """A ``data stats`` value: ``k=v`` pairs for a mapping, 6 significant digits for a float."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_stat(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _cmd_data_export_split(args: argparse.Namespace) -> int:
    from common.data import export_split, load_dataset, split_strong_generalization

    with console.status(f"reading {args.dataset}"):
        ds = load_dataset(
            args.dataset, cache_dir=args.cache_dir, min_rating=args.min_rating, strict=args.strict
        )
        try:
            split = split_strong_generalization(
                ds, seed=args.seed, n_heldout_users=args.n_heldout_users
            )
        except ValueError as err:  # too few users for the held-out users asked for
            raise FedrecError(
                f"{args.dataset}: {err}; choose fewer with --n-heldout-users"
            ) from None
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
    with activity(f"verifying {ledger}") as step:
        report = verify_ledger(
            ledger,
            budget=args.budget,
            on_progress=step,
            partition=args.partition,
            device_keys=args.device_keys,
            device_ledger=args.device_ledger,
            require_signed=args.require_signed,
            server_key=args.server_key,
        )
    if args.json:
        out.print_json(json.dumps(report.to_json()))
    else:
        out.print(render(report), markup=False, highlight=False)
    if report.status is AuditStatus.VERIFIED:
        return ExitCode.OK
    if report.status is AuditStatus.UNFINISHED:
        note(f"fedrec: unfinished: {report.reason}")
        return ExitCode.UNFINISHED
    _error(f"fedrec: audit failed: {report.reason}")
    return ExitCode.FAILED


# --------------------------------------------------------------------------------------- keys


def _cmd_keys_init(args: argparse.Namespace) -> int:
    from common.he import ParamSet, init_keys

    params = ParamSet(args.params).params
    with console.status(f"generating CKKS keys ({params.name})"):
        files = init_keys(args.out, params=params, force=args.force)
    out.print(f"fingerprint {files.value}")
    out.print(f"devices (secret key, keep private): {files.client}")
    out.print(f"server (no secret key):             {files.server}")
    out.print("single-key mode: whoever holds client.ctx can read every update")
    return 0


def _cmd_keys_ceremony(args: argparse.Namespace) -> int:
    from common.he import ParamSet
    from common.he.ceremony import run_local
    from common.he.keys import fingerprint_of
    from common.he.shares import Transcript, is_threshold, save_share, write_public

    threshold = args.threshold if args.threshold is not None else args.holders // 2 + 1
    if not args.holders / 2 < threshold <= args.holders:
        raise FedrecError(
            f"--threshold must be more than half of --holders ({args.holders}) and at most "
            f"--holders, got {threshold}"
        )
    if is_threshold(args.out) and not args.force:
        raise FedrecError(f"{args.out} already holds a threshold key; use --force to replace it")
    params = ParamSet.THRESHOLD.params
    with console.status(f"key ceremony: {args.holders} holders, threshold {threshold}"):
        done = run_local(params, holders=args.holders, threshold=threshold)
    fingerprint = fingerprint_of(done.context)
    transcript = Transcript(
        ceremony_id=done.plan.ceremony_id,
        seed=done.plan.seed.hex(),
        holders=done.plan.holders,
        threshold=threshold,
        fingerprint=fingerprint,
        commitments={share.index: share.digest() for share in done.shares},
    )
    write_public(args.out, context=done.context, params=params, transcript=transcript)
    for share in done.shares:
        save_share(
            args.out / "holders" / str(share.index), share, ceremony_id=transcript.ceremony_id
        )
    out.print(f"fingerprint {fingerprint}  ({threshold}-of-{args.holders}, {params.name})")
    out.print(f"public (server and every sender): {args.out}")
    out.print(f"shares (one per holder, owner-only): {args.out / 'holders'}/<1..{args.holders}>")
    out.print(
        "this ran every holder in one process (to try the scheme and its share files); a run "
        "makes its own key among its devices"
    )
    return 0


def _cmd_keys_share(args: argparse.Namespace) -> int:
    import json as _json

    from common.he.shares import load_share, load_transcript

    transcript = load_transcript(args.public) if args.public is not None else None
    share = load_share(args.folder, transcript=transcript)
    used = None
    ledger = Path(args.folder) / "decryptions.json"
    if ledger.exists():
        used = int(_json.loads(ledger.read_text()).get("decrypted", 0))
    info = {
        "index": share.index,
        "holders": list(share.holders),
        "threshold": share.threshold,
        "params": share.params.name,
        "fingerprint": share.fingerprint,
        "digest": share.digest(),
        "checked_against_ceremony": transcript is not None,
        "ciphertexts_decrypted": used,
    }
    if args.json:
        out.print_json(data=info)
        return 0
    out.print(
        f"holder {share.index} of {len(share.holders)} (threshold {share.threshold}), key "
        f"{share.fingerprint[:16]}..., share digest {share.digest()[:16]}..."
    )
    if transcript is not None:
        out.print("matches the ceremony's commitment")
    if used is not None:
        out.print(f"ciphertexts decrypted so far: {used}")
    return 0


# ------------------------------------------------------------------------------------- parser


CACHE_DIR_HELP = "data cache (default: $FEDREC_DATA, else ~/.cache/fedrec)"
"""The help text of every command's ``--cache-dir``."""

STRICT_HELP = (
    "refuse the data file at its first bad row, naming its file and line (default: drop bad "
    "rows and count them by reason in the cleaning report)"
)
"""The help text of every command's ``--strict``."""


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, default=None, help=CACHE_DIR_HELP)
    p.add_argument("--min-rating", type=float, default=4.0, help="ratings >= this are positives")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)


def add_data_commands(sub: Subparsers) -> None:
    """``fedrec data fetch|stats|export-split|synth``."""
    data = sub.add_parser("data", help="fetch, inspect, split and synthesize data sets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = dsub.add_parser("fetch", help="fetch an embedded data set into the cache")
    p.add_argument("name", help="data set name: ml-100k, ml-1m or pinterest-20")
    p.add_argument("--cache-dir", type=Path, default=None, help=CACHE_DIR_HELP)
    p.set_defaults(handler=_cmd_data_fetch)

    p = dsub.add_parser("stats", help="counts, density, quantiles and what cleaning dropped")
    p.add_argument("dataset", help="ml-100k, ml-1m, pinterest-20 or a data file or folder")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON (stdout)")
    _add_data_options(p)
    p.set_defaults(handler=_cmd_data_stats)

    p = dsub.add_parser("export-split", help="write the exact split a run uses as CSV files")
    p.add_argument("dataset", help="ml-100k, ml-1m, pinterest-20 or a data file or folder")
    p.add_argument("--out", type=Path, required=True, help="folder for the CSV files")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (a run's seed)")
    p.add_argument(
        "--n-heldout-users",
        type=positive_int,
        default=None,
        help="validation and test users each (a run's data.n_heldout_users; default: 100 up "
        "to 2,000 users, else 10%%)",
    )
    _add_data_options(p)
    p.set_defaults(handler=_cmd_data_export_split)

    p = dsub.add_parser("synth", help="write a synthetic data set for scale tests")
    p.add_argument("--users", type=positive_int, required=True, help="number of users")
    p.add_argument("--items", type=positive_int, required=True, help="number of items")
    p.add_argument("--out", type=Path, required=True, help="folder for the data set")
    p.add_argument("--seed", type=int, default=0, help="random seed")
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
    p.add_argument("--json", action="store_true", help="print the report as JSON (stdout)")
    p.add_argument(
        "--partition",
        type=Path,
        default=None,
        help="the run's partition (RUN_DIR/data or its clients.npz): check the population",
    )
    p.add_argument(
        "--device-ledger",
        type=Path,
        default=None,
        help="a device's own record (HISTORY.csv.fedrec-ledger.json) to check against the ledger",
    )
    p.add_argument(
        "--device-keys",
        type=Path,
        default=None,
        help="registered device keys (default: RUN_DIR/signing/devices.json when present)",
    )
    p.add_argument(
        "--require-signed", action="store_true", help="fail a ledger without server signatures"
    )
    p.add_argument(
        "--server-key",
        default=None,
        metavar="HEX",
        help="the server's ledger key as the operator gave it: the header's must be it",
    )
    p.set_defaults(handler=_cmd_audit_verify)
    return asub


def add_keys_commands(sub: Subparsers) -> None:
    """``fedrec keys init|ceremony|share``."""
    keys = sub.add_parser("keys", help="provision homomorphic-encryption (CKKS) keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = ksub.add_parser(
        "ceremony",
        help="threshold mode: make a collective key and one share per holder, in this process",
    )
    p.add_argument("--out", type=Path, required=True, metavar="KEYDIR", help="public folder")
    p.add_argument("--holders", type=int, default=5, help="key holders (default 5)")
    p.add_argument(
        "--threshold", type=int, default=None, help="shares needed (default: a majority)"
    )
    p.add_argument("--force", action="store_true", help="replace a key already in KEYDIR")
    p.set_defaults(handler=_cmd_keys_ceremony)
    p = ksub.add_parser("share", help="threshold mode: check a holder's share and show it")
    p.add_argument("folder", type=Path, metavar="HOLDER_DIR", help="folder with share.json")
    p.add_argument(
        "--public", type=Path, default=None, metavar="KEYDIR", help="check it against this key"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_cmd_keys_share)
    p = ksub.add_parser(
        "init",
        help="single-key mode: write client.ctx (secret, every device), server.ctx (public)",
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

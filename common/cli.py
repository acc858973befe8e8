"""The ``fedrec`` command line: one console script, one subcommand per task.

The CLI owns the terminal: it configures logging, draws progress bars and turns
:class:`~common.errors.FedrecError` into a one-line message and a non-zero exit. Commands import
their heavy modules (torch, flwr) lazily so ``fedrec --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from common.cli_deploy import add_client_commands, add_deploy_commands
from common.errors import FedrecError

__all__ = ["main"]

console = Console(stderr=True)
out = Console()

Handler = Callable[[argparse.Namespace], int]


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


# ------------------------------------------------------------------------------ train-central


def _cmd_train_central(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from common.config import apply_overrides, parse
    from simulations.central import CentralConfig, run_central

    raw: dict[str, Any] = {"dataset": args.dataset, "model": args.model, "seed": args.seed}
    if args.epochs is not None:
        raw["epochs"] = args.epochs
    if args.cache_dir is not None:
        raw["cache_dir"] = str(args.cache_dir)
    cfg = parse(CentralConfig, apply_overrides(raw, args.set))
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(cfg.model.value, total=cfg.epochs, info="")

        def on_epoch(epoch: int, total: int, m: dict[str, float]) -> None:
            info = f"loss {m['loss']:.2f}  val NDCG@100 {m['ndcg@100']:.4f} (best {m['best']:.4f})"
            progress.update(task, completed=epoch, info=info)

        result = run_central(cfg, args.out, on_epoch=on_epoch)
    table = Table(title=f"{cfg.model.value} on {cfg.dataset} (seed {cfg.seed})")
    table.add_column("split")
    keys = list(result.test)
    for key in keys:
        table.add_column(key, justify="right")
    for name, metrics in (("validation", result.validation), ("test", result.test)):
        table.add_row(name, *(f"{metrics[k]:.4f}" for k in keys))
    out.print(table)
    out.print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


# ---------------------------------------------------------------------------------- recommend


def _cmd_recommend(args: argparse.Namespace) -> int:
    from client.recommend import parse_history, recommend

    history = parse_history(args.history)
    result = recommend(Path(args.model), history, k=args.k)
    if result.unknown_ids:
        shown = ", ".join(result.unknown_ids[:10])
        more = "" if len(result.unknown_ids) <= 10 else f" (+{len(result.unknown_ids) - 10} more)"
        console.print(f"[yellow]skipped {len(result.unknown_ids)} unknown item ids: {shown}{more}")
    if args.json:
        payload = {
            "items": [
                {"item_id": r.item_id, "title": r.title, "score": r.score} for r in result.items
            ],
            "unknown_ids": result.unknown_ids,
        }
        out.print_json(json.dumps(payload))
        return 0
    table = Table(title=f"top {len(result.items)} for a history of {result.known_history} items")
    table.add_column("#", justify="right")
    table.add_column("item_id")
    table.add_column("title")
    table.add_column("score", justify="right")
    for rank, r in enumerate(result.items, start=1):
        table.add_row(str(rank), r.item_id, r.title, f"{r.score:.3f}")
    out.print(table)
    return 0


# ----------------------------------------------------------------------------------- simulate


def _cmd_simulate(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from common.runconfig import load_run_config
    from simulations.report import write_report
    from simulations.runner import (
        central_reference,
        finish_results,
        prepare_run,
        resume_config,
        simulate,
    )

    if args.resume is not None:
        run_dir = Path(args.resume)
        cfg = resume_config(run_dir)
        from common.rundata import n_clients_of

        n_clients = n_clients_of(run_dir)
    else:
        if args.out is None:
            raise FedrecError("simulate needs --out RUN_DIR (or --resume RUN_DIR)")
        run_dir = Path(args.out)
        if (run_dir / "results.json").exists() and not args.force:
            raise FedrecError(
                f"{run_dir} already holds a run: use --resume {run_dir} to continue it, "
                "or --force to start over"
            )
        cfg = load_run_config(args.config, args.set)
        if args.force and run_dir.exists():
            for name in (
                "server_state.pt",
                "progress.jsonl",
                "results.json",
                "rounds.csv",
                "ledger.jsonl",
            ):
                (run_dir / name).unlink(missing_ok=True)
        with console.status("preparing data and clients"):
            n_clients = prepare_run(cfg, run_dir, cache_dir=args.cache_dir)
    console.print(f"{cfg.name}: {n_clients} clients, {cfg.rounds} rounds -> {run_dir}")
    from common.rundata import client_sizes
    from server.dp import plan_privacy

    with console.status("planning the privacy budget"):
        try:
            plan = plan_privacy(cfg, n_clients, silo_sizes=client_sizes(run_dir))
        except ValueError as err:
            raise FedrecError(f"privacy: {err}") from None
    if plan is not None:
        console.print(
            f"{plan.mode.value}-level DP: clip {plan.clip}, "
            f"noise multiplier {plan.noise_multiplier:.4g}, "
            f"q {plan.sample_rate:.4g} x {plan.steps_per_round} steps/round, delta {plan.delta:.3g}"
            + (f", target epsilon {plan.target_epsilon}" if plan.target_epsilon else "")
        )
    else:
        console.print("[yellow]privacy.mode = 'off': updates carry no differential privacy")
    columns = (
        TextColumn("[bold]round {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("rounds", total=cfg.rounds, info="starting Flower")
        last_ndcg = "–"

        def on_event(event: dict[str, Any]) -> None:
            nonlocal last_ndcg
            kind = event.get("event")
            if kind == "start":
                progress.update(
                    task, completed=event.get("resumed_after", 0), info="waiting for client nodes"
                )
            elif kind == "nodes":
                progress.update(task, info=f"{event['registered']} nodes registered")
            elif kind == "round":
                if event.get("ndcg@100") is not None:
                    last_ndcg = f"{event['ndcg@100']:.4f}"
                info = (
                    f"sampled {event['sampled']} returned {event['returned']} "
                    f"failed {event['failed'] + event['dropped']}  NDCG@100 {last_ndcg}"
                )
                if event.get("epsilon") is not None:
                    info += f"  ε {event['epsilon']:.3g}"
                progress.update(task, completed=event["round"], info=info)

        outcome = simulate(run_dir, n_clients, cfg, on_event=on_event)
    reference = None
    if cfg.reference:
        with console.status("training the centralized reference on the same split"):
            reference = central_reference(cfg, run_dir, cache_dir=args.cache_dir)
    finish_results(run_dir, wall_seconds=outcome.wall_seconds, reference=reference)
    report = write_report(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    table = Table(title=f"{cfg.name}: test metrics after {cfg.rounds} rounds")
    table.add_column("model")
    for key in ("ndcg@100", "recall@20", "recall@50"):
        table.add_column(key, justify="right")
    final = results["final"]["test"]
    table.add_row("federated", *(f"{final[k]:.4f}" for k in ("ndcg@100", "recall@20", "recall@50")))
    if reference is not None:
        ref = reference["test"]
        table.add_row(
            reference["label"], *(f"{ref[k]:.4f}" for k in ("ndcg@100", "recall@20", "recall@50"))
        )
    out.print(table)
    privacy = results["final"].get("privacy")
    if privacy:
        out.print(
            f"privacy: epsilon {privacy['epsilon']:.4g} (PRV; RDP {privacy['epsilon_rdp']:.4g}) "
            f"at delta {privacy['delta']:.3g}; ledger: {run_dir / 'ledger.jsonl'}"
        )
    out.print(f"wall time {outcome.wall_seconds:.1f} s; report: {report}")
    return 0


# -------------------------------------------------------------------------------------- audit


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from common.audit import AuditStatus, render, verify_ledger

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


def _cmd_audit_empirical(args: argparse.Namespace) -> int:
    import math
    import tempfile

    from common.privacy import default_delta
    from common.runconfig import PrivacyMode, load_run_config
    from common.rundata import prepare_run_data
    from server.dp import plan_privacy
    from simulations.audit_empirical import run_audit

    cfg = load_run_config(args.config, args.set)
    population = args.population
    if population is None:
        with console.status("preparing the population"), tempfile.TemporaryDirectory() as tmp:
            population = prepare_run_data(cfg, Path(tmp), cache_dir=args.cache_dir).n_clients
    if cfg.privacy.mode is not PrivacyMode.CLIENT:
        raise FedrecError("audit empirical needs privacy.mode = 'client' (set it with --set)")
    try:
        plan = plan_privacy(cfg, population)
    except ValueError as err:
        raise FedrecError(f"privacy: {err}") from None
    assert plan is not None
    table = Table(
        title=f"one-run audit: {cfg.name}, N={population}, {cfg.rounds} rounds, "
        f"q={plan.sample_rate}, {args.canaries} canaries, 95% confidence"
    )
    for col in ("mode", "z", "claimed ε", "empirical ε ≥", "guesses", "correct", "accuracy"):
        table.add_column(col, justify="right")
    for label, z in (("DP off", 0.0), ("DP on", plan.noise_multiplier)):
        with console.status(f"auditing {label}"):
            res = run_audit(
                noise_multiplier=z,
                clip=plan.clip,
                sample_rate=plan.sample_rate,
                rounds=cfg.rounds,
                population=population,
                delta=plan.delta if plan.delta else default_delta(population),
                canaries=args.canaries,
                seed=cfg.seed,
            )
        claimed = "∞" if math.isinf(res.claimed_epsilon) else f"{res.claimed_epsilon:.3f}"
        table.add_row(
            label,
            f"{z:.3g}",
            claimed,
            f"{res.epsilon_lower_bound:.3f}",
            str(res.r),
            str(res.v),
            f"{res.accuracy:.3f}",
        )
    out.print(table)
    return 0


# ---------------------------------------------------------------------------------- keys, bench


def _cmd_keys_init(args: argparse.Namespace) -> int:
    from common.he import ParamSet, init_keys

    params = ParamSet(args.params).params
    with console.status(f"generating CKKS keys ({params.name})"):
        files = init_keys(args.out, params=params, force=args.force)
    out.print(f"fingerprint {files.value}")
    out.print(f"devices (secret key, keep private): {files.client}")
    out.print(f"server (no secret key):             {files.server}")
    return 0


def _cmd_bench_he(args: argparse.Namespace) -> int:
    from common.io import atomic_write_json
    from simulations.bench_he import BenchHEConfig, render, run_bench, to_json

    try:
        cfg = BenchHEConfig(values=args.values, updates=args.updates, seed=args.seed)
    except ValueError as err:
        raise FedrecError(f"bench he: {err}") from None
    with console.status(f"encrypting {cfg.updates} x {cfg.values:,} values with each scheme"):
        result = run_bench(cfg)
    # rich falls back to 80 columns off a terminal, which wraps every cell of this table
    (out if out.is_terminal else Console(width=120)).print(render(result))
    if args.json is not None:
        atomic_write_json(args.json, to_json(result))
        out.print(f"wrote {args.json}")
    return 0


# ------------------------------------------------------------------------------------- parser


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, default=None, help="data cache ($FEDREC_DATA)")
    p.add_argument("--min-rating", type=float, default=4.0, help="ratings >= this are positives")


def _add_set_option(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a dotted config key (repeatable), {example}",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedrec",
        description="Federated, privacy-preserving recommendations (Mult-VAE on Flower).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    p = sub.add_parser("train-central", help="train a recommender centrally (the reference)")
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument(
        "--model", default="multvae", choices=["multvae", "multdae", "ease", "popularity"]
    )
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None)
    _add_set_option(p, "e.g. --set dims=[200,64] --set lr=0.001")
    p.set_defaults(handler=_cmd_train_central)

    p = sub.add_parser("simulate", help="run a federated simulation (Flower, Ray backend)")
    p.add_argument("--config", type=Path, default=None, help="run config TOML")
    p.add_argument("--out", type=Path, default=None, help="run folder")
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue a stopped run from its last complete round",
    )
    p.add_argument("--force", action="store_true", help="start over in an existing run folder")
    p.add_argument("--cache-dir", type=Path, default=None)
    _add_set_option(p, "e.g. --set rounds=20 --set server.optimizer=fedadam")
    p.set_defaults(handler=_cmd_simulate)

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

    p = asub.add_parser(
        "empirical",
        help="one-run canary audit (Steinke, Nasr, Jagielski 2023): empirical epsilon lower bound",
    )
    p.add_argument("--config", type=Path, required=True, help="run config TOML")
    _add_set_option(p, "e.g. --set privacy.target_epsilon=4")
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument(
        "--population",
        type=int,
        default=None,
        help="clients (default: prepared from the config's data)",
    )
    p.add_argument("--cache-dir", type=Path, default=None)
    p.set_defaults(handler=_cmd_audit_empirical)

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

    bench = sub.add_parser("bench", help="benchmarks that print numbers")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    p = bsub.add_parser("he", help="encrypted aggregation: fedrec vs FLARE default vs plaintext")
    p.add_argument("--values", type=int, default=200_000, help="values per update")
    p.add_argument("--updates", type=int, default=10, help="updates summed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write JSON")
    p.set_defaults(handler=_cmd_bench_he)

    p = sub.add_parser("recommend", help="recommend for one history, on this device")
    p.add_argument("--model", required=True, help="path to model.pt")
    p.add_argument("--history", required=True, help="file of item ids, or comma-separated ids")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_recommend)

    add_deploy_commands(sub)  # fedrec deploy ..., fedrec client join (common/cli_deploy.py)
    add_client_commands(sub)
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedrec`` command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
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


if __name__ == "__main__":
    sys.exit(main())

"""The ``fedrec`` console script: its parser, ``main``, and the operator's commands.

The top of the layers: :func:`build_parser` gathers every layer's commands (:mod:`common.cli`:
``data``, ``audit verify``, ``keys``; :mod:`client.cli`: ``recommend``, ``client join``;
:mod:`server.deploy.cli`: ``deploy``) and adds the ones that drive simulations and benchmarks
from this package: ``simulate``, ``train-central``, ``bench he`` and ``audit empirical`` (into
the ``audit`` group that :mod:`common.cli` creates). ``python -m simulations.cli`` is the same as
``fedrec``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from client.cli import add_client_commands
from common.cli import (
    Subparsers,
    add_audit_commands,
    add_data_commands,
    add_keys_commands,
    add_set_option,
    configure_logging,
    console,
    out,
    run_handler,
)
from common.errors import FedrecError
from server.deploy.cli import add_deploy_commands

__all__ = ["build_parser", "main"]


# ------------------------------------------------------------------------------------ handlers


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


def _cmd_simulate(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from common.run.config import load_run_config
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
        from common.run.folder import n_clients_of

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
    from common.privacy import plan_privacy
    from common.run.folder import client_sizes

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


def _cmd_audit_empirical(args: argparse.Namespace) -> int:
    import math
    import tempfile

    from common.privacy import default_delta, plan_privacy
    from common.run.config import PrivacyMode, load_run_config
    from common.run.folder import prepare_run_data
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


# -------------------------------------------------------------------------------------- parser


def _add_train_central(sub: Subparsers) -> None:
    p = sub.add_parser("train-central", help="train a recommender centrally (the reference)")
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument(
        "--model", default="multvae", choices=["multvae", "multdae", "ease", "popularity"]
    )
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None)
    add_set_option(p, "e.g. --set dims=[200,64] --set lr=0.001")
    p.set_defaults(handler=_cmd_train_central)


def _add_simulate(sub: Subparsers) -> None:
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
    add_set_option(p, "e.g. --set rounds=20 --set server.optimizer=fedadam")
    p.set_defaults(handler=_cmd_simulate)


def _add_audit_empirical(audit: Subparsers) -> None:
    p = audit.add_parser(
        "empirical",
        help="one-run canary audit (Steinke, Nasr, Jagielski 2023): empirical epsilon lower bound",
    )
    p.add_argument("--config", type=Path, required=True, help="run config TOML")
    add_set_option(p, "e.g. --set privacy.target_epsilon=4")
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument(
        "--population",
        type=int,
        default=None,
        help="clients (default: prepared from the config's data)",
    )
    p.add_argument("--cache-dir", type=Path, default=None)
    p.set_defaults(handler=_cmd_audit_empirical)


def _add_bench(sub: Subparsers) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print numbers")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    p = bsub.add_parser("he", help="encrypted aggregation: fedrec vs FLARE default vs plaintext")
    p.add_argument("--values", type=int, default=200_000, help="values per update")
    p.add_argument("--updates", type=int, default=10, help="updates summed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write JSON")
    p.set_defaults(handler=_cmd_bench_he)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``fedrec`` subcommand, in the order ``--help`` lists them."""
    parser = argparse.ArgumentParser(
        prog="fedrec",
        description="Federated, privacy-preserving recommendations (Mult-VAE on Flower).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_commands(sub)
    _add_train_central(sub)
    _add_simulate(sub)
    _add_audit_empirical(add_audit_commands(sub))  # audit verify (common), audit empirical
    add_keys_commands(sub)
    _add_bench(sub)
    add_client_commands(sub)  # recommend, client join
    add_deploy_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedrec`` command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return run_handler(args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``fedrec`` console script: its parser, ``main``, and the operator's commands.

(Over 400 lines: the operator's commands and the console script of every layer.)

The top of the layers: :func:`build_parser` gathers every layer's commands (:mod:`common.cli`:
``data``, ``audit verify``, ``keys``; :mod:`client.cli`: ``recommend``, ``client join``;
:mod:`server.deploy.cli`: ``deploy``) and adds the ones that drive simulations and benchmarks
from this package: ``simulate``, ``train-central``, ``bench he``, ``report fairness`` and
``audit empirical`` (into the ``audit`` group that :mod:`common.cli` creates).
``python -m simulations.cli`` is the same as ``fedrec``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rich.console import Console
from rich.table import Table

from client.cli import add_client_commands
from common.cli import (
    CACHE_DIR_HELP,
    EXIT_CODES_HELP,
    STRICT_HELP,
    CommandParser,
    Subparsers,
    activity,
    add_audit_commands,
    add_data_commands,
    add_keys_commands,
    add_set_option,
    configure_logging,
    console,
    interactive,
    note,
    out,
    positive_int,
    run_handler,
)
from common.errors import FedrecError
from server.deploy.cli import add_deploy_commands

if TYPE_CHECKING:
    from common.run.config import RunConfig

__all__ = ["build_parser", "main"]


# ------------------------------------------------------------------------------------ handlers


CENTRAL_KEYS = {
    "model.kind": "model",
    "model.dims": "dims",
    "model.dropout": "dropout",
    "model.beta_cap": "beta_cap",
    "model.anneal_steps": "anneal_steps",
    "data.dataset": "dataset",
    "data.min_rating": "min_rating",
    "data.n_heldout_users": "n_heldout_users",
    "data.strict": "strict",
}
"""``train-central --set`` keys laid out as in a run config (``model.dims`` as in ``simulate``),
and the fields of :class:`~simulations.central.CentralConfig` they set."""

_DEPRECATED_CENTRAL_KEYS = {
    flat: dotted
    for dotted, flat in CENTRAL_KEYS.items()
    if flat not in ("model", "dataset")  # also --model and --dataset: not deprecated
}
"""Old flat ``train-central --set`` keys (``dims``) and the run config keys replacing them."""


def _central_sets(sets: list[str]) -> list[str]:
    """``train-central``'s ``--set`` items, each old flat key (``dims``) renamed to its run
    config key (``model.dims``) with a deprecation warning."""
    renamed = []
    for item in sets:
        key, sep, value = item.partition("=")
        dotted = _DEPRECATED_CENTRAL_KEYS.get(key.strip())
        if dotted is not None and sep:
            console.print(
                f"[yellow]fedrec: warning: --set {key.strip()}=... is deprecated, use "
                f"--set {dotted}=... (the key of a run config)",
                highlight=False,
            )
            item = f"{dotted}={value}"
        renamed.append(item)
    return renamed


def _epoch_info(m: dict[str, float], sep: str = "  ") -> str:
    return f"loss {m['loss']:.2f}{sep}val NDCG@100 {m['ndcg@100']:.4f} (best {m['best']:.4f})"


def _cmd_train_central(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from common.config import load_config
    from common.data.loading import EMBEDDED
    from common.data.readers import detect_source
    from simulations.central import CentralConfig, run_central

    raw: dict[str, Any] = {"dataset": args.dataset, "model": args.model, "seed": args.seed}
    if args.epochs is not None:
        raw["epochs"] = args.epochs
    if args.cache_dir is not None:
        raw["cache_dir"] = str(args.cache_dir)
    if args.strict:
        raw["strict"] = True
    cfg = load_config(CentralConfig, None, _central_sets(args.set), base=raw, aliases=CENTRAL_KEYS)
    if cfg.dataset not in EMBEDDED:
        detect_source(Path(cfg.dataset).expanduser())  # a missing data set: no bar, one line
    if not interactive():  # no redrawn bar off a terminal: one plain line per epoch
        note(f"{cfg.model.value} on {cfg.dataset}: up to {cfg.epochs} epochs -> {args.out}")
        started = time.monotonic()

        def on_epoch_line(epoch: int, total: int, m: dict[str, float]) -> None:
            nonlocal started
            now = time.monotonic()
            note(f"epoch {epoch}/{total}: {_epoch_info(m, sep=', ')}, {now - started:.1f} s")
            started = now

        result = run_central(cfg, args.out, on_epoch=on_epoch_line)
    else:
        # a spinner while the data is read (and EASE/popularity fit); the bar from epoch 1, so
        # that an error in the data never leaves an "epoch 0/200" bar above it
        status = console.status(f"reading {cfg.dataset}, training {cfg.model.value}")
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("epoch {task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        task: TaskID | None = None

        def on_epoch(epoch: int, total: int, m: dict[str, float]) -> None:
            nonlocal task
            if task is None:
                status.stop()
                progress.start()
                task = progress.add_task(cfg.model.value, total=total, info="")
            progress.update(task, completed=epoch, info=_epoch_info(m))

        status.start()
        try:
            result = run_central(cfg, args.out, on_epoch=on_epoch)
        finally:
            status.stop()
            progress.stop()
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

    from common.config import locate_error
    from common.errors import ConfigError
    from common.run.config import load_run_config
    from simulations.report import write_report
    from simulations.report.fairness import fairness_summary
    from simulations.runner import (
        central_reference,
        claim_run_dir,
        finish_results,
        prepare_run,
        resume_config,
        simulate,
    )

    if args.resume is not None:
        if args.set or args.config is not None:
            raise FedrecError(
                "--resume continues a run with its own config.toml; --set/--config are not applied"
            )
        run_dir = Path(args.resume)
        lock = claim_run_dir(run_dir, resume=True)  # refuses a run that is still writing
        cfg = resume_config(run_dir)
        from common.run.folder import n_clients_of

        n_clients = n_clients_of(run_dir)
    else:
        if args.out is None:
            raise FedrecError("simulate needs --out RUN_DIR (or --resume RUN_DIR)")
        run_dir = Path(args.out)
        sets = [*args.set, "data.strict=true"] if args.strict else args.set
        cfg = load_run_config(args.config, sets)
        if args.config is None:
            note(f"no --config: using the built-in defaults ({_summary(cfg)})")
        if cfg.privacy.mode.value != "off" and cfg.privacy.target_epsilon is not None:
            from common.privacy.plan import check_target_epsilon

            try:  # before anything is written; the full calibration needs the prepared clients
                check_target_epsilon(
                    target_epsilon=cfg.privacy.target_epsilon, delta=cfg.privacy.delta
                )
            except ValueError as err:
                raise FedrecError(f"privacy: {err}") from None
        lock = claim_run_dir(run_dir, force=args.force)  # refuses a folder in use or holding a run
        with activity("preparing data and clients"):
            try:  # checks the data before writing; --force clears an old run's outputs then
                n_clients = prepare_run(cfg, run_dir, cache_dir=args.cache_dir, force=args.force)
            except ConfigError as err:  # a value the data refuses: name its file line or --set
                raise locate_error(err, args.config, args.set) from None
    note(f"{cfg.name}: {n_clients} clients, {cfg.rounds} rounds -> {run_dir}")
    note(f"per-round log: {run_dir / 'simulation.log'}")
    from common.privacy import plan_privacy
    from common.run.folder import client_sizes

    with activity("planning the privacy budget"):
        try:
            plan = plan_privacy(cfg, n_clients, silo_sizes=client_sizes(run_dir))
        except ValueError as err:
            raise FedrecError(f"privacy: {err}") from None
    if plan is not None:
        target_text = f", target epsilon {plan.target_epsilon}" if plan.target_epsilon else ""
        if plan.release_noise_multipliers:
            zs = " and ".join(f"{z:.4g}" for z in plan.release_noise_multipliers)
            note(
                f"warm start: 2 releases from every client (popularity, co-occurrence), clip 1, "
                f"noise multipliers {zs}, delta {plan.delta:.3g}{target_text}"
            )
        if plan.rounds:
            note(
                f"{plan.mode.value}-level DP rounds: clip {plan.clip}, "
                f"noise multiplier {plan.noise_multiplier:.4g}, "
                f"q {plan.sample_rate:.4g} x {plan.steps_per_round} steps/round, "
                f"delta {plan.delta:.3g}{target_text}"
            )
        if cfg.privacy.noise_seed is not None:
            console.print(
                f"[yellow]privacy.noise_seed = {cfg.privacy.noise_seed}: the DP noise is seeded, "
                "so this run repeats exactly and is NOT private (simulations only)"
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
    plain = not interactive()  # rich redraws its bar on a terminal only: plain lines elsewhere
    if plain:
        note("starting Flower")
    with Progress(*columns, console=console, disable=plain) as progress:
        warm = 2 if cfg.warm_start.enabled else 0  # the warm start's releases, then the rounds
        task = progress.add_task(
            "warm start + rounds" if warm else "rounds",
            total=cfg.rounds + warm,
            info="starting Flower",
        )
        last_ndcg = "–"

        def on_event(event: dict[str, Any]) -> None:
            nonlocal last_ndcg
            kind = event.get("event")
            if plain and kind in ("start", "nodes", "round", "warm_start"):
                note(_event_line(event, cfg.rounds))
            if plain and kind == "nodes" and warm:
                note("warm start: every client sends its popularity, then its co-occurrence")
            if kind == "start":
                resumed = int(event.get("resumed_after") or 0)
                progress.update(
                    task,
                    completed=resumed + (warm if resumed else 0),
                    info="waiting for client nodes",
                )
            elif kind == "nodes":
                info = f"{event['registered']} nodes registered"
                if warm:
                    info += "; warm start: popularity, then co-occurrence, from every client"
                progress.update(task, info=info)
            elif kind == "warm_start":
                test = event.get("test") or {}
                if test.get("ndcg@100") is not None:
                    last_ndcg = f"{test['ndcg@100']:.4f}"
                progress.update(task, completed=warm, info=f"warm start NDCG@100 {last_ndcg}")
            elif kind == "round":
                if event.get("ndcg@100") is not None:
                    last_ndcg = f"{event['ndcg@100']:.4f}"
                info = (
                    f"sampled {event['sampled']} returned {event['returned']} "
                    f"failed {event['failed'] + event['dropped']}  NDCG@100 {last_ndcg}"
                )
                info += _epsilon_text(event, "ε")
                progress.update(task, completed=event["round"] + warm, info=info)

        outcome = simulate(
            run_dir, n_clients, cfg, on_event=on_event, ray_address=args.ray_address, lock=lock
        )
    reference = None
    if cfg.reference:
        with activity("training the centralized reference on the same split"):
            reference = central_reference(cfg, run_dir, cache_dir=args.cache_dir)
    finish_results(run_dir, wall_seconds=outcome.wall_seconds, reference=reference)
    report = write_report(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    out.print(results_table(results, name=cfg.name, rounds=cfg.rounds))
    if results.get("fairness"):
        out.print(fairness_summary(results["fairness"]))
    final = results["final"]["test"]
    baselines = results.get("baselines") or {}
    pop = (baselines.get("popularity") or {}).get("test", {}).get("ndcg@100")
    if pop:
        out.print(f"NDCG@100 federated / popularity: {final['ndcg@100'] / pop:.1%}")
    privacy = results["final"].get("privacy")
    if privacy:
        target = cfg.privacy.target_epsilon
        releases = privacy.get("release_noise_multipliers") or {}
        mechanism = (
            f"rounds: noise multiplier {privacy['noise_multiplier']:.4g}, clip "
            f"{privacy['clip']:g}, q {privacy['sample_rate']:.4g}"
            if cfg.rounds
            else "no rounds"
        )
        if releases:
            zs = " and ".join(f"{z:.4g}" for z in releases.values())
            mechanism = f"warm start: noise multipliers {zs}, clip 1, q 1; {mechanism}"
        aggregator = privacy.get("epsilon_aggregator")
        out.print(
            f"privacy: epsilon {privacy['epsilon']:.4g} (PRV; RDP {privacy['epsilon_rdp']:.4g})"
            + (f" of target {target:g}" if target is not None else "")
            + f" at delta {privacy['delta']:.3g}"
            + ("" if aggregator is None else f"; against the aggregator {aggregator:.4g}")
            + f"; {mechanism}; ledger: {run_dir / 'ledger.jsonl'} "
            f"(check it: fedrec audit verify {run_dir})"
        )
    out.print(f"wall time {outcome.wall_seconds:.1f} s; report: {report}")
    lock.release()
    return 0


_METRIC_KEYS = ("ndcg@100", "recall@20", "recall@50", "coverage@20")


def results_table(results: dict[str, Any], *, name: str, rounds: int) -> Table:
    """The final table of ``simulate``: test metrics of the federated model beside the warm
    start's (when the run began with one), the baselines and the centralized reference.

    With a warm start the table has an ``ε`` column: the epsilon spent after the warm start's
    releases on its row and after the whole run on the federated row (the baselines are not
    private). A run with no rounds has a single model row, the warm start's.
    """
    warm = results.get("warm_start") or {}
    final = (results.get("final") or {}).get("test") or {}
    if warm and rounds == 0:
        title = f"{name}: test metrics of the warm start alone, 0 rounds (same test users)"
    elif warm:
        title = f"{name}: test metrics after the warm start and {rounds} rounds (same test users)"
    else:
        title = f"{name}: test metrics after {rounds} rounds (same test users)"
    table = Table(title=title)
    table.add_column("model")
    for key in _METRIC_KEYS:
        table.add_column(key, justify="right")
    table.add_column("federated / model", justify="right")
    if warm:
        table.add_column("ε", justify="right")
    releases = warm.get("releases") or []
    release_epsilon = _epsilon_cell(releases[-1] if releases else {}, "epsilon_accountant")
    run_epsilon = _epsilon_cell((results.get("final") or {}).get("privacy") or {}, "accountant")
    rows: list[tuple[str, dict[str, Any], str]] = []
    if warm and rounds == 0:
        rows.append(("warm start only (federated, 0 rounds)", final, release_epsilon))
    else:
        rows.append(("federated", final, run_epsilon))
        if warm:
            rows.append(
                ("warm start only (before round 1)", warm.get("test") or {}, release_epsilon)
            )
    baselines = results.get("baselines") or {}
    for key in ("popularity", "ease"):
        if baselines.get(key):
            rows.append((baselines[key]["label"], baselines[key]["test"], "–"))
    reference = results.get("reference")
    if reference:
        rows.append((reference["label"], reference["test"], "–"))
    for label, test, epsilon in rows:
        ratio = "" if test is final or not test.get("ndcg@100") or "ndcg@100" not in final else (
            f"{final['ndcg@100'] / test['ndcg@100']:.1%}"
        )  # fmt: skip
        cells = [f"{test[k]:.4f}" if k in test else "–" for k in _METRIC_KEYS]
        table.add_row(label, *cells, ratio, *([epsilon] if warm else []))
    return table


def _epsilon_cell(record: dict[str, Any], accountant_key: str) -> str:
    """``epsilon`` of a ledger record or privacy summary with its accountant: ``7.94 (PRV)``."""
    epsilon = record.get("epsilon")
    if epsilon is None:
        return "–"
    accountant = record.get(accountant_key)
    return f"{epsilon:.4g}" + (f" ({str(accountant).upper()})" if accountant else "")


def _summary(cfg: RunConfig) -> str:
    """What a run config runs, in a few words (for ``simulate`` without ``--config``)."""
    encryption = "on" if cfg.encryption.enabled else "off"
    return (
        f"{cfg.data.dataset}, {cfg.data.partition.value} clients, {cfg.rounds} rounds, "
        f"privacy {cfg.privacy.mode.value}, encryption {encryption}; "
        "shipped configs: simulations/configs/*.toml"
    )


def _epsilon_text(event: dict[str, Any], symbol: str) -> str:
    """The round's epsilon, naming its accountant: RDP every round, PRV where computed."""
    if event.get("epsilon_rdp") is None:
        return ""
    text = f"  {symbol} {event['epsilon_rdp']:.3g} (RDP)"
    if event.get("epsilon_prv") is not None:
        text += f", {event['epsilon_prv']:.3g} (PRV)"
    return text


def _event_line(event: dict[str, Any], total: int) -> str:
    """One plain progress line for a ``progress.jsonl`` event (``simulate`` off a terminal)."""
    kind = event.get("event")
    if kind == "start":
        resumed = event.get("resumed_after", 0)
        after = f" (resuming after round {resumed})" if resumed else ""
        return f"waiting for client nodes{after}"
    if kind == "nodes":
        return f"{event['registered']} nodes registered"
    if kind == "warm_start":
        if event.get("error"):
            return f"warm start failed: {event['error']}"
        test = event.get("test") or {}
        ndcg = test.get("ndcg@100")
        return f"warm start: {event.get('vocabulary_size')} items, rank {event.get('rank')}" + (
            "" if ndcg is None else f", NDCG@100 {ndcg:.4f}"
        )
    parts = [f"{event['returned']}/{event['sampled']} returned"]
    lost = int(event.get("failed") or 0) + int(event.get("dropped") or 0)
    if lost:
        parts.append(f"{lost} failed")
    if event.get("refused"):
        parts.append(f"{event['refused']} refused")
    if event.get("ndcg@100") is not None:
        parts.append(f"NDCG@100 {event['ndcg@100']:.4f}")
    if event.get("epsilon_rdp") is not None:
        parts.append(_epsilon_text(event, "epsilon").strip())
    if event.get("seconds") is not None:
        parts.append(f"{float(event['seconds']):.1f} s")
    return f"round {event['round']}/{total}: " + ", ".join(parts)


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
    if args.out is not None:
        atomic_write_json(args.out, to_json(result))
    if args.json:  # like every --json: the result as JSON on stdout, no table
        out.print_json(json.dumps(to_json(result)))
    else:
        # rich falls back to 80 columns off a terminal, which wraps every cell of this table
        (out if out.is_terminal else Console(width=120)).print(render(result))
    if args.out is not None:
        note(f"wrote {args.out}")
    return 0


# -------------------------------------------------------------------------------------- parser


def _cmd_report_fairness(args: argparse.Namespace) -> int:
    from common.io import atomic_write_json
    from simulations.baselines import fit_baselines
    from simulations.fairness import fairness_of_run
    from simulations.report import write_report
    from simulations.report.fairness import fairness_tables
    from simulations.report.results import load_results
    from simulations.runner import model_labels

    run_dir = Path(args.run)
    results = load_results(run_dir)
    fairness = results.get("fairness")
    if not fairness or args.recompute:
        if not (run_dir / "model.pt").is_file():
            raise FedrecError(f"{run_dir / 'model.pt'}: not found (the run saved no model)")
        with activity(f"measuring {run_dir}'s models per user group"):
            fitted = fit_baselines(run_dir)
            fairness = fairness_of_run(
                run_dir,
                baselines=fitted,
                labels=model_labels(results),
                adversary=(results.get("config") or {}).get("fairness"),
                seed=args.seed,
            )
        results["fairness"] = fairness
        atomic_write_json(run_dir / "results.json", results)
        write_report(run_dir)
    if args.json:
        sys.stdout.write(json.dumps(fairness, indent=2) + "\n")
        return 0
    out = Console()
    for table in fairness_tables(fairness or {}, metric=args.metric):
        out.print(table)
    return 0


def _add_report(sub: Subparsers) -> None:
    report = sub.add_parser("report", help="what a finished run did, in detail")
    rsub = report.add_subparsers(dest="report", required=True, metavar="WHAT")
    p = rsub.add_parser(
        "fairness",
        help="accuracy per user group, exposure, genre calibration and the attacker's AUC",
    )
    p.add_argument("run", metavar="RUN", help="a finished run folder (fedrec simulate --out)")
    p.add_argument("--json", action="store_true", help="print results.json's fairness as JSON")
    p.add_argument(
        "--metric",
        choices=("ndcg@100", "recall@20"),
        default="ndcg@100",
        help="the per-group metric of the tables",
    )
    p.add_argument(
        "--recompute",
        action="store_true",
        help="measure again (and rewrite results.json and report.html) even if measured",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the attacker")
    p.set_defaults(handler=_cmd_report_fairness)


def _add_train_central(sub: Subparsers) -> None:
    p = sub.add_parser("train-central", help="train a recommender centrally (the reference)")
    p.add_argument(
        "--dataset", default="ml-100k", help="ml-100k, ml-1m, pinterest-20 or a data file or folder"
    )
    p.add_argument(
        "--model",
        default="multvae",
        choices=["multvae", "multdae", "ease", "popularity"],
        help="recommender to train",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument(
        "--epochs", type=positive_int, default=None, help="epoch cap (default: 200, early stop)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the training")
    p.add_argument("--cache-dir", type=Path, default=None, help=CACHE_DIR_HELP)
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    add_set_option(
        p,
        "keys laid out as in a run config, e.g. --set model.dims=[200,64] --set lr=0.001; "
        "model.kind/dims/dropout/beta_cap/anneal_steps, data.min_rating/n_heldout_users/strict, "
        "epochs, patience, batch_size, lr, weight_decay, ease_lambda",
    )
    p.set_defaults(handler=_cmd_train_central)


def _add_simulate(sub: Subparsers) -> None:
    p = sub.add_parser("simulate", help="run a federated simulation (Flower, Ray backend)")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="run config TOML, e.g. simulations/configs/ml100k.toml (default: the built-in "
        "defaults, which it says it uses)",
    )
    p.add_argument("--out", type=Path, default=None, help="run folder")
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue a stopped run from its last complete round",
    )
    p.add_argument("--force", action="store_true", help="start over in an existing run folder")
    p.add_argument("--cache-dir", type=Path, default=None, help=CACHE_DIR_HELP)
    p.add_argument("--strict", action="store_true", help=STRICT_HELP + " (data.strict = true)")
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="HOST:PORT",
        help="run on this existing Ray cluster, left running afterwards (default: "
        "simulation.ray_address, else a local Ray for this run; 'local' forces one); "
        "every node must see the run folder",
    )
    add_set_option(p, "e.g. --set rounds=20 --set server.optimizer=fedadam")
    p.set_defaults(handler=_cmd_simulate)


def _add_audit_empirical(audit: Subparsers) -> None:
    p = audit.add_parser(
        "empirical",
        help="one-run canary audit (Steinke, Nasr, Jagielski 2023): empirical epsilon lower bound",
    )
    p.add_argument("--config", type=Path, required=True, help="run config TOML")
    add_set_option(p, "e.g. --set privacy.target_epsilon=4")
    p.add_argument(
        "--canaries", type=positive_int, default=1000, help="Dirac canary clients inserted"
    )
    p.add_argument(
        "--population",
        type=positive_int,
        default=None,
        help="clients (default: prepared from the config's data)",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help=CACHE_DIR_HELP)
    p.set_defaults(handler=_cmd_audit_empirical)


def _add_bench(sub: Subparsers) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print numbers")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    p = bsub.add_parser("he", help="encrypted aggregation: fedrec vs FLARE default vs plaintext")
    p.add_argument("--values", type=int, default=200_000, help="values per update")
    p.add_argument("--updates", type=int, default=10, help="updates summed")
    p.add_argument("--seed", type=int, default=0, help="seed of the random updates")
    p.add_argument("--json", action="store_true", help="print the result as JSON (stdout)")
    p.add_argument(
        "--out", type=Path, default=None, metavar="PATH", help="also write the JSON to PATH"
    )
    p.set_defaults(handler=_cmd_bench_he)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``fedrec`` subcommand, in the order ``--help`` lists them."""
    parser = CommandParser(
        prog="fedrec",
        description="Federated, privacy-preserving recommendations (Mult-VAE on Flower).",
        epilog=EXIT_CODES_HELP,
    )
    parser.set_defaults(verbose=0)
    parser.add_argument("--version", action="version", version=f"fedrec {_version()}")
    # every subcommand's parser is a CommandParser too: defaults in --help, -v after the command
    sub = cast(  # the subparsers are CommandParsers, which the commands take as ArgumentParsers
        Subparsers, parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    )
    add_data_commands(sub)
    _add_train_central(sub)
    _add_simulate(sub)
    _add_audit_empirical(add_audit_commands(sub))  # audit verify (common), audit empirical
    add_keys_commands(sub)
    _add_bench(sub)
    _add_report(sub)
    add_client_commands(sub)  # recommend, client join
    add_deploy_commands(sub)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("fedrec")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedrec`` command line; returns the process exit code (``fedrec --help`` lists
    them: :class:`common.cli.ExitCode`)."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return run_handler(args)


if __name__ == "__main__":
    sys.exit(main())

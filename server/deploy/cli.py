"""The networked deployment's commands: ``fedrec deploy certs|node-key|register|prepare|run|local``.

The operator makes certificates (:mod:`.certs`) and device keys, registers keys with the
SuperLink (:mod:`.operator`), prepares a run folder (:mod:`.provision`) and launches runs; a
device joins with its own history (``fedrec client join``, :mod:`client.cli`). ``fedrec deploy
local`` does all of it on this machine (:mod:`.loopback`) and prints what it cost; its default
run config is ``configs/local.toml`` next to this module. See the README, "Deploy".
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

from rich.table import Table

from common.cli import CACHE_DIR_HELP, Subparsers, add_set_option, console, out, positive_int
from common.errors import FedrecError

__all__ = ["DEFAULT_LOCAL_CONFIG", "add_deploy_commands"]

DEFAULT_LOCAL_CONFIG = Path(__file__).resolve().parent / "configs" / "local.toml"
"""The run config of ``fedrec deploy local`` without ``--config`` (shipped as package data)."""


# ------------------------------------------------------------------------------------ handlers


def _check_address(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise FedrecError(f"--superlink must be HOST:PORT, got {address!r}")


def _cmd_certs(args: argparse.Namespace) -> int:
    from server.deploy.certs import make_ca, make_server_cert

    ca = make_ca(args.out, days=args.days)
    server = make_server_cert(
        args.out, host=args.host, extra_names=tuple(args.name), days=args.days
    )
    out.print(
        f"CA (keep {ca.key.name} with the operator; give {ca.cert.name} to every device): {ca.cert}"
    )
    out.print(f"SuperLink certificate and key: {server.cert} {server.key}")
    return 0


def _cmd_node_key(args: argparse.Namespace) -> int:
    from server.deploy.certs import make_node_keys

    keys = make_node_keys(args.out, args.name)
    out.print(f"device (private, stays on the device): {keys.private_key}")
    out.print(f"operator (register it):                {keys.public_key}")
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from server.deploy.operator import Operator

    _check_address(args.superlink)
    with tempfile.TemporaryDirectory(prefix="fedrec-register-") as tmp:
        operator = Operator(Path(tmp), address=args.superlink, ca_cert=args.ca)
        node_id = operator.register_node(args.public_key, name=args.name)
    out.print(f"registered {args.public_key} as node {node_id}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from common.run.config import load_run_config
    from server.deploy.provision import prepare_deployment

    cfg = load_run_config(args.config, args.set)
    with console.status("preparing the run folder"):
        done = prepare_deployment(
            cfg, args.out, cache_dir=args.cache_dir, export_dir=args.export_clients
        )
    out.print(f"{done.run_dir}: {done.n_clients} clients, {done.n_items} items")
    for path in done.histories:
        out.print(f"  device history: {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from server.deploy.loopback import APP_DIR
    from server.deploy.operator import Operator

    _check_address(args.superlink)
    run_dir = Path(args.run_dir).resolve()
    if not (run_dir / "config.toml").is_file():
        raise FedrecError(f"{run_dir}: no config.toml (make it with `fedrec deploy prepare`)")
    operator = Operator(run_dir / "operator", address=args.superlink, ca_cert=args.ca)
    run_config = {"run-dir": str(run_dir), "config": str(run_dir / "config.toml")}
    with console.status(f"running {run_dir.name} on {args.superlink}"):
        result = operator.run_app(APP_DIR, run_config, timeout=args.timeout)
    out.print(f"run {result.run_id}: {result.status} in {result.seconds:.1f} s")
    out.print(f"ServerApp log: {result.log_path}")
    if not result.completed:  # exit code 1 is for failed verification only (ExitCode)
        raise FedrecError(
            f"run {result.run_id} did not complete ({result.status}): see {result.log_path}"
        )
    return 0


def _cmd_local(args: argparse.Namespace) -> int:
    from common.run.config import load_run_config
    from server.deploy.loopback import deploy_loopback
    from server.deploy.provision import check_deployable

    if args.clients < 2:
        raise FedrecError("--clients must be >= 2")
    sets = [*args.set, "data.partition=silos", f"data.n_silos={args.clients}"]
    if args.rounds is not None:
        sets.append(f"rounds={args.rounds}")
    cfg = load_run_config(args.config, sets)
    check_deployable(cfg)  # before anything starts: privacy.noise_seed is for simulations
    work = (
        Path(args.out) if args.out is not None else Path(tempfile.mkdtemp(prefix="fedrec-local-"))
    )
    encryption = "on" if cfg.encryption.enabled else "off"
    console.print(
        f"{cfg.name}: {args.clients} devices, {cfg.rounds} rounds, "
        f"privacy {cfg.privacy.mode.value}, encryption {encryption} -> {work}"
    )
    with console.status("SuperLink, devices and run on 127.0.0.1 (TLS, node authentication)"):
        result = deploy_loopback(
            cfg, work, cache_dir=args.cache_dir, budget=args.budget, timeout=args.timeout
        )
    table = Table(
        title=f"deploy local: run {result.run.run_id} {result.run.status}", show_header=False
    )
    rows: list[tuple[str, Any]] = [
        ("wall time (prepare to all stopped)", f"{result.wall_seconds:.1f} s"),
        ("SuperLink + devices online", f"{result.startup_seconds:.1f} s"),
        ("run (flwr run to finished)", f"{result.run.seconds:.1f} s"),
        ("rounds", len(result.rounds)),
        ("per round (mean)", f"{result.round_seconds:.2f} s"),
        ("per round", " ".join(f"{float(r['seconds']):.1f}" for r in result.rounds)),
        ("bytes to each device per round", _size(result.bytes_down_per_device)),
        ("bytes from each device per round", _size(result.bytes_up_per_device)),
        ("run folder (ledger, model)", str(result.run_dir)),
        ("device files", str(result.histories[0].parent.parent) if result.histories else "-"),
        ("logs", str(work / "logs")),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    out.print(table)
    if not result.run.completed:
        raise FedrecError(
            f"run {result.run.run_id} did not complete ({result.run.status}): see {work / 'logs'}"
        )
    return 0


def _size(n: float) -> str:
    if not math.isfinite(n):
        return "-"
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# -------------------------------------------------------------------------------------- parser


def add_deploy_commands(sub: Subparsers) -> None:
    """``fedrec deploy ...`` (``sub``: the top-level subparsers action)."""
    deploy = sub.add_parser("deploy", help="networked deployment: certificates, keys, runs")
    dsub = deploy.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")

    p = dsub.add_parser("certs", help="CA and the SuperLink's TLS certificate (ca.*, server.*)")
    p.add_argument("--out", type=Path, required=True, help="folder for the files")
    p.add_argument("--host", required=True, help="name or IP the devices dial (in the certificate)")
    p.add_argument("--name", action="append", default=[], help="another name or IP (repeatable)")
    p.add_argument("--days", type=float, default=365.0, help="validity in days")
    p.set_defaults(handler=_cmd_certs)

    p = dsub.add_parser("node-key", help="a device's authentication key pair (NAME, NAME.pub)")
    p.add_argument("--out", type=Path, required=True, help="folder for the key pair")
    p.add_argument("--name", required=True, help="file name of the private key")
    p.set_defaults(handler=_cmd_node_key)

    p = dsub.add_parser("register", help="register a device's public key with the SuperLink")
    p.add_argument("public_key", type=Path, metavar="KEY.pub", help="the device's public key")
    p.add_argument(
        "--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address"
    )
    p.add_argument("--ca", type=Path, required=True, help="CA certificate of the SuperLink")
    p.add_argument("--name", default=None, help="a label for the node")
    p.set_defaults(handler=_cmd_register)

    p = dsub.add_parser("prepare", help="the server's run folder (no client rows) from a config")
    p.add_argument("--config", type=Path, required=True, help="run config TOML")
    p.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run folder")
    p.add_argument(
        "--export-clients",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write each client's rows as DIR/device-K/history.csv (demos)",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help=CACHE_DIR_HELP)
    add_set_option(p, "e.g. --set data.n_silos=3")
    p.set_defaults(handler=_cmd_prepare)

    p = dsub.add_parser("run", help="launch a run on a SuperLink and follow it to its end")
    p.add_argument(
        "--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address"
    )
    p.add_argument("--ca", type=Path, required=True, help="CA certificate of the SuperLink")
    p.add_argument(
        "--run-dir", type=Path, required=True, help="absolute path on the server machine"
    )
    p.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds before the run is stopped"
    )
    p.set_defaults(handler=_cmd_run)

    p = dsub.add_parser(
        "local", help="SuperLink + N devices on 127.0.0.1 (TLS, auth), one run, measured"
    )
    p.add_argument("--clients", type=int, default=3, help="devices (each one silo of the data)")
    p.add_argument(
        "--rounds", type=positive_int, default=None, help="rounds (default: the config's)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="work folder (default: a new temp folder)"
    )
    p.add_argument("--config", type=Path, default=DEFAULT_LOCAL_CONFIG, help="run config TOML")
    p.add_argument("--budget", type=float, default=None, help="each device's epsilon budget")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the run")
    p.add_argument("--cache-dir", type=Path, default=None, help=CACHE_DIR_HELP)
    add_set_option(p, "e.g. --set encryption.enabled=false --set privacy.mode=off")
    p.set_defaults(handler=_cmd_local)

"""The device's commands: ``fedrec recommend`` and ``fedrec client join``.

Both run on the device with its own data: ``recommend`` scores one history with a model file
(:mod:`client.recommend`), ``client join`` makes this device an authenticated SuperNode of a
federation (:mod:`client.join`). :func:`add_client_commands` registers them;
:mod:`simulations.cli` builds the ``fedrec`` parser around them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from common.cli import Subparsers, console, out, positive_int
from common.errors import FedrecError

__all__ = ["add_client_commands"]


# ------------------------------------------------------------------------------------ handlers


def _cmd_recommend(args: argparse.Namespace) -> int:
    from client.recommend import parse_history, recommend
    from common.checkpoint import load_checkpoint

    history = parse_history(args.history)
    checkpoint = load_checkpoint(Path(args.model))
    catalogue = set(checkpoint.item_ids)
    unknown = [h for h in history if h not in catalogue]
    if len(unknown) == len(history):
        raise FedrecError(
            f"the model knows none of the {len(history)} history item ids "
            f"({_shown(unknown)}); give ids of {args.model}'s catalogue, or a file of them"
        )
    result = recommend(checkpoint, history, k=args.k)
    if result.unknown_ids:
        console.print(
            f"[yellow]skipped {len(result.unknown_ids)} unknown item ids: "
            f"{_shown(result.unknown_ids)}",
            highlight=False,
        )
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


def _shown(ids: list[str], limit: int = 10) -> str:
    more = "" if len(ids) <= limit else f" (+{len(ids) - limit} more)"
    return ", ".join(ids[:limit]) + more


def _cmd_join(args: argparse.Namespace) -> int:
    from client.join import JoinConfig, join

    try:
        cfg = JoinConfig(
            superlink=args.superlink,
            data=args.data,
            ca=args.ca,
            auth_key=args.auth_key,
            keys=args.keys,
            budget=args.budget,
            min_contributors=args.min_contributors,
            home=args.home,
            max_wait=args.max_wait if args.max_wait > 0 else None,
        )
    except ValueError as err:
        raise FedrecError(str(err)) from None
    code = join(cfg)
    if code not in (0, 130, 143):  # exit code 1 means "verification failed" (ExitCode)
        raise FedrecError(f"the SuperNode stopped with exit code {code} (its log is above)")
    return code


# -------------------------------------------------------------------------------------- parser


def add_client_commands(sub: Subparsers) -> None:
    """``fedrec recommend`` and ``fedrec client join`` (``sub``: the top-level subparsers)."""
    p = sub.add_parser("recommend", help="recommend for one history, on this device")
    p.add_argument("--model", required=True, help="path to model.pt")
    p.add_argument(
        "--history",
        required=True,
        metavar="FILE_OR_IDS",
        help="file of item ids (one a line, or a CSV with an item column), or comma-separated ids",
    )
    p.add_argument("-k", type=positive_int, default=10, help="how many items to recommend")
    p.add_argument("--json", action="store_true", help="print the items as JSON (stdout)")
    p.set_defaults(handler=_cmd_recommend)

    client = sub.add_parser("client", help="run this device as a federation member")
    csub = client.add_subparsers(dest="client_command", required=True, metavar="ACTION")
    p = csub.add_parser(
        "join", help="join a federation: an authenticated SuperNode with TLS (foreground)"
    )
    p.add_argument(
        "--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address"
    )
    p.add_argument(
        "--data", type=Path, required=True, metavar="HISTORY.csv", help="this device's history"
    )
    p.add_argument("--ca", type=Path, required=True, help="CA certificate of the SuperLink")
    p.add_argument(
        "--auth-key", type=Path, required=True, metavar="KEY", help="this device's private key"
    )
    p.add_argument(
        "--keys",
        type=Path,
        default=None,
        metavar="KEYDIR",
        help="key folder: threshold mode, this device's own; single-key mode, client.ctx's",
    )
    p.add_argument(
        "--min-contributors",
        type=int,
        default=2,
        metavar="N",
        help="as a key holder, never decrypt a sum of fewer senders (default 2)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="EPS",
        help="refuse to train past this epsilon",
    )
    p.add_argument(
        "--home",
        type=Path,
        default=None,
        help="Flower's folder for this node (default: HISTORY.csv.fedrec-node)",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=600.0,
        help="seconds to keep retrying a lost SuperLink (0: forever)",
    )
    p.set_defaults(handler=_cmd_join)

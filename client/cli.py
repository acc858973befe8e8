"""The device's commands: ``fedrec recommend`` and ``fedrec client join``.

Both run on the device with its own data: ``recommend`` scores one history with a model file
(:mod:`client.recommend`), ``client join`` makes this device an authenticated SuperNode of a
federation (:mod:`client.join`). :func:`add_client_commands` registers them;
:mod:`simulations.cli` builds the ``fedrec`` parser around them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from common.cli import Subparsers, console, out, positive_int
from common.errors import FedrecError

if TYPE_CHECKING:
    from client.recommend import Recommendation

__all__ = ["EXPLAIN_TOP", "add_client_commands"]

EXPLAIN_TOP = 3
"""History items ``fedrec recommend --explain`` names per recommendation unless told."""


# ------------------------------------------------------------------------------------ handlers


def _cmd_recommend(args: argparse.Namespace) -> int:
    from client.recommend import parse_history, provenance_line, recommend
    from common.checkpoint import load_checkpoint
    from common.fairness.rerank import RerankKind

    history = parse_history(args.history)
    checkpoint = load_checkpoint(Path(args.model))
    catalogue = set(checkpoint.item_ids)
    unknown = [h for h in history if h not in catalogue]
    if len(unknown) == len(history):
        raise FedrecError(
            f"the model knows none of the {len(history)} history item ids "
            f"({_shown(unknown)}); give ids of {args.model}'s catalogue, or a file of them"
        )
    if args.rerank is not None and not any(checkpoint.item_genres):
        raise FedrecError(f"{args.model} has no item genres; --rerank needs them")
    result = recommend(
        checkpoint,
        history,
        k=args.k,
        rerank=None if args.rerank is None else RerankKind(args.rerank),
        rerank_lambda=args.rerank_lambda,
        explain_top=_explain_top(args),
    )
    if result.unknown_ids:
        console.print(
            f"[yellow]skipped {len(result.unknown_ids)} unknown item ids: "
            f"{_shown(result.unknown_ids)}",
            highlight=False,
        )
    explaining = _explain_top(args) > 0
    title_of = dict(zip(checkpoint.item_ids, checkpoint.item_titles, strict=True))
    model_line = provenance_line(result.provenance)
    if args.json:
        payload: dict[str, Any] = {
            "model": model_line,
            "provenance": result.provenance or None,
            "items": [_item_json(r, title_of, explain=explaining) for r in result.items],
            "unknown_ids": result.unknown_ids,
        }
        if result.rerank is not None:
            payload["rerank"] = {
                "kind": result.rerank.kind.value,
                "lambda": result.rerank.lam,
                "history_mix": result.rerank.history_mix,
                "list_mix": result.rerank.list_mix,
                "miscalibration_before": result.rerank.kl_before,
                "miscalibration_after": result.rerank.kl_after,
            }
        out.print_json(json.dumps(payload))
        return 0
    table = Table(title=f"top {len(result.items)} for a history of {result.known_history} items")
    table.add_column("#", justify="right")
    table.add_column("item_id")
    table.add_column("title")
    table.add_column("score", justify="right")
    if explaining:
        table.add_column("because of (share)")
    for rank, r in enumerate(result.items, start=1):
        row = [str(rank), r.item_id, r.title, f"{r.score:.3f}"]
        if explaining:
            row.append(_because(r.because, title_of))
        table.add_row(*row)
    out.print(table)
    if result.rerank is not None:
        rr = result.rerank
        out.print(f"re-ranked: {rr.kind.value}, lambda {rr.lam:g}", highlight=False)
        out.print(f"list genres:    {_mix(rr.list_mix)}", highlight=False)
        out.print(f"history genres: {_mix(rr.history_mix)}", highlight=False)
        if rr.kl_before is not None and rr.kl_after is not None:
            out.print(
                f"miscalibration (KL, Steck 2018): {rr.kl_before:.3f} before, "
                f"{rr.kl_after:.3f} after re-ranking",
                highlight=False,
            )
    out.print(model_line, highlight=False, soft_wrap=True)
    return 0


def _explain_top(args: argparse.Namespace) -> int:
    """How many history items to name per recommendation: ``--explain-top`` implies
    ``--explain``, which names :data:`EXPLAIN_TOP`; 0 for neither."""
    if args.explain_top is not None:
        return int(args.explain_top)
    return EXPLAIN_TOP if args.explain else 0


def _item_json(r: Recommendation, title_of: dict[str, str], *, explain: bool) -> dict[str, Any]:
    item: dict[str, Any] = {"item_id": r.item_id, "title": r.title, "score": r.score}
    if explain:
        item["because"] = [
            {"item_id": h, "title": title_of.get(h, ""), "share": share} for h, share in r.because
        ]
    return item


def _because(because: list[tuple[str, float]], title_of: dict[str, str]) -> str:
    """``Title (id) 62%, ...`` for a table cell; ``-`` when no history item lifted the item."""
    if not because:
        return "-"
    return ", ".join(
        f"{title_of.get(h) or h}{f' ({h})' if title_of.get(h) else ''} {share:.0%}"
        for h, share in because
    )


def _mix(mix: dict[str, float], limit: int = 5) -> str:
    """The ``limit`` largest genres of a mix as ``Drama 40%, Comedy 25%, ...``."""
    shown = [f"{genre} {share:.0%}" for genre, share in list(mix.items())[:limit]]
    more = f" (+{len(mix) - limit} more)" if len(mix) > limit else ""
    return (", ".join(shown) or "no genres") + more


def _shown(ids: list[str], limit: int = 10) -> str:
    more = "" if len(ids) <= limit else f" (+{len(ids) - limit} more)"
    return ", ".join(ids[:limit]) + more


def _unit_float(text: str) -> float:
    """An ``argparse`` type: a number in [0, 1] (else a usage error, exit code 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value:g}")
    return value


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
    p.add_argument(
        "--rerank",
        choices=("diversity", "calibrated"),
        default=None,
        help="re-rank the model's best 100 items: diversity (MMR over genres) or calibrated to "
        "the history's genre mix (Steck 2018); needs a model with item genres",
    )
    p.add_argument(
        "--rerank-lambda",
        type=_unit_float,
        default=None,
        metavar="LAMBDA",
        help="the re-ranker's lambda in [0, 1]: diversity's weighs relevance (1: the model's "
        "order), calibrated's weighs calibration (0: the model's order) "
        "(default: client.recommend.RERANK_LAMBDA: 0.7 for diversity, 0.4 for calibrated)",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="name the history items that drove each recommendation most, with their share",
    )
    p.add_argument(
        "--explain-top",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"how many history items --explain names per recommendation; implies --explain "
        f"(default: {EXPLAIN_TOP})",
    )
    p.add_argument(
        "--json", action="store_true", help="print the items and the model's provenance as JSON"
    )
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

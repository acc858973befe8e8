"""Adversarial debiasing sweep: what an on-device adversary buys and costs, in process.

For each data set (its ``*-fair.toml`` config, or ``--config``), one run folder is prepared and
every adversary weight runs the federated Mult-VAE on it without DP or encryption, per user, in
the in-process engine (:func:`simulations.fastsim.run_inprocess`); weight 0 is the model without
an adversary head. Each point reports, on the same held-out users:

- test NDCG@100 (:func:`common.rounds.test_metrics`) and its relative cost against weight 0;
- the gender NDCG@100 gap, male minus female mean per-user NDCG@100, with bootstrap intervals
  and the users per group (:func:`common.fairness.groups.group_table`), on the test users and
  on validation + test users together (neither takes part in federated training);
- the AUC of an attacker who reads the attribute from the latent code ``mu`` of the validation
  and test users (:func:`common.fairness.attacker.attacker_auc`, 5-fold cross-validated
  logistic regression), with its chance level from shuffled labels;
- the AUC of the trained adversary heads themselves on the same users (:func:`head_auc`): far
  below the attacker's, the heads were fooled rather than the code cleaned.

The other ``[fairness]`` knobs (heads, objective, balance, speed) come from the config or
``--set fairness.KEY=VALUE`` and are recorded with each point; so does group re-weighting of
the local loss, which runs with or without the adversary (``--weights 0`` leaves it alone)::

    python -m simulations.sweep_fairness --datasets ml-1m --weights 0 --threads 1 \\
        --set 'fairness.reweight={F = 2.0, M = 1.0}' --out runs/fair-reweight

Writes ``OUT/fairness.json`` and prints a table::

    python -m simulations.sweep_fairness --datasets ml-100k ml-1m --weights 0 1 3 \\
        --out runs/fair
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from common.fairness.attacker import attacker_auc, attribute_classes, mann_whitney_auc
from common.fairness.groups import group_table
from common.fairness.metrics import per_user_metrics
from common.io import atomic_write_json
from common.model import build_model
from common.run.config import PrivacyMode, RunConfig, load_run_config, run_model_config
from common.run.folder import EvalData, load_eval_data, write_run_folder
from common.training import latent_codes, score_users
from simulations.fastsim import ClientEngine, run_inprocess

__all__ = ["DATASET_CONFIGS", "evaluate_point", "run_fairness_sweep"]

logger = logging.getLogger(__name__)

_CONFIGS = Path(__file__).parent / "configs"
DATASET_CONFIGS = {
    "ml-100k": _CONFIGS / "ml100k-fair.toml",
    "ml-1m": _CONFIGS / "ml1m-fair.toml",
}
"""The config each data set's points start from."""

_COMMON = ["reference=false", "encryption.enabled=false"]


def _point_config(base: RunConfig, weight: float) -> RunConfig:
    """``base`` with adversary weight ``weight`` (0: no adversary head), DP off."""
    fairness = (
        replace(base.fairness, adversary="")
        if weight == 0
        else replace(base.fairness, adversary_weight=weight)
    )
    privacy = replace(base.privacy, mode=PrivacyMode.OFF)
    return replace(base, fairness=fairness, privacy=privacy)


def _gap(values: np.ndarray, groups: np.ndarray, *, seed: int) -> dict[str, Any]:
    """Group table of ``values`` by gender plus the signed gap ``M - F``."""
    table = group_table(values, groups, seed=seed)
    out: dict[str, Any] = dict(table)
    means = {g: row["mean"] for g, row in table["groups"].items()}
    out["m_minus_f"] = means["M"] - means["F"] if {"F", "M"} <= set(means) else None
    return out


def head_auc(model: torch.nn.Module, x: sp.csr_matrix, labels: np.ndarray) -> float | None:
    """AUC of the trained adversary heads themselves (mean probability of the second class).

    Over the users of ``x`` whose ``labels`` (str, ``''`` unknown) are one of the two gender
    classes; ``None`` without a head. A head far below a fresh attacker has been fooled, not
    the code cleaned.
    """
    if getattr(model, "adversary", None) is None:
        return None
    known = np.isin(labels, ["F", "M"])
    if len(set(labels[known].tolist())) < 2:
        return None
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x[known].toarray().astype(np.float32)))
    assert out.adversary_logits is not None
    p = torch.softmax(out.adversary_logits, dim=-1)[..., 1]  # (n,) or (n, K)
    score = p.mean(dim=1) if p.dim() == 2 else p
    return mann_whitney_auc(score.numpy(), labels[known] == "M")


def evaluate_point(
    cfg: RunConfig,
    weights: dict[str, np.ndarray],
    data: EvalData,
    *,
    attribute: str,
    seed: int,
    permutations: int = 20,
) -> dict[str, Any]:
    """Per-group NDCG@100 and the attacker's AUC of one trained model (see the module doc)."""
    model = build_model(run_model_config(cfg, len(data.item_ids)))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    parts = {
        "test": (data.test_foldin, data.test_holdout, data.test_attributes),
        "validation": (data.validation_foldin, data.validation_holdout, data.validation_attributes),
    }
    ndcg: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for name, (foldin, holdout, attributes) in parts.items():
        scores = score_users(model, foldin)  # (U, I)
        scores[foldin.nonzero()] = -np.inf
        ndcg[name] = per_user_metrics(scores, holdout, foldin, genre_mat=None)["ndcg@100"]
        raw = attributes.get(attribute, np.full(foldin.shape[0], "", dtype=str))
        labels[name] = attribute_classes(attribute, raw)
    both = np.concatenate([labels["validation"], labels["test"]])
    held = sp.vstack([data.validation_foldin, data.test_foldin]).tocsr()
    z = latent_codes(model, held)
    return {
        "head_auc": head_auc(model, held, both) if attribute == "gender" else None,
        "gender_gap": _gap(ndcg["test"], labels["test"], seed=seed),
        "gender_gap_validation_and_test": _gap(
            np.concatenate([ndcg["validation"], ndcg["test"]]), both, seed=seed
        ),
        "attacker": attacker_auc(z, both, seed=seed, permutations=permutations),
    }


def run_fairness_sweep(
    configs: dict[str, Path],
    *,
    weights: list[float],
    out: Path,
    sets: list[str],
    rounds: int | None = None,
    permutations: int = 20,
) -> dict[str, Any]:
    """Run every weight on every data set (see the module docstring); returns ``fairness.json``."""
    results: dict[str, Any] = {"engine": "inprocess", "sets": sets, "datasets": {}}
    extra = [*_COMMON, *sets, *([f"rounds={rounds}"] if rounds else [])]
    for name, path in configs.items():
        base = load_run_config(path, extra)
        attribute = base.fairness.adversary or "gender"
        base = replace(base, fairness=replace(base.fairness, adversary=attribute))
        run_dir = out / name / "run"
        write_run_folder(base, run_dir)
        data = load_eval_data(run_dir)
        entry: dict[str, Any] = {"config": str(path), "attribute": attribute, "points": []}
        for weight in weights:
            cfg = _point_config(base, weight)
            t0 = time.perf_counter()
            result = run_inprocess(
                cfg, run_dir, out=out / name / f"weight-{weight:g}", engine=ClientEngine.AUTO
            )
            point: dict[str, Any] = {
                "adversary_weight": float(weight),
                "client_engine": result.client_engine.value,
                "rounds": cfg.rounds,
                "fairness": asdict(cfg.fairness),
                "test": result.final["test"],
                **evaluate_point(
                    cfg,
                    result.weights,
                    data,
                    attribute=attribute,
                    seed=cfg.seed,
                    permutations=permutations,
                ),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            entry["points"].append(point)
            logger.info(
                "%s weight %g: NDCG@100 %.4f, gap %s, attacker AUC %.4f, head AUC %s (%.0f s)",
                name,
                weight,
                point["test"]["ndcg@100"],
                point["gender_gap"]["m_minus_f"],
                point["attacker"]["auc"],
                point["head_auc"],
                point["seconds"],
            )
            results["datasets"][name] = entry
            atomic_write_json(out / "fairness.json", results)
    return results


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def _knobs(point: dict[str, Any]) -> str:
    """The head's settings of a point (``heads/objective/balance/speed/hidden``) and its group
    re-weighting (``reweight gender F2 M1``), or ``-`` for neither."""
    f = point.get("fairness") or {}
    parts = []
    if point["adversary_weight"] != 0 and f:
        balance = "bal" if f.get("adversary_balance") else "unbal"
        parts.append(
            f"{f.get('adversary_heads', 1)}h {f.get('adversary_objective', 'reverse')} {balance} "
            f"s{f.get('adversary_speed', 1.0):g} h{f.get('adversary_hidden', 64)}"
        )
    if f.get("reweight"):
        table = " ".join(f"{group}{weight:g}" for group, weight in f["reweight"])
        parts.append(f"reweight {f.get('reweight_attribute', 'gender')} {table}")
    return "; ".join(parts) or "-"


def table(results: dict[str, Any]) -> str:
    """The sweep as a Markdown table, one row per data set and weight."""
    head = [
        "data",
        "weight",
        "knobs",
        "NDCG@100",
        "cost",
        "gap M-F test (n F/M)",
        "gap M-F val+test (n F/M)",
        "attacker AUC (chance mean, p95)",
        "head AUC",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in results["datasets"].items():
        ref = next(
            (p["test"]["ndcg@100"] for p in entry["points"] if p["adversary_weight"] == 0), None
        )
        for p in entry["points"]:
            ndcg = p["test"]["ndcg@100"]
            cost = "" if ref is None else f"{(ref - ndcg) / ref:+.1%}"
            cells = [name, f"{p['adversary_weight']:g}", _knobs(p), f"{ndcg:.4f}", cost]
            for key in ("gender_gap", "gender_gap_validation_and_test"):
                g = p[key]
                n = "/".join(str(g["groups"].get(c, {}).get("n", 0)) for c in ("F", "M"))
                cells.append(f"{_fmt(g['m_minus_f'])} ({n})")
            a = p["attacker"]
            chance = a.get("chance", {})
            cells.append(
                f"{a['auc']:.4f} ({chance.get('mean', float('nan')):.3f}, "
                f"{chance.get('p95', float('nan')):.3f})"
            )
            head = p.get("head_auc")
            cells.append("" if head is None else f"{head:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the flags, run the sweep, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="*", default=[], choices=sorted(DATASET_CONFIGS))
    parser.add_argument("--config", type=Path, action="append", default=[], help="extra config")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    parser.add_argument("--rounds", type=int, default=None, help="override the configs' rounds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--permutations", type=int, default=20, help="shuffled-label attacks (chance level)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(w < 0 for w in args.weights):
        parser.error("--weights must be >= 0")
    configs = {name: DATASET_CONFIGS[name] for name in args.datasets}
    configs.update({path.stem: path for path in args.config})
    if not configs:
        parser.error("give --datasets or --config")
    results = run_fairness_sweep(
        configs,
        weights=args.weights,
        out=args.out,
        sets=args.set,
        rounds=args.rounds,
        permutations=args.permutations,
    )
    sys.stdout.write("attacker AUC: gender from the validation and test users' latent codes\n")
    sys.stdout.write(table(results))


if __name__ == "__main__":
    main()

"""The report and the ``simulate`` table of a run that began with a DP warm start."""

from __future__ import annotations

import copy
import html
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from simulations.cli import results_table
from simulations.report import epsilon_figure, write_report

POPULATION = 738
WARM_TEST = {"ndcg@100": 0.3618, "recall@20": 0.3027, "recall@50": 0.4457, "coverage@20": 0.0863}
BASELINES = {
    "split": {"test_users": 100, "train_users": POPULATION, "validation_users": 100},
    "popularity": {
        "label": "popularity",
        "test": {"ndcg@100": 0.2679, "recall@20": 0.1865, "recall@50": 0.3335, "coverage@20": 0.04},
    },
    "ease": {
        "label": "EASE (λ=200)",
        "lambda": 200.0,
        "validation_ndcg@100": {"100": 0.42, "200": 0.43},
        "test": {"ndcg@100": 0.4381, "recall@20": 0.3754, "recall@50": 0.5287, "coverage@20": 0.18},
    },
}


Z_POPULARITY, Z_COOCCURRENCE = 1.5606, 0.7803
"""The releases' z at popularity_share 0.2 (z_pop = 2 z_cooc); together one release at 0.6979."""
Z_WARM = 0.6979


def _release(name: str, rnd: int, epsilon: float, accountant: str, z: float) -> dict[str, Any]:
    return {
        "release": name,
        "round": rnd,
        "sample_rate": 1.0,
        "invited": POPULATION,
        "participated": POPULATION,
        "expected_participants": float(POPULATION),
        "clip": 1.0,
        "noise_multiplier": z,
        "effective_noise_multiplier": z,
        "steps": 1,
        "released": True,
        "epsilon": epsilon,
        "epsilon_accountant": accountant,
        "epsilon_rdp": epsilon + 0.5,
    }


def _warm_only() -> dict[str, Any]:
    """A warm start and no training round: what ``fastsim`` writes with ``rounds = 0``."""
    warm = {
        "rank": 8,
        "scale": 100.0,
        "alpha": 1.0,
        "validation_ndcg@100": 0.3557,
        "vocabulary_size": 451,
        "noise_multipliers": {"popularity": Z_POPULARITY, "cooccurrence": Z_COOCCURRENCE},
        "values_per_client": 1413 + 451 * 452 // 2,
        "releases": [
            _release("popularity", 1, 5.6589, "rdp", Z_POPULARITY),
            _release("cooccurrence", 2, 7.9420, "prv", Z_COOCCURRENCE),
        ],
        "test": dict(WARM_TEST),
    }
    privacy = {
        "epsilon": 7.9420,
        "epsilon_rdp": 8.4420,
        "delta": 7.0e-4,
        "noise_multiplier": Z_WARM,
        "clip": 1.0,
        "sample_rate": 0.1,
        "steps_per_round": 1,
        "release_noise_multipliers": {"popularity": Z_POPULARITY, "cooccurrence": Z_COOCCURRENCE},
        "mode": "client",
        "accountant": "prv",
    }
    return {
        "population": POPULATION,
        "config": {
            "name": "warm",
            "rounds": 0,
            "model": {"kind": "multvae"},
            "privacy": {"mode": "client", "target_epsilon": 8.0, "participation_quantile": 0.025},
            "warm_start": {"enabled": True, "share": 1.0},
        },
        "rounds": [],
        "final": {"test": dict(WARM_TEST), "privacy": privacy},
        "warm_start": warm,
        "baselines": copy.deepcopy(BASELINES),
        "reference": None,
        "wall_seconds": 11.4,
    }


def _warm_then_rounds() -> dict[str, Any]:
    """The warm start, then two DP rounds (share 0.9)."""
    results = _warm_only()
    results["config"]["rounds"] = 2
    results["config"]["warm_start"]["share"] = 0.9
    rounds = []
    for rnd, epsilon in ((1, 8.05), (2, 8.2)):
        ledger = {
            "round": rnd,
            "sample_rate": 0.1,
            "invited": 73,
            "participated": 73,
            "expected_participants": 73.8,
            "clip": 1.0,
            "noise_multiplier": 0.71,
            "effective_noise_multiplier": 0.709,
            "steps": 1,
            "released": True,
            "epsilon": epsilon if rnd == 1 else 7.6,
            "epsilon_accountant": "rdp" if rnd == 1 else "prv",
            "epsilon_rdp": epsilon,
        }
        rounds.append(
            {
                "round": rnd,
                "sampled": 73,
                "returned": 73,
                "ndcg@100": 0.33 + 0.001 * rnd,
                "recall@20": 0.26,
                "seconds": 1.8,
                "bytes_up": 0,
                "bytes_down": 0,
                "epsilon_rdp": epsilon,
                "epsilon_prv": 7.6 if rnd == 2 else None,
                "ledger": ledger,
            }
        )
    results["rounds"] = rounds
    results["warm_start"]["releases"][-1]["epsilon_accountant"] = "rdp"
    results["final"]["test"] = {
        "ndcg@100": 0.3337,
        "recall@20": 0.2622,
        "recall@50": 0.4063,
        "coverage@20": 0.0594,
    }
    results["final"]["privacy"].update(epsilon=7.6, epsilon_rdp=8.2, noise_multiplier=0.71)
    return results


def _without_warm_start() -> dict[str, Any]:
    results = _warm_then_rounds()
    results["warm_start"] = None
    del results["config"]["warm_start"]
    del results["final"]["privacy"]["release_noise_multipliers"]
    return results


def _page(tmp_path: Path, results: dict[str, Any]) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "results.json").write_text(json.dumps(results))
    return write_report(tmp_path).read_text(encoding="utf-8")


def _section(page: str, element_id: str) -> str:
    match = re.search(rf'<section id="{element_id}"[^>]*>(.*?)</section>', page, re.DOTALL)
    assert match is not None, f"no section #{element_id}"
    return match.group(1)


def _text(fragment: str) -> str:
    """Text of an HTML fragment: tags removed, entities kept, whitespace collapsed."""
    return " ".join(re.sub(r"<[^>]+>", " ", fragment).split())


def _row(fragment: str, key: str) -> list[str]:
    """The cells after the key cell of the table row whose first cell is ``key``."""
    match = re.search(rf'<tr><td class="k">{re.escape(key)}</td>(.*?)</tr>', fragment)
    assert match is not None, f"no row {key!r}"
    return [html.unescape(c) for c in re.findall(r"<td[^>]*>([^<]*)</td>", match.group(1))]


def _cli_table(results: dict[str, Any]) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(results_table(results, name="warm", rounds=results["config"]["rounds"]))
    return console.export_text()


# ------------------------------------------------------------------------- warm start alone


def test_warm_only_report_describes_the_warm_start_and_its_releases(tmp_path: Path) -> None:
    page = _page(tmp_path, _warm_only())

    warm = _section(page, "warm-start")
    text = _text(warm)
    assert "initialized from 2 DP releases that all 738 clients took part in" in text
    assert "vocabulary of 451 items" in text
    assert "rank k = 8" in text and "validation users" in text
    assert "Its test NDCG@100 before any round: 0.3618" in text
    assert "no training rounds" in text
    header = re.findall(r"<th[^>]*>([^<]*)</th>", warm)
    assert header == ["release", "clients", "z", "effective z", "values per client", "ε after it"]
    assert _row(warm, "item popularity") == [
        "738 of 738",
        "1.561",
        "1.561",
        "1,413",
        "5.659 (RDP)",
    ]
    assert _row(warm, "item co-occurrence") == [
        "738 of 738",
        "0.7803",
        "0.7803",
        f"{451 * 452 // 2:,}",
        "7.942 (PRV)",
    ]


def test_warm_only_report_renders_without_round_plots(tmp_path: Path) -> None:
    page = _page(tmp_path, _warm_only())

    assert "data:image/png" not in page
    assert not list(tmp_path.glob("*.png"))
    assert "warm start only" in _text(_section(page, "plots"))
    assert _row(_section(page, "run"), "rounds") == ["none: warm start only (0 rounds planned)"]
    assert "the run is the warm start alone" in _section(page, "rounds")
    assert "no round has finished yet" not in page


def test_warm_only_comparison_is_the_warm_model_beside_the_baselines(tmp_path: Path) -> None:
    page = _page(tmp_path, _warm_only())

    baselines = _section(page, "baselines")
    headline = _text(re.search(r'<p class="headline">(.*?)</p>', baselines).group(1))  # type: ignore[union-attr]
    assert headline.startswith("federated NDCG@100 (warm start only) 0.3618")
    assert f"popularity 0.2679 (federated / popularity {0.3618 / 0.2679:.1%})" in headline
    assert f"EASE (λ=200) 0.4381 (federated / EASE {0.3618 / 0.4381:.1%})" in headline
    models = re.findall(r'<tr><td class="k">([^<]*)</td>', baselines)
    assert models == [
        "federated Mult-VAE, warm start only (0 rounds)",
        "popularity",
        "EASE (λ=200)",
    ]


def test_warm_only_privacy_box_counts_the_releases(tmp_path: Path) -> None:
    page = _page(tmp_path, _warm_only())

    box = _section(page, "privacy")
    assert _row(box, "composition") == ["2 releases + 0 rounds (warm start only)"]
    assert _row(box, "rounds") == ["none: warm start only"]
    assert _row(box, "warm-start releases") == [
        "2 (popularity, co-occurrence): sample rate 1, all 738 clients, z 1.561 / 0.7803, "
        "ε 7.942 (PRV) after them"
    ]
    assert _row(box, "ε spent") == ["7.942 (PRV), 99% of the target"]
    assert "effective z per round" not in box and "participation quantile" not in box
    assert "warm start alone" in _text(box.split("why-below-target")[1])


def test_privacy_box_takes_the_release_z_from_the_warm_start_summary_without_the_final(
    tmp_path: Path,
) -> None:
    # Prepare: final.privacy without the releases' z (an older or partial results.json)
    results = _warm_only()
    del results["final"]["privacy"]["release_noise_multipliers"]
    results["warm_start"]["noise_multipliers"] = {"popularity": 1.6, "cooccurrence": 0.8}

    box = _section(_page(tmp_path, results), "privacy")

    (row,) = _row(box, "warm-start releases")
    assert "all 738 clients, z 1.6 / 0.8, ε 7.942 (PRV)" in row


def test_warm_only_cli_table_has_one_warm_start_row_with_its_epsilon() -> None:
    table = _cli_table(_warm_only())

    assert "test metrics of the warm start alone, 0 rounds" in table
    row = next(line for line in table.splitlines() if "warm start only" in line)
    assert "0.3618" in row and "7.942 (PRV)" in row
    assert "federated  " not in table  # the one model row is the warm start's
    popularity = next(line for line in table.splitlines() if "popularity" in line)
    assert f"{0.3618 / 0.2679:.1%}" in popularity


# ---------------------------------------------------------------- warm start, then rounds


def test_rounds_after_a_warm_start_add_a_warm_start_only_row(tmp_path: Path) -> None:
    page = _page(tmp_path, _warm_then_rounds())

    baselines = _section(page, "baselines")
    assert _row(baselines, "warm start only (before round 1)") == [
        "0.3618",
        "0.3027",
        "0.4457",
        "0.0863",
        f"{0.3337 / 0.3618:.1%}",
    ]
    headline = _text(re.search(r'<p class="headline">(.*?)</p>', baselines).group(1))  # type: ignore[union-attr]
    assert headline.startswith("federated NDCG@100 0.3337")
    assert "popularity 0.2679" in headline and "EASE (λ=200) 0.4381" in headline
    assert "warm start" not in headline
    assert "federated DP training started from it" in _text(_section(page, "warm-start"))
    assert _row(_section(page, "run"), "rounds") == ["2 of 2, after the warm start's 2 releases"]
    assert page.count("data:image/png;base64,") == 3


def test_rounds_after_a_warm_start_privacy_box_composes_both(tmp_path: Path) -> None:
    page = _page(tmp_path, _warm_then_rounds())

    box = _section(page, "privacy")
    assert _row(box, "composition") == ["2 releases + 2 rounds"]
    assert _row(box, "rounds") == ["2 of 2 (2 charged)"]
    why = _text(box.split("why-below-target")[1])
    assert "participation quantile" in why
    assert "2 releases spent ε 7.942 (RDP) before round 1" in why
    assert "warm_start.share = 0.9" in why


def test_epsilon_plot_marks_the_epsilon_after_the_releases() -> None:
    fig = epsilon_figure(_warm_then_rounds())

    assert fig is not None
    (ax,) = fig.axes
    line = next(line for line in ax.get_lines() if "warm start" in str(line.get_label()))
    assert list(np.asarray(line.get_ydata())) == [pytest.approx(7.942)] * 2  # horizontal
    assert str(line.get_label()) == "after the warm start's releases (RDP): 7.94"


def test_cli_table_has_a_warm_start_row_after_the_federated_one() -> None:
    lines = _cli_table(_warm_then_rounds()).splitlines()

    assert any("after the warm start and 2 rounds" in line for line in lines)
    models = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert models == ["federated", "warm start only (before round 1)", "popularity", "EASE (λ=200)"]
    federated = next(line for line in lines if line.startswith("│ federated"))
    warm = next(line for line in lines if "warm start only" in line)
    assert "0.3337" in federated and "7.6 (PRV)" in federated
    assert "0.3618" in warm and "7.942 (RDP)" in warm and f"{0.3337 / 0.3618:.1%}" in warm


# --------------------------------------------------------------------------- no warm start


def test_without_a_warm_start_nothing_of_it_appears(tmp_path: Path) -> None:
    page = _page(tmp_path, _without_warm_start())

    assert '<section id="warm-start"' not in page
    assert "warm start" not in page.lower()
    box = _section(page, "privacy")
    assert "composition" not in box and "releases" not in box
    assert _row(box, "rounds") == ["2 of 2 (2 charged)"]
    assert _row(_section(page, "run"), "rounds") == ["2 of 2"]
    models = re.findall(r'<tr><td class="k">([^<]*)</td>', _section(page, "baselines"))
    assert models == ["federated Mult-VAE", "popularity", "EASE (λ=200)"]


def test_cli_table_without_a_warm_start_has_no_warm_row_nor_epsilon_column() -> None:
    table = _cli_table(_without_warm_start())

    assert "warm" not in table.replace("warm:", "")  # the run's name is "warm"
    assert "ε" not in table
    assert "test metrics after 2 rounds" in table

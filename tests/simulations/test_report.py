"""The run report: PNGs and one offline HTML page from results.json."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from common.errors import FedrecError
from simulations.report import load_results, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _results(*, reference: bool = True, epsilon: bool = True) -> dict[str, Any]:
    """Five rounds, evaluated on rounds 2 and 5."""
    rounds = []
    for r in range(1, 6):
        evaluated = r in (2, 5)
        record: dict[str, Any] = {
            "round": r,
            "sampled": 10,
            "returned": 9,
            "failed": 0,
            "dropped": 1,
            "ndcg@100": 0.1 * r if evaluated else None,
            "recall@20": 0.08 * r if evaluated else None,
            "seconds": 1.5,
            "bytes_up": 2_000_000,
            "bytes_down": 1_000_000,
        }
        if epsilon:
            record["epsilon"] = 0.4 * r
        rounds.append(record)
    return {
        "config": {"name": "fed <b>&amp;</b> 'x'", "rounds": 5, "dp": {"noise": 1.1}},
        "rounds": rounds,
        "final": {"test": {"ndcg@100": 0.41234, "recall@20": 0.35, "recall@50": 0.5}},
        "reference": (
            {
                "label": "centralized Mult-VAE [600,200]",
                "test": {"ndcg@100": 0.45, "recall@20": 0.4},
            }
            if reference
            else None
        ),
        "wall_seconds": 12.0,
    }


def _write(run_dir: Path, results: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results))


def test_report_writes_pngs_and_self_contained_html(tmp_path: Path) -> None:
    # Prepare
    _write(tmp_path, _results())

    # Execute
    report = write_report(tmp_path)

    # Assert
    assert report == tmp_path / "report.html"
    for name in ("metrics.png", "epsilon.png", "cost.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 10_000
    page = report.read_text(encoding="utf-8")
    assert "0.4123" in page  # final NDCG@100, 4 decimals
    assert "centralized Mult-VAE [600,200]" in page
    assert "91.6%" in page  # 0.41234 / 0.45
    assert "<td>–</td>" in page  # rounds 1, 3, 4 have no evaluation
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", page, re.IGNORECASE)
    assert "<link" not in page and "<script" not in page
    assert "fed &lt;b&gt;&amp;amp;&lt;/b&gt; &#x27;x&#x27;" in page
    assert "<b>" not in page


def test_report_without_reference_or_epsilon(tmp_path: Path) -> None:
    _write(tmp_path, _results(reference=False, epsilon=False))

    page = write_report(tmp_path).read_text(encoding="utf-8")

    assert not (tmp_path / "epsilon.png").exists()
    assert (tmp_path / "metrics.png").read_bytes().startswith(PNG_SIGNATURE)
    assert page.count("data:image/png;base64,") == 2
    assert "ε" not in page


def test_partial_run_without_final_or_evaluation(tmp_path: Path) -> None:
    results = _results()
    del results["final"], results["wall_seconds"]
    for record in results["rounds"]:
        record["ndcg@100"] = record["recall@20"] = None
    _write(tmp_path, results)

    page = write_report(tmp_path).read_text(encoding="utf-8")

    summary = page.split("<h2>Plots</h2>")[0]
    assert '<td class="k">final test NDCG@100</td><td>–</td>' in summary
    assert '<td class="k">wall time</td><td>–</td>' in summary
    assert (tmp_path / "metrics.png").read_bytes().startswith(PNG_SIGNATURE)


def test_missing_results_raises_one_line(tmp_path: Path) -> None:
    with pytest.raises(FedrecError, match=r"results\.json: not found") as info:
        write_report(tmp_path)
    assert "\n" not in str(info.value)


def test_invalid_json_raises_one_line(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("{not json")

    with pytest.raises(FedrecError, match=r"results\.json: invalid JSON at line 1"):
        load_results(tmp_path)

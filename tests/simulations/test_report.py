"""The run report: PNGs and one offline HTML page from results.json; what finish_results adds."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from common.errors import FedrecError
from common.metrics import evaluate
from common.rounds import ROUND_FIELDS, TEST_METRICS
from common.run.folder import load_eval_data
from simulations.baselines import EASE_LAMBDAS, Popularity
from simulations.cohort_batch import population_rows
from simulations.report import epsilon_figure, load_results, write_report

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


def _section(page: str, element_id: str) -> str:
    """The HTML of ``<section id="element_id">`` (sections are not nested)."""
    match = re.search(rf'<section id="{element_id}"[^>]*>(.*?)</section>', page, re.DOTALL)
    assert match is not None, f"no section #{element_id}"
    return match.group(1)


def _text(fragment: str) -> str:
    """The text of an HTML fragment, tags removed and entities kept."""
    return re.sub(r"<[^>]+>", " ", fragment)


@pytest.fixture(scope="module")
def dp_page(dp_run: Path) -> str:
    return write_report(dp_run).read_text(encoding="utf-8")


# ------------------------------------------------------------------------- hand-made results


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
    assert "Differential privacy is off" in _section(page, "privacy")


def test_partial_run_without_final_or_evaluation(tmp_path: Path) -> None:
    results = _results()
    del results["final"], results["wall_seconds"]
    for record in results["rounds"]:
        record["ndcg@100"] = record["recall@20"] = None
    _write(tmp_path, results)

    page = write_report(tmp_path).read_text(encoding="utf-8")

    federated = re.search(r"<tr><td class=\"k\">federated</td>(.*?)</tr>", page)
    assert federated is not None and set(re.findall(r"<td>([^<]*)</td>", federated.group(1))) == {
        "–"
    }
    assert '<td class="k">wall time</td><td>–</td>' in _section(page, "run")
    assert "not recorded" in _section(page, "baselines")
    assert (tmp_path / "metrics.png").read_bytes().startswith(PNG_SIGNATURE)


def test_missing_results_raises_one_line(tmp_path: Path) -> None:
    with pytest.raises(FedrecError, match=r"results\.json: not found") as info:
        write_report(tmp_path)
    assert "\n" not in str(info.value)


def test_invalid_json_raises_one_line(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("{not json")

    with pytest.raises(FedrecError, match=r"results\.json: invalid JSON at line 1"):
        load_results(tmp_path)


def test_unknown_round_columns_get_readable_names_and_nested_values_are_left_out(
    tmp_path: Path,
) -> None:
    results = _results()
    for record in results["rounds"]:
        record["queue_wait_seconds"] = 0.25
        record["extra"] = {"nested": 1}
    _write(tmp_path, results)

    rounds = _section(write_report(tmp_path).read_text(encoding="utf-8"), "rounds")

    assert "<th>Queue wait (s)</th>" in rounds
    assert "nested" not in rounds and "{" not in rounds


# ---------------------------------------------------------------- a finished DP run folder


def test_results_json_has_baselines_on_the_federated_test_users(dp_run: Path) -> None:
    results = json.loads((dp_run / "results.json").read_text())
    data = load_eval_data(dp_run)

    baselines = results["baselines"]

    expected = evaluate(
        Popularity().fit(population_rows(dp_run)).score, data.test_foldin, data.test_holdout
    )
    assert baselines["popularity"]["test"] == pytest.approx({k: expected[k] for k in TEST_METRICS})
    ease = baselines["ease"]
    assert set(ease["test"]) == set(TEST_METRICS)
    assert 0 < ease["test"]["ndcg@100"] <= 1
    validation = ease["validation_ndcg@100"]
    assert [float(k) for k in validation] == list(EASE_LAMBDAS)
    assert validation[f"{ease['lambda']:g}"] == max(validation.values())
    assert baselines["split"]["test_users"] == data.test_foldin.shape[0]
    assert baselines["split"]["train_users"] == population_rows(dp_run).shape[0]


def test_results_json_records_provenance(dp_run: Path) -> None:
    provenance = json.loads((dp_run / "results.json").read_text())["provenance"]

    assert set(provenance) >= {"fedrec", "flower", "torch", "opacus", "tenseal", "git_commit"}
    assert provenance["flower"] == "1.42.0"
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", provenance["git_commit"])


def test_rounds_csv_keeps_one_accountant_per_column(dp_run: Path) -> None:
    with (dp_run / "rounds.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        columns = reader.fieldnames
    ledger = [
        json.loads(line)
        for line in (dp_run / "ledger.jsonl").read_text().splitlines()
        if json.loads(line)["type"] == "round"
    ]

    assert columns == list(ROUND_FIELDS)
    assert "epsilon" not in columns
    assert [float(r["epsilon_rdp"]) for r in rows] == pytest.approx(
        [rec["epsilon_rdp"] for rec in ledger]
    )
    assert [rec["epsilon_accountant"] for rec in ledger] == ["rdp", "rdp", "prv"]
    assert [r["epsilon_prv"] for r in rows[:-1]] == ["", ""]
    assert float(rows[-1]["epsilon_prv"]) == pytest.approx(ledger[-1]["epsilon"])
    json_rounds = json.loads((dp_run / "results.json").read_text())["rounds"]
    assert [r["epsilon"] for r in json_rounds] == [rec["epsilon"] for rec in ledger]
    assert [r["epsilon_prv"] for r in json_rounds[:-1]] == [None, None]
    assert json_rounds[-1]["epsilon_prv"] == ledger[-1]["epsilon"]


def test_headline_puts_federated_beside_popularity_and_ease(dp_run: Path, dp_page: str) -> None:
    baselines = json.loads((dp_run / "results.json").read_text())["baselines"]
    pop = baselines["popularity"]["test"]["ndcg@100"]
    ease = baselines["ease"]["test"]["ndcg@100"]

    section = _text(_section(dp_page, "baselines"))

    assert "0.1500" in section  # the federated NDCG@100 of the fixture
    assert f"popularity {pop:.4f}" in section
    assert f"EASE (λ={baselines['ease']['lambda']:g}) {ease:.4f}" in section
    assert f"federated / popularity {0.15 / pop:.1%}" in section
    assert f"federated / EASE {0.15 / ease:.1%}" in section


def test_privacy_box_names_the_guarantee_and_the_audit_verdict(dp_run: Path, dp_page: str) -> None:
    final = json.loads((dp_run / "results.json").read_text())["final"]["privacy"]
    header = json.loads((dp_run / "ledger.jsonl").read_text().splitlines()[0])

    box = _text(_section(dp_page, "privacy"))

    assert "target ε 8" in " ".join(box.split())
    assert f"{final['epsilon']:.3f} (PRV)" in box
    assert f"{final['epsilon_rdp']:.3f}" in box
    assert f"{final['delta']:.4g}" in box
    assert f"{final['noise_multiplier']:.4g}" in box
    assert "clip C" in box and "sample rate q" in box and "0.5" in box
    assert f"{header['population']} clients" in box
    assert "3 of 3" in box
    assert "VERIFIED" in box
    assert "participation quantile" in _text(_section(dp_page, "privacy").split("why-below")[1])


def test_epsilon_plot_has_a_target_line_and_a_legend(dp_run: Path, dp_page: str) -> None:
    fig = epsilon_figure(load_results(dp_run))

    assert fig is not None
    (ax,) = fig.axes
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "target ε = 8" in labels
    target = next(line for line in ax.get_lines() if line.get_label() == "target ε = 8")
    assert set(target.get_ydata()) == {8.0}  # horizontal
    assert any(label.startswith("PRV") for label in labels) and "RDP, per round" in labels
    assert re.search(r'<img id="plot-epsilon" alt="[^"]*target[^"]*" src="data:image/png', dp_page)


def test_audit_verdict_reports_a_tampered_and_an_unfinished_ledger(
    dp_run: Path, tmp_path: Path
) -> None:
    tampered, unfinished = tmp_path / "tampered", tmp_path / "unfinished"
    for folder in (tampered, unfinished):
        shutil.copytree(dp_run, folder)
    lines = (dp_run / "ledger.jsonl").read_text().splitlines()
    edited = lines[2].replace('"participated":', '"participated":1', 1)
    (tampered / "ledger.jsonl").write_text("\n".join([*lines[:2], edited, *lines[3:]]) + "\n")
    (unfinished / "ledger.jsonl").write_text("\n".join(lines[:-1]) + "\n")

    bad = _section(write_report(tampered).read_text(encoding="utf-8"), "privacy")
    open_ = _section(write_report(unfinished).read_text(encoding="utf-8"), "privacy")

    assert 'class="verdict failed"' in bad and "FAILED" in bad
    assert 'class="verdict unfinished"' in open_ and "UNFINISHED" in open_


def test_rounds_table_is_readable(dp_page: str) -> None:
    rounds = _section(dp_page, "rounds")

    headers = re.findall(r"<th[^>]*>([^<]*)</th>", rounds)
    assert headers[:3] == ["Round", "Sampled", "Returned"]
    assert {"ε RDP", "ε PRV", "Train (s)", "Deserialize (s)", "Up (MB)"} <= set(headers)
    assert not any("_" in h for h in headers)  # no raw keys such as deserialize_seconds
    assert "{" not in rounds and "epsilon_accountant" not in rounds  # no ledger dict
    assert '<div class="scroll">' in rounds
    css = re.search(r"<style>(.*?)</style>", dp_page, re.DOTALL)
    assert css is not None
    assert re.search(r"\.scroll \{[^}]*max-height[^}]*overflow: auto", css.group(1))
    assert re.search(r"\.scroll thead th \{[^}]*position: sticky", css.group(1))
    assert "1.50" in rounds and "0.70" in rounds  # MB up / down, two decimals


def test_config_is_a_table_of_dotted_keys(dp_page: str) -> None:
    config = _section(dp_page, "config")

    assert '<table id="config-table">' in config
    assert '<td class="k">privacy.target_epsilon</td><td class="t">8.0</td>' in config
    assert '<td class="k">model.dims</td><td class="t">[16, 8]</td>' in config
    assert "<pre>" not in dp_page and "&quot;privacy&quot;" not in config


def test_provenance_section_shows_versions_and_commit(dp_run: Path, dp_page: str) -> None:
    provenance = json.loads((dp_run / "results.json").read_text())["provenance"]

    section = _text(_section(dp_page, "provenance"))

    for label in ("fedrec", "Flower", "PyTorch", "Opacus", "TenSEAL", "git commit"):
        assert label in section
    assert provenance["git_commit"] in section and provenance["tenseal"] in section

"""``fedrec recommend`` around the ranking: provenance, explanations and re-ranking."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.cli import add_client_commands
from client.recommend import RERANK_LAMBDA, explain, provenance_line, recommend
from common.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    ledger_head,
    load_checkpoint,
    model_provenance,
    provenance_of,
    save_checkpoint,
)
from common.cli import run_handler
from common.data.synth import synthesize
from common.errors import DataError
from common.fairness.genres import genre_matrix, genre_mix
from common.fairness.rerank import RerankKind
from common.model import ModelConfig, ModelKind, build_model
from common.privacy.ledger import canonical_json
from simulations.central import CentralConfig, run_central


def _fedrec(argv: list[str]) -> int:
    """``fedrec ARGV`` with only the device commands registered."""
    parser = argparse.ArgumentParser(prog="fedrec")
    add_client_commands(parser.add_subparsers(required=True))
    return run_handler(parser.parse_args(argv))


# The toy catalogue: ten items, a "Drama" half (1-5) and a "Comedy" half (6-10); item 10 has none.
IDS = [str(i) for i in range(1, 11)]
GENRES = [["Drama"]] * 5 + [["Comedy"]] * 4 + [[]]


def _toy_model(*, comedy_bias: float = 3.0) -> torch.nn.Module:
    """A Mult-DAE that prefers the comedies by about ``comedy_bias``; history item 1 lifts them a
    little more (by ``0.1 tanh(x_1 / |x|)``), no other item counts but through ``|x|``."""
    cfg = ModelConfig(kind=ModelKind.MULTDAE, n_items=len(IDS), dims=(2,), dropout=0.0)
    model = build_model(cfg)
    with torch.no_grad():
        for layer in [*model.encoder, *model.decoder]:
            layer.weight.zero_()
            layer.bias.zero_()
        model.encoder[0].weight[0, 0] = 1.0
        model.decoder[0].weight[5:9, 0] = 0.1
        # a strict order: comedies 6 > 7 > 8 > 9, then dramas 1 > ... > 5, then item 10
        model.decoder[0].bias[5:9] = comedy_bias + torch.linspace(0.0, -0.3, 4)
        model.decoder[0].bias[:5] = torch.linspace(0.0, -0.4, 5)
        model.decoder[0].bias[9] = -1.0
    return model


def _save(
    path: Path,
    model: torch.nn.Module,
    *,
    genres: list[list[str]] | None = None,
    metadata: dict | None = None,
) -> Path:
    save_checkpoint(
        path,
        Checkpoint(
            model_config=model.config.to_dict(),
            state_dict=model.state_dict(),
            item_ids=IDS,
            item_titles=[f"item {i}" for i in IDS],
            dataset={"name": "toy", "sha256": "0" * 64},
            metadata=metadata or {},
            item_genres=genres or [],
        ),
    )
    return path


def _write_ledger(path: Path, records: list[dict]) -> list[bytes]:
    raws = [canonical_json(r) for r in records]
    path.write_bytes(b"".join(raw + b"\n" for raw in raws))
    return raws


# ------------------------------------------------------------------------------ checkpoint


def test_item_genres_round_trip_and_an_old_checkpoint_still_loads(tmp_path: Path) -> None:
    # Prepare: a file as fedrec wrote it before genres and provenance were recorded
    model = _toy_model()
    old = tmp_path / "old.pt"
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model_config": model.config.to_dict(),
            "state_dict": model.state_dict(),
            "item_ids": IDS,
            "item_titles": [""] * len(IDS),
            "dataset": {"name": "toy", "sha256": ""},
            "metadata": {"trainer": "central"},
        },
        old,
    )

    # Execute
    new = load_checkpoint(_save(tmp_path / "new.pt", model, genres=GENRES))
    loaded_old = load_checkpoint(old)

    # Assert
    assert new.item_genres == GENRES
    assert loaded_old.item_genres == []
    assert provenance_of(loaded_old) == {}
    assert provenance_line(provenance_of(loaded_old)) == "model: provenance not recorded"
    result = recommend(loaded_old, ["1"], k=3)
    assert [r.item_id for r in result.items] == ["6", "7", "8"]
    assert result.provenance == {} and result.rerank is None


def test_save_refuses_genres_that_do_not_match_the_items(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="item_genres must be empty or have one entry per item"):
        _save(tmp_path / "m.pt", _toy_model(), genres=GENRES[:-1])


def test_ledger_head_is_the_hash_of_the_last_line(tmp_path: Path) -> None:
    # Prepare
    raws = _write_ledger(
        tmp_path / "ledger.jsonl",
        [{"type": "header", "prev": "0" * 64}, {"type": "round", "round": 1, "prev": "x"}],
    )

    # Execute
    head = ledger_head(tmp_path / "ledger.jsonl")

    # Assert
    assert head == hashlib.sha256(raws[-1]).hexdigest()


def test_model_provenance_names_the_run_round_and_ledger(tmp_path: Path) -> None:
    # Prepare
    raws = _write_ledger(tmp_path / "ledger.jsonl", [{"type": "header", "prev": "0" * 64}])

    # Execute
    with_ledger = model_provenance(run_id="run-a", last_round=4, ledger=tmp_path / "ledger.jsonl")
    missing = model_provenance(run_id="run-b", last_round=0, ledger=tmp_path / "none.jsonl")
    central = model_provenance(run_id="run-c", last_round=None, ledger=None)

    # Assert
    head = hashlib.sha256(raws[0]).hexdigest()
    assert with_ledger == {"run_id": "run-a", "round": 4, "ledger_head": head}
    assert provenance_line(with_ledger) == f"model: run run-a, round 4, ledger {head[:16]}"
    assert missing == {"run_id": "run-b", "round": 0, "ledger_head": None}
    assert provenance_line(missing) == "model: run run-b, round 0, no ledger (privacy off)"
    assert provenance_line(central) == (
        "model: run run-c, trained centrally, no ledger (privacy off)"
    )


@pytest.mark.parametrize(("run_id", "last_round"), [("", 1), ("r", -1)])
def test_model_provenance_checks_its_input(run_id: str, last_round: int) -> None:
    with pytest.raises(ValueError, match=r"run_id|last_round"):
        model_provenance(run_id=run_id, last_round=last_round, ledger=None)


# --------------------------------------------------------------------------------- explain


def _one_latent_dae(encoder_weights: list[float]) -> torch.nn.Module:
    """A 4-item Mult-DAE with one latent unit: ``code = w . x / |x|``, the logit of item 3
    ``2 tanh(code)`` and every other logit 0."""
    cfg = ModelConfig(kind=ModelKind.MULTDAE, n_items=4, dims=(1,), dropout=0.0)
    model = build_model(cfg)
    with torch.no_grad():
        for layer in [*model.encoder, *model.decoder]:
            layer.weight.zero_()
            layer.bias.zero_()
        model.encoder[0].weight[0] = torch.tensor(encoder_weights)
        model.decoder[0].weight[3, 0] = 2.0
    return model


def _logp3(code: float) -> float:
    """log-softmax of item 3 when the latent code is ``code`` (by hand: 3 logits of 0)."""
    logit = 2.0 * math.tanh(code)
    return logit - math.log(3.0 + math.exp(logit))


def test_an_item_driven_by_one_history_item_is_explained_by_it_alone() -> None:
    # Prepare: item 3 depends on history item 0 only (item 1 only changes |x|)
    model = _one_latent_dae([1.0, 0.0, 0.0, 0.0])

    # Execute
    why = explain(model, [0, 1], [3])

    # Assert: leaving 0 out lowers log p_3, leaving 1 out raises it (code 1/sqrt2 -> 1)
    assert _logp3(1 / math.sqrt(2)) - _logp3(0.0) > 0 > _logp3(1 / math.sqrt(2)) - _logp3(1.0)
    assert why == [[(0, 1.0)]]


def test_shares_are_the_positive_log_softmax_drops_normalised() -> None:
    # Prepare: code = (x0 + 0.5 x1) / |x|; full history {0, 1}: 1.5 / sqrt2
    model = _one_latent_dae([1.0, 0.5, 0.0, 0.0])
    full = _logp3(1.5 / math.sqrt(2))
    drop0, drop1 = full - _logp3(0.5), full - _logp3(1.0)  # without 0: code 0.5; without 1: 1

    # Execute
    why = explain(model, [1, 0, 1], [3])  # the duplicate counts once

    # Assert
    assert drop0 > drop1 > 0
    assert [h for h, _ in why[0]] == [0, 1]
    # (the model runs in float32)
    assert why[0][0][1] == pytest.approx(drop0 / (drop0 + drop1), abs=1e-6)
    assert why[0][1][1] == pytest.approx(drop1 / (drop0 + drop1), abs=1e-6)


def test_explain_matches_one_forward_pass_per_left_out_item(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a random Mult-VAE, kept in training mode to check explain uses eval mode; the
    # six rows (full history + five left out) go in three batches
    monkeypatch.setattr("client.recommend._EXPLAIN_BATCH", 2)
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=ModelKind.MULTVAE, n_items=20, dims=(8, 4)))
    history, items = [1, 2, 3, 4, 5], [0, 7, 9, 12]

    # Execute
    why = explain(model, history, items, top=len(history))

    # Assert
    assert model.training
    model.eval()

    def logp(cols: list[int]) -> torch.Tensor:
        x = torch.zeros(1, 20)
        x[0, cols] = 1.0
        with torch.no_grad():
            return F.log_softmax(model(x).logits.double(), dim=1)[0]

    full = logp(history)
    for j, got in zip(items, why, strict=True):
        drops = {h: max(float(full[j] - logp([c for c in history if c != h])[j]), 0.0)
                 for h in history}  # fmt: skip
        total = sum(drops.values())
        expected = sorted(((h, d / total) for h, d in drops.items() if d > 0), key=lambda p: -p[1])
        assert [h for h, _ in got] == [h for h, _ in expected]
        assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-5)
        assert sum(s for _, s in got) == pytest.approx(1.0)


def test_a_history_of_one_item_explains_everything_and_top_limits_the_list() -> None:
    model = _one_latent_dae([1.0, 0.5, 0.25, 0.0])

    assert explain(model, [2], [0, 3]) == [[(2, 1.0)], [(2, 1.0)]]
    assert len(explain(model, [0, 1, 2], [3], top=2)[0]) == 2
    with pytest.raises(ValueError, match="top must be >= 1"):
        explain(model, [0], [3], top=0)
    with pytest.raises(ValueError, match="columns in"):
        explain(model, [0], [4])


def test_recommend_explains_with_item_ids(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.pt", _toy_model())

    result = recommend(path, ["2"], k=2, explain_top=3)

    assert [r.because for r in result.items] == [[("2", 1.0)], [("2", 1.0)]]


# --------------------------------------------------------------------------------- re-rank


def test_rerank_needs_item_genres(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.pt", _toy_model())

    with pytest.raises(DataError, match="no item genres"):
        recommend(path, ["1"], k=3, rerank=RerankKind.DIVERSITY)


def test_calibrated_rerank_moves_the_list_toward_the_historys_genre_mix(tmp_path: Path) -> None:
    # Prepare: a drama-only history; the model ranks the four comedies first
    path = _save(tmp_path / "m.pt", _toy_model(), genres=GENRES)
    genre_mat, names = genre_matrix(GENRES)
    history = ["1", "2"]

    # Execute
    plain = recommend(path, history, k=4)
    calibrated = recommend(path, history, k=4, rerank=RerankKind.CALIBRATED, rerank_lambda=0.9)

    # Assert
    assert [r.item_id for r in plain.items] == ["6", "7", "8", "9"]
    report = calibrated.rerank
    assert report is not None and report.kind is RerankKind.CALIBRATED and report.lam == 0.9
    assert report.history_mix == {"Drama": 1.0}
    assert report.kl_before is not None and report.kl_after is not None
    assert report.kl_after < report.kl_before
    drama = names.index("Drama")
    listed = np.array([[IDS.index(r.item_id) for r in calibrated.items]])
    assert genre_mix(listed, genre_mat)[0, drama] == pytest.approx(report.list_mix["Drama"])
    assert report.list_mix["Drama"] > 0.0  # the plain list has none
    assert {"1", "2"}.isdisjoint(r.item_id for r in calibrated.items)


def test_diversity_rerank_mixes_genres_into_a_one_genre_list(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.pt", _toy_model(comedy_bias=0.5), genres=GENRES)

    result = recommend(path, ["1", "6"], k=4, rerank=RerankKind.DIVERSITY, rerank_lambda=0.5)

    assert result.rerank is not None
    assert set(result.rerank.list_mix) == {"Comedy", "Drama"}
    assert len({r.item_id for r in result.items}) == 4


# ------------------------------------------------------------------------------------- CLI


@pytest.fixture
def traced_model(tmp_path: Path) -> Path:
    raws = _write_ledger(tmp_path / "ledger.jsonl", [{"type": "header", "prev": "0" * 64}])
    assert raws
    metadata = model_provenance(run_id="run-7", last_round=3, ledger=tmp_path / "ledger.jsonl")
    return _save(tmp_path / "model.pt", _toy_model(), genres=GENRES, metadata=metadata)


def test_the_table_names_the_model_and_explains(
    traced_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = _fedrec(["recommend", "--model", str(traced_model), "--history", "1", "--explain"])

    # Assert
    assert code == 0
    out = capsys.readouterr().out
    head = ledger_head(traced_model.parent / "ledger.jsonl")
    assert f"model: run run-7, round 3, ledger {head[:16]}" in out
    assert "because of" in out and "item 1 (1) 100%" in out


def test_json_names_the_model_and_the_rerank(
    traced_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    argv = ["recommend", "--model", str(traced_model), "--history", "1,2", "-k", "4"]
    code = _fedrec([*argv, "--rerank", "calibrated", "--explain-top", "1", "--json"])

    # Assert
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    head = ledger_head(traced_model.parent / "ledger.jsonl")
    assert payload["provenance"] == {"run_id": "run-7", "round": 3, "ledger_head": head}
    assert payload["model"] == f"model: run run-7, round 3, ledger {head[:16]}"
    assert payload["rerank"]["kind"] == "calibrated"
    assert payload["rerank"]["lambda"] == RERANK_LAMBDA[RerankKind.CALIBRATED]
    assert payload["rerank"]["history_mix"] == {"Drama": 1.0}
    assert payload["rerank"]["miscalibration_after"] <= payload["rerank"]["miscalibration_before"]
    assert len(payload["items"]) == 4
    # item 1 lifts the comedies; leaving out item 2 lifts them too, so it drove the dramas
    driver = {"Comedy": "1", "Drama": "2"}
    for item in payload["items"]:
        genre = GENRES[IDS.index(item["item_id"])][0]
        h = driver[genre]
        assert item["because"] == [{"item_id": h, "title": f"item {h}", "share": 1.0}]


def test_the_rerank_lines_show_both_mixes_and_the_kl(
    traced_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["recommend", "--model", str(traced_model), "--history", "1,2", "-k", "4"]
    code = _fedrec([*argv, "--rerank", "calibrated", "--rerank-lambda", "0.9"])

    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert "re-ranked: calibrated, lambda 0.9" in lines
    assert "history genres: Drama 100%" in lines
    assert any(line.startswith("list genres:    ") and "Drama" in line for line in lines)
    assert any(line.startswith("miscalibration (KL, Steck 2018): ") for line in lines)


def test_rerank_without_genres_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _save(tmp_path / "model.pt", _toy_model())

    code = _fedrec(["recommend", "--model", str(path), "--history", "1", "--rerank", "diversity"])

    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"fedrec: error: {path} has no item genres; --rerank needs them"
    assert captured.out == ""


def test_an_old_checkpoint_says_provenance_not_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _save(tmp_path / "model.pt", _toy_model())

    assert _fedrec(["recommend", "--model", str(path), "--history", "1", "--json"]) == 0

    payload = json.loads(capsys.readouterr().out)
    assert payload["provenance"] is None
    assert payload["model"] == "model: provenance not recorded"
    assert "because" not in payload["items"][0] and "rerank" not in payload


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan", "x"])
def test_rerank_lambda_is_checked_as_an_argument(
    traced_model: Path, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["recommend", "--model", str(traced_model), "--history", "1", "--rerank", "diversity"]
    with pytest.raises(SystemExit) as info:
        _fedrec([*argv, "--rerank-lambda", value])

    assert info.value.code == 2
    assert "argument --rerank-lambda: expected a number in [0, 1]" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end

FEDREC = [sys.executable, "-m", "simulations.cli"]


def _synth_with_genres(folder: Path, n_items: int) -> Path:
    """Synthetic interactions and an ``items.csv``: odd items Drama, even ones Comedy|Drama."""
    csv = synthesize(60, n_items, seed=3, out_dir=folder)
    rows = [f"{i},movie {i},{'Drama' if i % 2 else 'Comedy|Drama'}" for i in range(1, n_items + 1)]
    (folder / "items.csv").write_text("item_id,title,genres\n" + "\n".join(rows) + "\n")
    return csv


def test_a_central_model_recommends_with_genres_and_provenance(tmp_path: Path) -> None:
    # Prepare: a one-epoch central model
    csv = _synth_with_genres(tmp_path / "data", 40)
    run_dir = tmp_path / "central-run"
    run_central(CentralConfig(dataset=str(csv), dims=(8, 4), epochs=1, n_heldout_users=8), run_dir)
    ckpt = load_checkpoint(run_dir / "model.pt")
    history = ckpt.item_ids[:3]

    # Execute: the installed entry point, as a user runs it
    proc = subprocess.run(
        [*FEDREC, "recommend", "--model", str(run_dir / "model.pt"), "--history",
         ",".join(history), "-k", "5", "--rerank", "diversity", "--explain", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip

    # Assert
    assert proc.returncode == 0, proc.stderr[-2000:]
    genres_of = dict(zip(ckpt.item_ids, ckpt.item_genres, strict=True))
    expected = {i: ["Drama"] if int(i) % 2 else ["Comedy", "Drama"] for i in ckpt.item_ids}
    assert genres_of == expected
    payload = json.loads(proc.stdout)
    assert payload["provenance"] == {"run_id": "central-run", "round": None, "ledger_head": None}
    assert payload["model"] == "model: run central-run, trained centrally, no ledger (privacy off)"
    assert len(payload["items"]) == 5
    assert set(history).isdisjoint(item["item_id"] for item in payload["items"])
    for item in payload["items"]:
        assert {h["item_id"] for h in item["because"]} <= set(history)
        assert sum(h["share"] for h in item["because"]) == pytest.approx(1.0)
    assert set(payload["rerank"]["list_mix"]) <= {"Comedy", "Drama"}


@pytest.mark.slow
def test_a_federated_model_names_its_round_and_ledger_head(tmp_path: Path) -> None:
    # Prepare: two DP rounds of a tiny simulated federation
    csv = _synth_with_genres(tmp_path / "data", 120)
    config = tmp_path / "tiny.toml"
    config.write_text(
        "\n".join(
            [
                "rounds = 2", "reference = false",
                "[data]", f'dataset = "{csv}"', "n_heldout_users = 8",
                "[model]", "dims = [16, 8]",
                "[server]", "sample_rate = 0.5", "lr = 0.01", "round_timeout = 120",
                "[privacy]", 'mode = "client"', "target_epsilon = 8.0", "noise_seed = 7",
                "[encryption]", "enabled = false",
            ]
        )
        + "\n"
    )  # fmt: skip
    run_dir = tmp_path / "fed-run"
    proc = subprocess.run(
        [*FEDREC, "simulate", "--config", str(config), "--out", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Execute
    ckpt = load_checkpoint(run_dir / "model.pt")

    # Assert: the last applied round, and the hash of the ledger's final line
    rounds = json.loads((run_dir / "results.json").read_text())["rounds"]
    last_applied = max(r["round"] for r in rounds if r["applied"])
    last_line = (run_dir / "ledger.jsonl").read_bytes().splitlines()[-1]
    assert provenance_of(ckpt) == {
        "run_id": "fed-run",
        "round": last_applied,
        "ledger_head": hashlib.sha256(last_line).hexdigest(),
    }
    assert ckpt.item_genres[ckpt.item_ids.index("2")] == ["Comedy", "Drama"]

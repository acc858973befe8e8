"""A run's fairness section: every model measured on the same test users, shown three ways."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from common.fairness import AGE_BUCKETS
from common.model import ModelConfig, build_model
from common.run.config import load_run_config
from common.run.folder import load_eval_data, write_run_folder
from simulations.baselines import fit_baselines
from simulations.cli import main
from simulations.fairness import fairness_of_run, group_gaps

GENRES = ("Action", "Comedy", "Drama", "Horror")
FEDREC = [sys.executable, "-m", "simulations.cli"]


def _data(folder: Path, *, n_users: int = 240, n_items: int = 60, seed: int = 0) -> Path:
    """Interactions where women favour the first half of the catalogue (genres Drama/Comedy)
    and men the second (Action/Horror), so that the gender gap and the attacker have signal."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows, users = [], []
    for u in range(n_users):
        gender = "F" if u % 3 == 0 else "M"
        age = str(int(rng.integers(15, 70)))
        occupation = ["student", "engineer", "artist"][u % 3 - 1 if u % 2 else 0]
        users.append(f"u{u},{gender},{age},{occupation}")
        favoured = np.arange(n_items // 2) if gender == "F" else np.arange(n_items // 2, n_items)
        n = int(rng.integers(8, 20))
        items = set(rng.choice(favoured, size=n, replace=False).tolist())
        items |= set(rng.choice(n_items, size=3, replace=False).tolist())
        rows += [f"u{u},i{i},5,{k}" for k, i in enumerate(sorted(items))]
    (folder / "interactions.csv").write_text("user,item,rating,timestamp\n" + "\n".join(rows))
    (folder / "users.csv").write_text("user,gender,age,occupation\n" + "\n".join(users) + "\n")
    items_csv = []
    for i in range(n_items):
        genres = ("Drama|Comedy" if i % 2 else "Drama") if i < n_items // 2 else "Action|Horror"
        items_csv.append(f"i{i},Item {i},{genres}")
    (folder / "items.csv").write_text("item_id,title,genres\n" + "\n".join(items_csv) + "\n")
    return folder / "interactions.csv"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fair")
    data = _data(root / "data")
    cfg_path = root / "tiny.toml"
    cfg_path.write_text(
        "\n".join(
            [
                'name = "fair <test>"',
                "rounds = 1",
                "reference = false",
                "[data]",
                f'dataset = "{data}"',
                "n_heldout_users = 60",
                "[model]",
                "dims = [16, 8]",
                "[privacy]",
                'mode = "off"',
                "[encryption]",
                "enabled = false",
            ]
        )
        + "\n"
    )
    cfg = load_run_config(cfg_path)
    run = root / "run"
    write_run_folder(cfg, run)
    ev = load_eval_data(run)
    model_cfg = ModelConfig(n_items=len(ev.item_ids), dims=(16, 8))
    model = build_model(model_cfg, generator=torch.Generator().manual_seed(0))
    save_checkpoint(
        run / "model.pt",
        Checkpoint(
            model_config=model_cfg.to_dict(),
            state_dict=model.state_dict(),
            item_ids=ev.item_ids,
            item_titles=ev.item_titles,
            dataset=ev.dataset,
        ),
    )
    (run / "results.json").write_text(json.dumps({"rounds": [], "final": {"test": {}}}))
    return run


def test_the_run_folder_keeps_genres_and_the_held_out_users_attributes(run_dir: Path) -> None:
    ev = load_eval_data(run_dir)
    assert len(ev.item_genres) == len(ev.item_ids)
    assert set(ev.item_genres[0]) <= set(GENRES) and ev.item_genres[0]
    assert set(ev.test_attributes) == {"gender", "age", "occupation"}
    assert len(ev.test_attributes["gender"]) == ev.test_foldin.shape[0] == 60
    assert set(ev.test_attributes["gender"].tolist()) == {"F", "M"}


def test_every_model_is_measured_per_group_on_the_same_test_users(run_dir: Path) -> None:
    fitted = fit_baselines(run_dir)
    assert fitted is not None
    fair = fairness_of_run(run_dir, baselines=fitted, n_boot=200)
    assert fair is not None
    assert set(fair["models"]) == {"federated", "popularity", "ease"}
    women = int((load_eval_data(run_dir).test_attributes["gender"] == "F").sum())
    assert fair["groups"]["gender"] == {"F": women, "M": 60 - women}
    assert sum(fair["groups"]["activity"].values()) == 60
    ages = list(fair["groups"]["age"])  # youngest first, as every table lists them
    assert ages == [b for b in AGE_BUCKETS if b in ages] and len(ages) >= 3
    for model in fair["models"].values():
        gender = model["users"]["ndcg@100"]["gender"]
        f, m = gender["groups"]["F"], gender["groups"]["M"]
        assert f["ci"][0] <= f["mean"] <= f["ci"][1]
        assert gender["gap"]["value"] == pytest.approx(abs(f["mean"] - m["mean"]))
        assert 0 < model["items"]["coverage@20"] <= 1
        assert model["genres"]["miscalibration@20"] >= 0
    # popularity gives everyone the same list (less what they hold): little coverage, all head
    pop, ease = fair["models"]["popularity"]["items"], fair["models"]["ease"]["items"]
    assert pop["coverage@20"] < ease["coverage@20"]
    assert pop["popularity@20"] > ease["popularity@20"]
    # the latent code of a random Mult-VAE still carries the history, which carries gender here
    assert fair["models"]["federated"]["attacker"]["gender"]["auc"] > 0.6
    curve = fair["rerank"]["calibrated"]
    assert curve[0]["lam"] == 0.0
    assert min(p["miscalibration@20"] for p in curve) < curve[0]["miscalibration@20"]


def test_a_sweep_point_reports_each_attributes_largest_gap(run_dir: Path) -> None:
    gaps = group_gaps(run_dir / "model.pt", load_eval_data(run_dir), n_boot=50)
    assert {"gender", "age", "activity"} <= set(gaps)
    g = gaps["gender"]
    assert g["gap"] == pytest.approx(g["groups"][g["high"]] - g["groups"][g["low"]])
    assert g["gap"] >= 0


def test_report_fairness_measures_an_older_run_and_prints_json(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "fairness", str(run_dir), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["models"]["federated"]["users"]["ndcg@100"]["gender"]["gap"] is not None
    stored = json.loads((run_dir / "results.json").read_text())["fairness"]
    assert stored["groups"] == printed["groups"]
    html = (run_dir / "report.html").read_text()
    assert 'id="fairness"' in html and "plot-fairness" in html and "plot-rerank" in html
    assert main(["report", "fairness", str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert "ndcg@100 per gender group" in table and "largest gap" in table
    assert "([fairness]" in table  # the attacker table's note, not eaten as markup


def test_report_fairness_names_a_folder_without_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "fairness", str(tmp_path)]) == 2
    assert "results.json: not found" in capsys.readouterr().err


def test_a_flower_run_trains_the_gender_adversary_on_the_devices(tmp_path: Path) -> None:
    """Through Flower: the server's model carries the adversary head the clients train, and
    the run's results, table and report show the fairness of every model."""
    data = _data(tmp_path / "data", n_users=120, n_items=40)
    cfg = tmp_path / "adv.toml"
    cfg.write_text(
        "\n".join(
            [
                'name = "adversary <test>"',
                "rounds = 2",
                "eval_every = 1",
                "reference = false",
                "[data]",
                f'dataset = "{data}"',
                "n_heldout_users = 20",
                "[model]",
                "dims = [16, 8]",
                "[server]",
                "sample_rate = 0.5",
                "lr = 0.01",
                "round_timeout = 120",
                "[privacy]",
                'mode = "off"',
                "[encryption]",
                "enabled = false",
                "[fairness]",
                'adversary = "gender"',
                "adversary_weight = 2.0",
            ]
        )
        + "\n"
    )
    run = tmp_path / "run"
    proc = subprocess.run(
        [*FEDREC, "simulate", "--config", str(cfg), "--out", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = load_checkpoint(run / "model.pt")
    head = [k for k in state.state_dict if k.startswith("adversary.")]
    assert head and ModelConfig.from_dict(state.model_config).adversary_classes == 2
    results = json.loads((run / "results.json").read_text())
    assert all(r["applied"] for r in results["rounds"])
    fair = results["fairness"]
    assert "gender" in fair["models"]["federated"]["attacker"]
    assert fair["adversary"]["adversary"] == "gender"
    assert fair["adversary"]["adversary_weight"] == 2.0
    assert "fairness on the test users" in proc.stdout
    assert 'id="fairness"' in (run / "report.html").read_text()


def test_an_adversary_for_an_attribute_the_data_lacks_is_refused(tmp_path: Path) -> None:
    from common.data import synthesize

    data = synthesize(300, 60, seed=1, out_dir=tmp_path / "synth")
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[data]\ndataset = "{data}"\n[fairness]\nadversary = "gender"\n')
    proc = subprocess.run(
        [*FEDREC, "simulate", "--config", str(cfg), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "fairness.adversary" in proc.stderr and "no user attribute 'gender'" in proc.stderr
    assert not (tmp_path / "run").exists()

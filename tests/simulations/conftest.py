"""Fixtures of the simulation tests: a finished DP run folder built without Flower."""

from __future__ import annotations

from pathlib import Path

import pytest

DP_RUN_PARTICIPANTS = (23, 25, 22)
"""Updates per round of :func:`dp_run`: at or above m = qN = 22, so the run stays under target."""


@pytest.fixture(scope="session")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished client-level DP run (target epsilon 8, 3 rounds) on a tiny synthetic data set.

    The folder holds what ``fedrec simulate`` leaves behind, made by the same code but without
    Flower: the prepared data (:func:`common.run.folder.write_run_folder`), a hash-chained
    ledger of three charged rounds (:func:`common.privacy.rounds.charge_round`), ``rounds.csv``
    and ``results.json`` (:class:`server.state.RunOutputs`) completed by
    :func:`simulations.runner.finish_results`. The model's test metrics are made up.
    """
    from common.data import synthesize
    from common.privacy import PrivacyAccountant, plan_privacy
    from common.privacy.ledger import LedgerWriter
    from common.privacy.rounds import (
        charge_round,
        client_round_step,
        ledger_header,
        privacy_summary,
    )
    from common.rounds import RoundRecord, RoundStats
    from common.run.config import load_run_config
    from common.run.folder import write_run_folder
    from server.state import RunOutputs
    from simulations.runner import finish_results

    root = tmp_path_factory.mktemp("dp_run")
    data = synthesize(60, 40, seed=3, out_dir=root / "synth")
    config = root / "tiny.toml"
    config.write_text(
        "\n".join(
            [
                'name = "tiny <dp>"',
                "rounds = 3",
                "reference = false",
                "[data]",
                f'dataset = "{data}"',
                "n_heldout_users = 8",
                "[model]",
                "dims = [16, 8]",
                "[server]",
                "sample_rate = 0.5",
                "[privacy]",
                'mode = "client"',
                "clip = 0.5",
                "target_epsilon = 8.0",
            ]
        )
        + "\n"
    )
    cfg = load_run_config(config)
    run_dir = root / "run"
    n_clients = write_run_folder(cfg, run_dir).n_clients
    plan = plan_privacy(cfg, n_clients)
    assert plan is not None
    accountant = PrivacyAccountant(delta=plan.delta)
    ledger = LedgerWriter.create(
        run_dir / "ledger.jsonl", ledger_header(run_id=run_dir.name, cfg=cfg, plan=plan)
    )
    outputs = RunOutputs(run_dir, cfg)
    rounds = []
    for rnd, k in enumerate(DP_RUN_PARTICIPANTS, start=1):
        privacy = charge_round(
            accountant,
            plan,
            server_round=rnd,
            invited=k + 1,
            participated=k,
            step=client_round_step(plan, participated=k),
        )
        ledger.append_round(privacy.to_record())
        stats = RoundStats(
            invited=k + 1,
            returned=k,
            applied=True,
            bytes_up=1_500_000,
            bytes_down=700_000,
            client_seconds={"train-seconds": 0.5 * k, "deserialize-seconds": 0.01 * k},
        )
        test = {"ndcg@100": 0.05 * rnd, "recall@20": 0.04 * rnd}
        record = RoundRecord(round=rnd, stats=stats, privacy=privacy, test=test, seconds=2.5)
        rounds.append(record.to_dict())
        outputs.write_rounds(rounds, None)
    final = {
        "test": {"ndcg@100": 0.15, "recall@20": 0.12, "recall@50": 0.3, "coverage@20": 0.4},
        "privacy": privacy_summary(plan, rounds[-1]["ledger"]),
    }
    ledger.close(epsilon=final["privacy"]["epsilon"], epsilon_rdp=final["privacy"]["epsilon_rdp"])
    outputs.write_rounds(rounds, final)
    finish_results(run_dir, wall_seconds=7.5, reference=None)
    return run_dir

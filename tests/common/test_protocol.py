"""The wire protocol: record names and keys, typed readers, write -> read round trips."""

from __future__ import annotations

import subprocess
import sys

import pytest
from flwr.app import ConfigRecord, MetricRecord

from common import protocol as p
from common.protocol import (
    ClientDPConfig,
    EvalMetrics,
    ExampleDPConfig,
    ProtocolError,
    Refusal,
    RoundConfig,
    TrainMetrics,
    is_refusal,
    read_float,
    read_int,
)


def test_wire_strings_are_unchanged() -> None:
    # part of the protocol and of the ledgers: a change here breaks old clients and ledgers
    assert (p.ARRAYS_RECORD, p.CONFIG_RECORD, p.METRICS_RECORD) == ("arrays", "config", "metrics")
    assert (p.HE_RECORD, p.HE_SUM_RECORD, p.HE_FINGERPRINT) == ("he", "he-sum", "he-fingerprint")
    assert p.DECRYPT_MESSAGE_TYPE == "query.decrypt"
    assert (p.SERVER_ROUND, p.BETA) == ("server-round", "beta")
    assert (p.WEIGHT, p.NUM_EXAMPLES, p.LOSS) == ("weight", "num-examples", "loss")
    assert (p.REFUSED, p.EPSILON_IF_TRAINED, p.EVAL_USERS) == (
        "refused",
        "epsilon-if-trained",
        "eval-users",
    )
    assert (p.DPSGD_STEPS, p.DPSGD_SAMPLE_RATE) == ("dpsgd-steps", "dpsgd-sample-rate")
    assert (p.RUN_CONFIG_KEY, p.ITEM_IDS_KEY) == ("fedrec-run-config", "fedrec-item-ids")


def test_import_is_cheap() -> None:
    code = (
        "import sys, common.protocol; "
        "print(sorted(m for m in ('torch', 'opacus', 'tenseal') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------- readers


def test_read_float_accepts_int_and_float() -> None:
    record = MetricRecord({"a": 2, "b": 0.5})
    assert read_float(record, "a") == 2.0 and isinstance(read_float(record, "a"), float)
    assert read_float(record, "b") == 0.5


def test_read_int_rejects_float() -> None:
    with pytest.raises(ProtocolError, match=r"'x'.*must be an int, got float"):
        read_int(MetricRecord({"x": 1.0}), "x")


def test_missing_key_names_key_and_record() -> None:
    with pytest.raises(ProtocolError) as info:
        read_float(ConfigRecord(), "dp-clip", record_name="config")
    assert info.value.key == "dp-clip" and info.value.record == "config"
    assert "'dp-clip'" in str(info.value) and "'config'" in str(info.value)
    assert "missing" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_default_record_name_is_the_type() -> None:
    with pytest.raises(ProtocolError, match="MetricRecord"):
        read_int(MetricRecord(), "num-examples")


def test_wrong_type_names_key_and_record() -> None:
    with pytest.raises(ProtocolError, match=r"record 'config', key 'dp-clip'.*got str"):
        ClientDPConfig.read(_client_dp_record(**{"dp-clip": "1.0"}))


@pytest.mark.parametrize("reader", [read_float, read_int])
def test_bool_is_not_a_number(reader) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtocolError, match=r"'server-round'.*got bool"):
        reader(ConfigRecord({"server-round": True}), "server-round")


def test_optional_readers_and_str() -> None:
    record = ConfigRecord({"n": 3, "s": "abc"})
    assert p.read_optional_int(record, "n") == 3
    assert p.read_optional_int(record, "m") is None
    assert p.read_optional_float(record, "m") is None
    assert p.read_str(record, "s") == "abc"
    with pytest.raises(ProtocolError, match="'s'"):
        p.read_optional_float(record, "s")
    with pytest.raises(ProtocolError, match=r"'n'.*must be a str"):
        p.read_str(record, "n")


def test_read_seconds_takes_every_seconds_key() -> None:
    record = MetricRecord({"weight": 1.0, "train-seconds": 0.5, "he-encrypt-seconds": 2})
    assert p.read_seconds(record) == {"train-seconds": 0.5, "he-encrypt-seconds": 2.0}


# ------------------------------------------------------------------------- server -> client


def test_round_config_round_trip() -> None:
    config = ConfigRecord({"other": "kept"})
    RoundConfig(server_round=3, beta=0.2).write(config)
    assert dict(config) == {"other": "kept", "server-round": 3, "beta": 0.2}
    assert RoundConfig.read(config) == RoundConfig(3, 0.2)
    assert RoundConfig.read(config).require_beta() == 0.2


def test_round_config_without_beta() -> None:
    config = RoundConfig(server_round=5).to_record()
    assert dict(config) == {"server-round": 5}
    assert RoundConfig.read(config) == RoundConfig(5, None)
    with pytest.raises(ProtocolError, match=r"'beta'.*missing"):
        RoundConfig.read(config).require_beta()
    with pytest.raises(ProtocolError, match="'server-round'"):
        RoundConfig.read(ConfigRecord({"beta": 0.1}))


_CLIENT_DP = ClientDPConfig(
    clip=1.0,
    noise_multiplier=1.1,
    accounting_noise_multiplier=1.3,
    noise_std=0.5,
    denominator=4.0,
    sample_rate=0.1,
    delta=1e-5,
)


def _client_dp_record(**override: object) -> ConfigRecord:
    config = ConfigRecord()
    _CLIENT_DP.write(config)
    for key, value in override.items():
        config[key] = value  # type: ignore[assignment]
    return config


def test_client_dp_round_trip() -> None:
    config = _client_dp_record()
    assert list(config) == [
        "dp-clip",
        "dp-noise-multiplier",
        "dp-accounting-noise-multiplier",
        "dp-noise-std",
        "dp-denominator",
        "dp-sample-rate",
        "dp-delta",
    ]
    assert ClientDPConfig.read(config) == _CLIENT_DP


def test_client_dp_absent_is_none() -> None:
    assert ClientDPConfig.read(ConfigRecord({"server-round": 1, "dpsgd-clip": 1.0})) is None


def test_client_dp_accounting_multiplier_falls_back() -> None:
    config = _client_dp_record()
    del config["dp-accounting-noise-multiplier"]  # an older server
    dp = ClientDPConfig.read(config)
    assert dp is not None and dp.accounting_noise_multiplier == dp.noise_multiplier == 1.1


def test_read_accounting_noise_multiplier() -> None:
    config = _client_dp_record()
    assert p.read_accounting_noise_multiplier(config) == 1.3
    del config["dp-accounting-noise-multiplier"]
    assert p.read_accounting_noise_multiplier(config) == 1.1
    del config["dp-noise-multiplier"]
    with pytest.raises(ProtocolError, match="'dp-noise-multiplier'"):
        p.read_accounting_noise_multiplier(config)


def test_client_dp_partial_is_an_error() -> None:
    config = _client_dp_record()
    del config["dp-noise-std"]
    with pytest.raises(ProtocolError, match=r"'dp-noise-std'.*missing"):
        ClientDPConfig.read(config)


def test_client_dp_int_values_are_kept_on_the_wire() -> None:
    config = ConfigRecord()
    ClientDPConfig(1, 1, 1, 1, 4, 1, 1).write(config)  # type: ignore[arg-type]
    assert config["dp-denominator"] == 4 and isinstance(config["dp-denominator"], int)
    dp = ClientDPConfig.read(config)
    assert dp is not None and isinstance(dp.denominator, float)


_EXAMPLE_DP = ExampleDPConfig(
    clip=1.0, noise_multiplier=0.9, delta=1e-5, max_steps=12, max_sample_rate=0.25
)


def test_example_dp_round_trip() -> None:
    config = ConfigRecord({"server-round": 2})
    _EXAMPLE_DP.write(config)
    assert dict(config) == {
        "server-round": 2,
        "dpsgd-clip": 1.0,
        "dpsgd-noise-multiplier": 0.9,
        "dpsgd-delta": 1e-5,
        "dpsgd-max-steps": 12,
        "dpsgd-max-sample-rate": 0.25,
    }
    assert ExampleDPConfig.read(config) == _EXAMPLE_DP
    assert ExampleDPConfig.read(_client_dp_record()) is None


def test_example_dp_wrong_type() -> None:
    config = ConfigRecord()
    _EXAMPLE_DP.write(config)
    config["dpsgd-max-steps"] = 12.0
    with pytest.raises(ProtocolError, match=r"'dpsgd-max-steps'.*must be an int"):
        ExampleDPConfig.read(config)


# ------------------------------------------------------------------------- client -> server


def test_train_metrics_round_trip_keeps_todays_keys() -> None:
    metrics = TrainMetrics(
        weight=3.0,
        num_examples=3,
        loss=0.7,
        seconds={"deserialize-seconds": 0.1, "train-seconds": 0.2, "serialize-seconds": 0.3},
    )
    record = metrics.to_record()
    assert list(record) == [
        "weight",
        "num-examples",
        "loss",
        "deserialize-seconds",
        "train-seconds",
        "serialize-seconds",
    ]
    assert TrainMetrics.read(record) == metrics


def test_train_metrics_dpsgd_and_he_seconds() -> None:
    metrics = TrainMetrics(
        weight=5.0,
        num_examples=5,
        loss=1.0,
        seconds={"train-seconds": 0.2},
        dpsgd_steps=7,
        dpsgd_sample_rate=0.2,
    )
    record = metrics.to_record()
    assert record["dpsgd-steps"] == 7 and record["dpsgd-sample-rate"] == 0.2
    record["he-encrypt-seconds"] = 0.4  # what client.he_mod adds
    read = TrainMetrics.read(record)
    assert read.seconds == {"train-seconds": 0.2, "he-encrypt-seconds": 0.4}
    assert (read.dpsgd_steps, read.dpsgd_sample_rate) == (7, 0.2)


def test_train_metrics_missing_and_wrong_types() -> None:
    with pytest.raises(ProtocolError, match=r"record 'metrics', key 'num-examples'.*missing"):
        TrainMetrics.read(MetricRecord({"weight": 1.0, "loss": 0.1}))
    with pytest.raises(ProtocolError, match=r"'num-examples'.*must be an int"):
        TrainMetrics.read(MetricRecord({"weight": 1.0, "num-examples": 1.0, "loss": 0.1}))
    with pytest.raises(ProtocolError, match="'train-seconds'"):
        TrainMetrics.read(
            MetricRecord({"weight": 1.0, "num-examples": 1, "loss": 0.1, "train-seconds": [1.0]})
        )
    with pytest.raises(ValueError, match="-seconds"):
        TrainMetrics(weight=1.0, num_examples=1, loss=0.0, seconds={"train": 1.0})


def test_refusal_and_is_refusal() -> None:
    record = Refusal(epsilon_if_trained=2.5).to_record()
    assert dict(record) == {"refused": 1, "weight": 0.0, "epsilon-if-trained": 2.5}
    assert is_refusal(record)
    assert Refusal.read(record) == Refusal(2.5)
    assert not is_refusal(None)
    assert not is_refusal(MetricRecord({"weight": 1.0}))
    assert not is_refusal(MetricRecord({"refused": 0, "weight": 1.0}))
    with pytest.raises(ProtocolError, match="'refused'"):
        Refusal.read(MetricRecord({"weight": 1.0}))


def test_eval_metrics_round_trip() -> None:
    metrics = EvalMetrics(
        eval_users=4.0, metrics={"ndcg@100": 0.3, "recall@20": 0.2, "recall@50": 0.4}
    )
    record = metrics.to_record()
    assert list(record) == ["ndcg@100", "recall@20", "recall@50", "eval-users"]
    assert EvalMetrics.read(record) == metrics
    assert EvalMetrics.read(MetricRecord({"eval-users": 0.0, "other": 1.0})) == EvalMetrics(0.0)


def test_eval_metrics_errors() -> None:
    with pytest.raises(ProtocolError, match=r"'eval-users'.*missing"):
        EvalMetrics.read(MetricRecord({"ndcg@100": 0.3}))
    with pytest.raises(ProtocolError, match="'ndcg@100'"):
        EvalMetrics.read(MetricRecord({"ndcg@100": [0.3], "eval-users": 1.0}))
    with pytest.raises(ValueError, match="ndcg@"):
        EvalMetrics(eval_users=1.0, metrics={"loss": 1.0})

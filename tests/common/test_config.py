"""Config parsing: TOML + --set into frozen dataclasses, with one-line errors."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.config import apply_overrides, load_config, load_toml, parse, to_dict, to_toml
from common.errors import ConfigError


class Opt(enum.StrEnum):
    FEDAVG = "fedavg"
    FEDADAM = "fedadam"


@dataclass(frozen=True)
class Server:
    optimizer: Opt = Opt.FEDAVG
    lr: float = 1.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class Top:
    rounds: int = 10
    dims: tuple[int, ...] = (600, 200)
    budget: float | None = None
    out: Path | None = None
    server: Server = field(default_factory=Server)


def test_defaults_and_nested_override() -> None:
    raw = apply_overrides({}, ["rounds=20", "server.optimizer=fedadam", "dims=[200, 64]"])
    cfg = parse(Top, raw)
    assert cfg.rounds == 20
    assert cfg.server.optimizer is Opt.FEDADAM
    assert cfg.dims == (200, 64)
    assert cfg.budget is None


def test_int_is_accepted_for_float_and_optional() -> None:
    cfg = parse(Top, {"budget": 3, "server": {"lr": 2}})
    assert cfg.budget == 3.0 and isinstance(cfg.budget, float)
    assert cfg.server.lr == 2.0


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["roundz=3"], "unknown config key 'roundz'"),
        (["server.momentum=0.9"], "unknown config key 'server.momentum'"),
        (["rounds=3.5"], "rounds: expected an integer"),
        (["rounds=true"], "rounds: expected an integer"),
        (["server.optimizer=sgd"], "server.optimizer: 'sgd' is not one of"),
        (["server.lr=-1"], "lr must be > 0"),
        (["server.lr=nan"], "finite"),
        (["rounds"], "expected key=value"),
        (["rounds.x=1"], "is a value, not a section"),
    ],
)
def test_bad_values_raise_one_line_config_error(sets: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(Top, apply_overrides({"rounds": 1}, sets))
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_overrides_do_not_mutate_input() -> None:
    raw = {"server": {"lr": 1.0}}
    apply_overrides(raw, ["server.lr=2"])
    assert raw == {"server": {"lr": 1.0}}


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("rounds = 3\n[server\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml:2: invalid TOML"):
        load_toml(path)


def test_round_trip_through_toml(tmp_path: Path) -> None:
    cfg = Top(rounds=7, dims=(64,), server=Server(optimizer=Opt.FEDADAM, lr=0.1))
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert parse(Top, load_toml(path)) == cfg
    assert to_dict(cfg)["server"] == {"optimizer": "fedadam", "lr": 0.1}


def test_unknown_key_suggests_the_nearest_one() -> None:
    with pytest.raises(ConfigError) as info:
        parse(Top, {"rouds": 20})
    assert str(info.value) == "unknown config key 'rouds' (did you mean 'rounds'?)"
    with pytest.raises(ConfigError, match=r"'server\.lrr' \(did you mean 'server\.lr'\?\)"):
        parse(Top, {"server": {"lrr": 2}})


def test_config_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "config.toml"
    path.write_text("# a run\nrouds = 20\n\n[server]\nlr = -1\n")
    bad_value = tmp_path / "lr.toml"
    bad_value.write_text('rounds = 2\n[server]\noptimizer = "fedadam"\nlr = -1\n')

    # Execute
    with pytest.raises(ConfigError) as unknown:
        load_config(Top, path)
    with pytest.raises(ConfigError) as value:
        load_config(Top, bad_value)

    # Assert
    assert str(unknown.value) == f"{path}:2: unknown config key 'rouds' (did you mean 'rounds'?)"
    assert str(value.value) == f"{bad_value}:4: server: lr must be > 0, got -1.0"


def test_set_errors_name_the_set_item(tmp_path: Path) -> None:
    # Prepare: the file is fine, the --set is not
    path = tmp_path / "config.toml"
    path.write_text("rounds = 2\n")

    # Execute
    with pytest.raises(ConfigError) as unknown:
        load_config(Top, path, ["rouds=20"])
    with pytest.raises(ConfigError) as value:
        load_config(Top, path, ["server.lr=0"])
    with pytest.raises(ConfigError) as item:
        load_config(Top, None, ['dims=[1, "a"]'])

    # Assert
    assert str(unknown.value) == (
        "--set rouds=20: unknown config key 'rouds' (did you mean 'rounds'?)"
    )
    assert str(value.value) == "--set server.lr=0: server: lr must be > 0, got 0.0"
    assert str(item.value) == "--set dims=[1, \"a\"]: dims[1]: expected an integer, got 'a'"


def test_aliases_let_a_flat_config_take_dotted_keys() -> None:
    # Prepare: "model.dims" names the flat field "dims"
    aliases = {"model.dims": "dims", "model.rounds": "rounds"}

    # Execute
    cfg = load_config(Top, None, ["model.dims=[8]"], base={"rounds": 3}, aliases=aliases)

    # Assert: the alias sets the field; errors name the key as the user gave it
    assert cfg.dims == (8,) and cfg.rounds == 3
    with pytest.raises(ConfigError) as bad:
        load_config(Top, None, ['model.dims=["x"]'], aliases=aliases)
    assert str(bad.value) == "--set model.dims=[\"x\"]: model.dims[0]: expected an integer, got 'x'"
    with pytest.raises(ConfigError) as unknown:
        load_config(Top, None, ["model.dimz=[8]"], aliases=aliases)
    assert str(unknown.value) == (
        "--set model.dimz=[8]: unknown config key 'model.dimz' (did you mean 'model.dims'?)"
    )


def test_run_config_errors_name_the_file_or_the_set(tmp_path: Path) -> None:
    # Prepare
    from common.run.config import load_run_config

    path = tmp_path / "config.toml"
    path.write_text('name = "x"\nrouds = 20\n')

    # Execute
    with pytest.raises(ConfigError) as in_file:
        load_run_config(path)
    with pytest.raises(ConfigError) as in_set:
        load_run_config(None, ["server.sample_rate=2"])

    # Assert
    assert str(in_file.value) == (f"{path}:2: unknown config key 'rouds' (did you mean 'rounds'?)")
    assert str(in_set.value).startswith("--set server.sample_rate=2: server: sample_rate must be")

"""Config parsing: TOML + --set into frozen dataclasses, with one-line errors."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.config import apply_overrides, load_toml, parse, to_dict, to_toml
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

"""``fedrec client join``: the node config and the SuperNode command a device runs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w

from client.join import JoinConfig, node_config_of, supernode_command


def _config(tmp_path: Path, **changes: object) -> JoinConfig:
    fields: dict[str, object] = {
        "superlink": "fl.example.org:9093",
        "data": tmp_path / "history.csv",
        "ca": tmp_path / "ca.crt",
        "auth_key": tmp_path / "phone",
    }
    fields.update(changes)
    return JoinConfig(**fields)  # type: ignore[arg-type]


def test_node_config_names_the_device_files_by_absolute_path(tmp_path: Path) -> None:
    cfg = _config(tmp_path, keys=tmp_path / "keys", budget=4.0, min_contributors=20)
    config = node_config_of(cfg)
    assert config == {
        "data": str(tmp_path / "history.csv"),
        "keys": str(tmp_path / "keys"),
        "budget": 4.0,
        "min-contributors": "20",
    }
    assert tomllib.loads(tomli_w.dumps(config)) == config  # as written to disk
    assert cfg.node_home == tmp_path / "history.csv.fedrec-node"


def test_a_holder_floor_below_two_senders_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_contributors must be >= 2, got 1"):
        _config(tmp_path, min_contributors=1)


def test_supernode_command_uses_tls_authentication_and_a_local_runtime_port(
    tmp_path: Path,
) -> None:
    cmd = supernode_command(_config(tmp_path), node_config_file=tmp_path / "n.toml", runtime_port=9)
    assert cmd[0].endswith("flower-supernode")
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert flags["--superlink"] == "fl.example.org:9093"
    assert flags["--root-certificates"] == str(tmp_path / "ca.crt")
    assert flags["--auth-supernode-private-key"] == str(tmp_path / "phone")
    assert flags["--node-config"] == str(tmp_path / "n.toml")
    assert (flags["--host"], flags["--port"]) == ("127.0.0.1", "9")
    assert flags["--max-wait-time"] == "600.0"
    assert "--insecure" not in cmd


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"superlink": "no-port"}, "HOST:PORT"),
        ({"budget": 0.0}, "budget"),
        ({"budget": float("nan")}, "budget"),
        ({"max_wait": -1.0}, "max_wait"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, changes: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **changes)

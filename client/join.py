"""``fedrec client join``: this device joins a federation as an authenticated SuperNode.

Starts Flower's ``flower-supernode`` with TLS (``--root-certificates``: the operator's CA) and
the device's authentication key (``--auth-supernode-private-key``; the operator registered its
public key with ``fedrec deploy register``), and a node config that names the device's own
files (read by the ClientApp, :mod:`client.store`):

- ``data``: its history, ``user,item[,rating][,timestamp]``;
- ``keys``: its key folder when runs encrypt: in threshold mode its own (its signing key, and
  its key share if it becomes a key holder); in single-key mode ``client.ctx`` from the
  operator;
- ``budget``: its own epsilon budget, past which it refuses to train;
- ``min-contributors``: as a key holder, the fewest distinct senders of a sum it decrypts (the
  server cannot lower it).

It stays in the foreground, Flower's log on its output, until Ctrl-C or SIGTERM, or until the
SuperNode gives up reaching its SuperLink (``max_wait`` seconds, so that a SuperLink restart is
ridden out); then it stops the SuperNode and everything that started (its SuperExec and any
running ClientApp).
"""

from __future__ import annotations

import logging
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from common.errors import FedrecError
from common.io import atomic_write_bytes
from common.privacy.signing import DEVICE_KEY_FILE, load_or_create_signing_key, public_key_hex
from common.processes import flower_bin, flower_env, free_port, interrupts_raise, stop_tree

__all__ = ["JoinConfig", "join", "node_config_of", "supernode_command"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JoinConfig:
    """How a device joins a federation."""

    superlink: str
    """``HOST:PORT`` of the SuperLink; HOST must be a name in its TLS certificate."""
    data: Path
    """This device's history file (``user,item[,rating][,timestamp]``)."""
    ca: Path
    """CA certificate (PEM) that signed the SuperLink's certificate."""
    auth_key: Path
    """This device's private authentication key (OpenSSH format, ``fedrec deploy node-key``)."""
    keys: Path | None = None
    """Key folder; needed when runs encrypt updates (module docstring)."""
    budget: float | None = None
    """Epsilon this device will not exceed (> 0); default: the run's ``client_budget``."""
    min_contributors: int = 2
    """As a key holder: never decrypt a sum of fewer distinct registered senders (>= 2)."""
    home: Path | None = None
    """Flower's folder for this node (installed apps); default ``HISTORY.fedrec-node/``."""
    max_wait: float | None = 600.0
    """Seconds the SuperNode keeps trying to reach a SuperLink it lost; None: forever."""

    def __post_init__(self) -> None:
        host, _, port = self.superlink.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"superlink must be HOST:PORT, got {self.superlink!r}")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 0):
            raise ValueError(f"budget must be a finite number > 0, got {self.budget}")
        if self.min_contributors < 2:
            raise ValueError(f"min_contributors must be >= 2, got {self.min_contributors}")
        if self.max_wait is not None and not (math.isfinite(self.max_wait) and self.max_wait > 0):
            raise ValueError(f"max_wait must be a finite number > 0, got {self.max_wait}")

    @property
    def node_home(self) -> Path:
        """Flower's folder of this node."""
        if self.home is not None:
            return Path(self.home)
        data = Path(self.data).expanduser().resolve()
        return data.with_name(data.name + ".fedrec-node")


def _check_files(cfg: JoinConfig) -> None:
    for path, what in ((cfg.data, "history"), (cfg.ca, "CA certificate"), (cfg.auth_key, "key")):
        if not Path(path).expanduser().is_file():
            raise FedrecError(f"{path}: no such {what} file")
    if cfg.keys is not None and not Path(cfg.keys).expanduser().is_dir():
        raise FedrecError(
            f"{cfg.keys}: no such key folder (threshold mode: the device's own folder for its "
            "signing key and share; single-key mode: `fedrec keys init`'s client.ctx)"
        )


def node_config_of(cfg: JoinConfig) -> dict[str, str | float]:
    """The node config the ClientApp reads (absolute paths: it runs in another folder)."""
    config: dict[str, str | float] = {"data": str(Path(cfg.data).expanduser().resolve())}
    if cfg.keys is not None:
        config["keys"] = str(Path(cfg.keys).expanduser().resolve())
    if cfg.budget is not None:
        config["budget"] = float(cfg.budget)
    config["min-contributors"] = str(cfg.min_contributors)
    return config


def supernode_command(cfg: JoinConfig, *, node_config_file: Path, runtime_port: int) -> list[str]:
    """The ``flower-supernode`` command line of this device."""
    cmd = [
        flower_bin("flower-supernode"),
        "--superlink", cfg.superlink,
        "--root-certificates", str(Path(cfg.ca).expanduser().resolve()),
        "--auth-supernode-private-key", str(Path(cfg.auth_key).expanduser().resolve()),
        "--node-config", str(node_config_file),
        # the node's Runtime API, for its own ClientApp processes only: loopback
        "--host", "127.0.0.1",
        "--port", str(runtime_port),
    ]  # fmt: skip
    if cfg.max_wait is not None:
        cmd += ["--max-wait-time", str(cfg.max_wait)]
    return cmd


def join(cfg: JoinConfig) -> int:
    """Run this device's SuperNode in the foreground until it ends or is interrupted.

    Returns
    -------
    int
        The SuperNode's exit code; 130 after Ctrl-C, 143 after SIGTERM.

    Raises
    ------
    FedrecError
        If a file it needs is missing.
    """
    _check_files(cfg)
    if cfg.keys is not None:  # its signing key, made once: the operator registers its public part
        key = load_or_create_signing_key(Path(cfg.keys).expanduser() / DEVICE_KEY_FILE)
        logger.info("device signing key (register it with the operator): %s", public_key_hex(key))
    home = cfg.node_home
    home.mkdir(parents=True, exist_ok=True)
    node_config_file = home / "node-config.toml"
    # A TOML file avoids quoting `key="value"` pairs on a command line
    atomic_write_bytes(node_config_file, tomli_w.dumps(node_config_of(cfg)).encode())
    cmd = supernode_command(
        cfg, node_config_file=node_config_file, runtime_port=free_port("127.0.0.1")
    )
    logger.info("joining %s with %s", cfg.superlink, cfg.data)
    proc = subprocess.Popen(
        cmd, cwd=home, env=flower_env(home), stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        with interrupts_raise():
            return proc.wait()
    except KeyboardInterrupt:
        return 130
    except SystemExit as stop:  # SIGTERM, see interrupts_raise
        return int(stop.code) if isinstance(stop.code, int) else 1
    finally:
        stop_tree(proc)

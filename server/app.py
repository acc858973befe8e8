"""The fedrec ServerApp (Flower Message API).

It reads the run folder from ``context.run_config["run-dir"]`` (an absolute path, see
:func:`resolve_run_dir`), the resolved config from
``RUN_DIR/config.toml`` and hands the grid to :func:`server.federation.run_federation`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.run.config import load_run_config
from common.run.folder import n_clients_of, write_run_folder
from server.federation import run_federation
from server.grid import polling

__all__ = ["app", "resolve_run_dir"]

logger = logging.getLogger(__name__)

app = ServerApp()


def resolve_run_dir(value: str) -> Path:
    """The run folder named by the ``run-dir`` run config value: an absolute path.

    An empty one (pyproject's default, a bare ``flwr run .``) is refused with a one-line
    explanation rather than replaced by a default folder: the ClientApps read the same
    ``run-dir`` to find their rows, so a folder chosen here would never reach them.

    Raises
    ------
    ValueError
        If ``value`` is empty or a relative path.
    """
    if not value.strip():
        raise ValueError(
            "run-dir is empty: name an absolute run folder, e.g. "
            "flwr run . --run-config \"run-dir='/abs/path/runs/r1'\" "
            "(or run `fedrec simulate --config CONFIG --out RUN_DIR`)"
        )
    run_dir = Path(value)
    if not run_dir.is_absolute():
        raise ValueError(
            f"run-dir must be an absolute path (server and clients run in other folders), "
            f"got {value!r}"
        )
    return run_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run folder in ``context.run_config``."""
    run_dir = resolve_run_dir(str(context.run_config.get("run-dir", "")))
    if not (run_dir / "config.toml").is_file():
        # Driven by `flwr run .` rather than `fedrec simulate`: prepare the run folder here,
        # before any client is contacted (clients read their rows from it).
        config_path = Path(str(context.run_config["config"]))
        if not config_path.is_absolute():
            config_path = Path(__file__).resolve().parents[1] / config_path
        logger.info("preparing %s from %s", run_dir, config_path)
        write_run_folder(load_run_config(config_path), run_dir)
    cfg = load_run_config(run_dir / "config.toml")
    launched = int(context.run_config.get("expected-nodes", 0))  # set by `fedrec simulate`
    expected = launched or n_clients_of(run_dir)
    run_federation(polling(grid), cfg, run_dir, expected_nodes=expected, simulated=launched > 0)

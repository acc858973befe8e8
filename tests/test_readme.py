"""The README a newcomer reads: set-up first, every command listed, no link outside the repo."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from simulations.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _commands(parser: argparse.ArgumentParser, prefix: str = "fedrec") -> list[str]:
    """Every leaf command of the CLI, e.g. ``fedrec deploy local``."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        return [prefix]
    leaves: list[str] = []
    for name, sub in subparsers[0].choices.items():
        leaves += _commands(sub, f"{prefix} {name}")
    return leaves


def test_readme_starts_with_the_two_set_up_commands_their_time_and_python() -> None:
    first_block = README.split("```")[1]
    lines = [line for line in first_block.splitlines() if line.strip() and line != "bash"]
    assert lines[0].startswith("make demo") and lines[1].startswith("make test")
    assert all(re.search(r"\d+\s*min", line) for line in lines[:2])  # a time beside each
    assert "Python 3.11" in README.split("## ")[0]


def test_every_command_of_the_cli_is_in_the_commands_table() -> None:
    table = README.split("## Commands")[1].split("\n## ")[0]
    missing = [cmd for cmd in _commands(build_parser()) if f"`{cmd}" not in table]
    assert not missing, f"commands missing from the README's table: {missing}"


def test_readme_links_only_to_files_in_the_repository() -> None:
    assert "../shared" not in README and "DESIGN.md" not in README
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if target.startswith(("http://", "https://")):
            continue
        assert (ROOT / target).exists(), f"README links to {target}, which is not in the repo"


def test_metrics_are_explained_before_the_commands() -> None:
    intro = README.split("## Commands")[0]
    assert "NDCG@100" in intro and "Recall@20" in intro and "popularity" in intro


def test_readme_tells_that_dp_runs_differ_unless_their_noise_is_seeded() -> None:
    text = " ".join(README.split())  # one line, so that wrapped phrases match
    assert "operating system's entropy" in text and "privacy.noise_seed" in text
    assert "seeded, not private" in text

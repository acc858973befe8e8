"""report.html as a browser renders it: headless Chromium, offline, DOM dumped after load.

Skipped when Chromium is not installed (``.ci/run`` installs it where it can).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from simulations.report import write_report

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def _chromium() -> str:
    for candidate in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        found = shutil.which(candidate)
        if found:
            return found
    pytest.skip("Chromium is not installed (apt-get install chromium): no browser to render with")


def _run(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(profile)}  # nothing lands in the real home
    return subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_chromium_renders_the_baselines_privacy_box_and_plots(dp_run: Path, tmp_path: Path) -> None:
    # Prepare
    browser = _chromium()
    report = write_report(dp_run)
    url = report.resolve().as_uri()

    # Execute
    dom = _run(browser, tmp_path / "profile-dom", "--dump-dom", url)
    shot = tmp_path / "report.png"
    screenshot = _run(
        browser,
        tmp_path / "profile-shot",
        "--window-size=1280,2000",
        "--hide-scrollbars",
        f"--screenshot={shot}",
        url,
    )

    # Assert
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert '<section id="baselines">' in page
    assert re.search(r"popularity \d\.\d{4} \(federated / popularity \d+\.\d%\)", page)
    assert "EASE (λ=" in page
    privacy = page.split('<section id="privacy"', 1)[1].split("</section>", 1)[0]
    for label in ("target ε", "ε spent", "δ", "noise multiplier z", "clip C", "sample rate q"):
        assert label in privacy
    assert "population N" in privacy and "VERIFIED" in privacy
    images = re.findall(r'<img id="(plot-[a-z]+)" alt="([^"]+)" src="data:image/png;base64,', page)
    assert [i for i, _ in images] == ["plot-metrics", "plot-epsilon", "plot-cost"]
    assert all(alt for _, alt in images)
    assert screenshot.returncode == 0, screenshot.stderr[-2000:]
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

"""Pictures and an offline HTML page for a finished (or partial) federated run.

Modules: :mod:`.results` (reading ``results.json``), :mod:`.plots` (the pictures),
:mod:`.page` (the HTML page).

Reads ``RUN_DIR/results.json`` (and ``RUN_DIR/ledger.jsonl`` when the run kept one) and writes
``metrics.png``, ``cost.png``, ``epsilon.png`` (when the run tracked a privacy budget) and
``report.html`` next to it. The HTML page is one self-contained file: the pictures are embedded
as base64 ``data:`` URIs and the CSS is inline, so it opens offline and can be mailed around.

The page, top to bottom, with the element ids tests and readers can rely on:

- ``#baselines``: the headline, federated test NDCG@100 beside the popularity and EASE baselines
  and the centralized reference (all on the run's held-out test users), with ratios, and the
  warm start's model alone where the run began with one and trained after it;
- ``#warm-start`` (only with a warm start): how the model was initialized from the two DP
  releases, its test NDCG@100 before any round, and the releases (``#warm-releases``);
- ``#privacy``: the privacy box: mode, target and spent epsilon (PRV, with RDP beside it),
  delta, noise multiplier, clip, sample rate, population, rounds (and the releases composed
  with them) and the verdict of :func:`common.privacy.audit.verify_ledger` on the run's ledger;
- ``#run``: rounds, wall time and traffic; ``#plots``: the three PNGs (a note instead for a
  warm start alone);
- ``#rounds``: every round in a scrolling table with a sticky header;
- ``#config``: the run configuration as dotted keys and values;
- ``#provenance``: package versions and the git commit that produced the run.

Plots are drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas directly, so no global
``pyplot`` state is touched and the module is safe to call from any thread or test.
"""

from simulations.report.page import write_report
from simulations.report.plots import epsilon_figure, plot_cost, plot_epsilon, plot_metrics
from simulations.report.results import load_results

__all__ = [
    "epsilon_figure",
    "load_results",
    "plot_cost",
    "plot_epsilon",
    "plot_metrics",
    "write_report",
]

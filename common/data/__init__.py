"""The data layer: read, clean, split and summarize implicit-feedback datasets.

``load_dataset("ml-100k")`` fetches the embedded default, and ``"ml-1m"`` and
``"pinterest-20"`` are fetched the same way (see :mod:`common.data.fetch`); any other spec is a
path to a file or folder in one of the formats of :mod:`common.data.readers`.
:func:`split_strong_generalization` implements the protocol of Liang et al. 2018;
:func:`synthesize` writes power-law data for scale tests.
"""

from common.data.fetch import default_cache_dir, fetch_dataset, fetch_ml100k
from common.data.loading import load_dataset
from common.data.split import export_split, split_strong_generalization
from common.data.stats import dataset_stats
from common.data.synth import synthesize
from common.data.types import CleaningReport, Dataset, Split

__all__ = [
    "CleaningReport",
    "Dataset",
    "Split",
    "dataset_stats",
    "default_cache_dir",
    "export_split",
    "fetch_dataset",
    "fetch_ml100k",
    "load_dataset",
    "split_strong_generalization",
    "synthesize",
]

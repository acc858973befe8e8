"""Dataset statistics: hand-checked on a toy set, and the real ML-100K numbers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from common.data import dataset_stats, load_dataset

ML100K = next(
    (
        folder
        for folder in (
            Path("/tmp/rb/recbole/dataset_example/ml-100k"),
            Path.home() / ".cache" / "fedrec" / "ml-100k",  # fedrec data fetch ml-100k
        )
        if (folder / "ml-100k.inter").exists()
    ),
    Path("/tmp/rb/recbole/dataset_example/ml-100k"),
)


def test_stats_of_a_toy_dataset(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("".join(f"{u},{i}\n" for u in (1, 2) for i in range(u * 2)))
    stats = dataset_stats(load_dataset(path, min_user_positives=1))
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 4, 6)
    assert stats["density"] == pytest.approx(6 / 8)
    assert stats["per_user"] == {
        "min": 2.0, "25%": 2.5, "50%": 3.0, "75%": 3.5, "90%": 3.8, "99%": 3.98, "max": 4.0
    }  # fmt: skip
    assert stats["per_item"]["min"] == 1.0 and stats["per_item"]["max"] == 2.0
    assert stats["cleaning"]["rows_read"] == 6 and stats["min_rating"] is None
    json.dumps(stats)


@pytest.mark.skipif(not (ML100K / "ml-100k.inter").exists(), reason="no local ML-100K copy")
def test_ml100k_after_liang_preprocessing() -> None:
    start = time.perf_counter()
    ds = load_dataset(ML100K)
    elapsed = time.perf_counter() - start
    stats = dataset_stats(ds)
    assert ds.name == "ml-100k"
    assert ds.sha256 == "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"
    assert (stats["users"], stats["items"], stats["interactions"]) == (938, 1447, 55361)
    cleaning = stats["cleaning"]
    assert all(bad == {"count": 0, "first": []} for bad in cleaning.pop("bad_rows").values())
    assert cleaning == {
        "rows_read": 100000,
        "bad_rows_dropped": 0,  # a clean file
        "below_threshold_dropped": 44625,
        "users_dropped": 5,  # of 943
        "rows_of_dropped_users": 14,
        "id_types": {"user": "integer", "item": "integer"},
    }
    assert stats["per_user"]["min"] == 5.0
    assert set(ds.user_features) == {"age", "gender", "occupation", "zip_code"}
    assert all(ds.item_genres) and all(ds.item_titles)
    assert elapsed < 10  # generous bound; it is well under 2 s on a laptop

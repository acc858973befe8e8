"""Threshold key folders: owner-only shares, checked against their digest and the ceremony."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from common.he import ParamSet, load_server_context
from common.he.ceremony import (
    LocalCeremony,
    holder_deal,
    holder_finish,
    holder_start,
    new_plan,
    run_local,
)
from common.he.keys import KeyDirError, fingerprint_of
from common.he.shares import (
    Transcript,
    is_threshold,
    load_share,
    load_transcript,
    save_share,
    write_public,
)
from common.he.threshold import KeyShare, ThresholdError

PARAMS = ParamSet.THRESHOLD.params


@pytest.fixture(scope="module")
def ceremony() -> LocalCeremony:
    return run_local(PARAMS, holders=3, threshold=2)


def _transcript(done: LocalCeremony) -> Transcript:
    return Transcript(
        ceremony_id=done.plan.ceremony_id,
        seed=done.plan.seed.hex(),
        holders=done.plan.holders,
        threshold=done.plan.threshold,
        fingerprint=fingerprint_of(done.context),
        commitments={s.index: s.digest() for s in done.shares},
        clients={s.index: 10 + s.index for s in done.shares},
    )


def _lay_out(tmp_path: Path, done: LocalCeremony) -> tuple[Path, list[Path]]:
    public = tmp_path / "public"
    write_public(public, context=done.context, params=PARAMS, transcript=_transcript(done))
    folders = []
    for share in done.shares:
        folder = tmp_path / f"holder-{share.index}"
        save_share(folder, share, ceremony_id=done.plan.ceremony_id)
        folders.append(folder)
    return public, folders


def test_a_ceremony_lays_out_a_public_folder_and_owner_only_shares(
    tmp_path: Path, ceremony: LocalCeremony
) -> None:
    # Execute
    public, folders = _lay_out(tmp_path, ceremony)

    # Assert: the server's loader reads the public folder; no secret key anywhere
    keys = load_server_context(public)
    assert keys.fingerprint == fingerprint_of(ceremony.context)
    assert not keys.context.has_secret_key() and is_threshold(public)
    assert load_transcript(public) == _transcript(ceremony)
    for folder, share in zip(folders, ceremony.shares, strict=True):
        path = folder / "share.json"
        assert path.stat().st_mode & 0o777 == 0o600
        assert folder.stat().st_mode & 0o777 == 0o700
        loaded = load_share(folder, transcript=load_transcript(public))
        assert loaded.index == share.index and loaded.digest() == share.digest()
        np.testing.assert_array_equal(loaded.residues, share.residues)
        assert "residues" in json.loads(path.read_text())  # and nothing else secret
    assert not any(p.name == "client.ctx" for p in tmp_path.rglob("*"))


def test_every_holder_computes_the_same_key_and_no_strict_subset_of_shares_is_the_key(
    ceremony: LocalCeremony,
) -> None:
    # Assert: each share is a different point; all name the same collective key
    fingerprints = {s.fingerprint for s in ceremony.shares}
    assert fingerprints == {fingerprint_of(ceremony.context)}
    digests = {s.digest() for s in ceremony.shares}
    assert len(digests) == 3


def test_a_tampered_share_file_is_refused(tmp_path: Path, ceremony: LocalCeremony) -> None:
    # Prepare
    public, folders = _lay_out(tmp_path, ceremony)
    path = folders[0] / "share.json"
    body = json.loads(path.read_text())
    other = json.loads((folders[1] / "share.json").read_text())

    # Execute / Assert: another holder's residues under this holder's digest
    body["residues"] = other["residues"]
    path.write_text(json.dumps(body))
    os.chmod(path, 0o600)
    with pytest.raises(KeyDirError, match="does not match its digest"):
        load_share(folders[0])
    # a consistent forgery (digest recomputed) is not the holder's commitment
    mine, theirs = ceremony.shares[0], ceremony.shares[1]
    forged = KeyShare(
        index=mine.index,
        holders=mine.holders,
        threshold=mine.threshold,
        params=PARAMS,
        fingerprint=mine.fingerprint,
        residues=theirs.residues,
    )
    body["digest"] = forged.digest()
    path.write_text(json.dumps(body))
    with pytest.raises(KeyDirError, match="not the one committed in the ceremony"):
        load_share(folders[0], transcript=load_transcript(public))


def test_a_share_readable_by_others_or_of_another_key_is_refused(
    tmp_path: Path, ceremony: LocalCeremony
) -> None:
    # Prepare
    _, folders = _lay_out(tmp_path, ceremony)
    other = run_local(PARAMS, holders=3, threshold=2)
    other_public = tmp_path / "other"
    write_public(other_public, context=other.context, params=PARAMS, transcript=_transcript(other))

    # Execute / Assert
    with pytest.raises(KeyDirError, match="a share of key"):
        load_share(folders[0], transcript=load_transcript(other_public))
    os.chmod(folders[0] / "share.json", 0o644)
    with pytest.raises(KeyDirError, match="readable by its owner only"):
        load_share(folders[0])


def test_the_public_folder_refuses_a_context_that_does_not_match(
    tmp_path: Path, ceremony: LocalCeremony
) -> None:
    other = run_local(PARAMS, holders=2, threshold=2)
    with pytest.raises(KeyDirError, match="does not match the public context"):
        write_public(
            tmp_path / "public",
            context=other.context,
            params=PARAMS,
            transcript=_transcript(ceremony),
        )


def test_a_sealed_share_that_was_changed_in_transit_does_not_open() -> None:
    # Prepare: a two-holder ceremony run by hand
    plan = new_plan(PARAMS, holders=2, threshold=2)
    started = {j: holder_start(plan, j) for j in plan.holders}
    exchange = {j: started[j][2] for j in plan.holders}
    publics = {j: started[j][1] for j in plan.holders}
    dealt = {i: holder_deal(started[i][0], exchange) for i in plan.holders}
    sealed = {i: dealt[i][1] for i in plan.holders}
    flipped = bytearray(sealed[2])
    flipped[40] ^= 1

    # Execute / Assert
    share, _ = holder_finish(
        started[1][0], public_shares=publics, sealed=sealed, exchange_keys=exchange
    )
    assert share.index == 1
    with pytest.raises(ThresholdError, match="does not open"):
        holder_finish(
            started[1][0],
            public_shares=publics,
            sealed={**sealed, 2: bytes(flipped)},
            exchange_keys=exchange,
        )
    # what was sealed to holder 2 does not open for holder 1
    with pytest.raises(ThresholdError, match="does not open"):
        holder_finish(
            started[1][0],
            public_shares=publics,
            sealed={1: dealt[1][2], 2: dealt[2][2]},
            exchange_keys=exchange,
        )


def test_cli_keys_ceremony_and_share(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli import main

    # Execute
    made = main(["keys", "ceremony", "--out", str(tmp_path / "k"), "--holders", "3"])
    again = main(["keys", "ceremony", "--out", str(tmp_path / "k"), "--holders", "3"])
    minority = main(
        ["keys", "ceremony", "--out", str(tmp_path / "m"), "--holders", "4", "--threshold", "2"]
    )
    shown = main(
        [
            "keys",
            "share",
            str(tmp_path / "k" / "holders" / "2"),
            "--public",
            str(tmp_path / "k"),
            "--json",
        ]
    )

    # Assert
    assert (made, again, minority, shown) == (0, 2, 2, 0)
    out = capsys.readouterr().out
    fingerprint = load_server_context(tmp_path / "k").fingerprint
    assert f"fingerprint {fingerprint}" in out and "(2-of-3, threshold)" in out
    info = json.loads(out[out.index("{") :])
    assert info["index"] == 2 and info["threshold"] == 2 and info["fingerprint"] == fingerprint
    assert info["checked_against_ceremony"] is True and info["ciphertexts_decrypted"] is None
    assert "residues" not in info
    assert not (tmp_path / "m").exists() or not is_threshold(tmp_path / "m")

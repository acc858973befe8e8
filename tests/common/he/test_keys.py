"""Key folders: owner-only files, no overwrite without force, and no secret key on the server."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from tenseal import sealapi

from common.he import (
    ParamSet,
    add_updates,
    decrypt_sum,
    encrypt_update,
    fingerprint_of,
    init_keys,
    load_client_context,
    load_server_context,
)
from common.he._seal import buffer
from common.he.keys import CLIENT_CONTEXT, FINGERPRINT, PARAMS, SERVER_CONTEXT, KeyDirError
from simulations.cli import main


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("he") / "keys"
    init_keys(path, params=ParamSet.FEDREC.params)
    return path


def _copy(keydir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "keys"
    shutil.copytree(keydir, target)
    return target


def test_init_writes_owner_only_files(keydir: Path) -> None:
    # Assert
    assert (os.stat(keydir).st_mode & 0o777) == 0o700
    for name in (CLIENT_CONTEXT, SERVER_CONTEXT, FINGERPRINT, PARAMS):
        assert (os.stat(keydir / name).st_mode & 0o777) == 0o600, name
    assert json.loads((keydir / PARAMS).read_text())["name"] == "fedrec"
    assert len((keydir / FINGERPRINT).read_text().strip()) == 64


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    # Prepare
    first = init_keys(tmp_path / "k", params=ParamSet.FEDREC.params)

    # Execute / Assert
    with pytest.raises(KeyDirError, match=r"already holds keys.*--force"):
        init_keys(tmp_path / "k", params=ParamSet.FEDREC.params)
    assert (tmp_path / "k" / FINGERPRINT).read_text().strip() == first.value
    second = init_keys(tmp_path / "k", params=ParamSet.FEDREC.params, force=True)
    assert second.value != first.value
    assert load_server_context(tmp_path / "k").fingerprint == second.value


def test_client_and_server_agree_on_the_fingerprint(keydir: Path) -> None:
    # Execute
    client, server = load_client_context(keydir), load_server_context(keydir)

    # Assert
    assert client.fingerprint == server.fingerprint == (keydir / FINGERPRINT).read_text().strip()
    assert fingerprint_of(server.context) == client.fingerprint
    assert client.context.has_secret_key()
    assert not server.context.has_secret_key()


def test_server_context_cannot_decrypt(keydir: Path) -> None:
    # Prepare
    client, server = load_client_context(keydir), load_server_context(keydir)
    vector = ts.ckks_vector(client.context, [1.0, 2.0, 3.0]).serialize()
    update = encrypt_update({"w": np.array([1.0, 2.0], dtype=np.float32)}, keys=client)
    total = add_updates([update], keys=server)

    # Execute / Assert: TenSEAL, SEAL and fedrec's codec all refuse without the secret key
    with pytest.raises(ValueError, match="doesn't hold a secret_key"):
        ts.ckks_vector_from(server.context, vector).decrypt()
    with pytest.raises(ValueError):
        server.context.secret_key()
    with pytest.raises(ValueError, match="secret key"):
        decrypt_sum(
            total,
            keys=server,  # type: ignore[arg-type]
            flood_std=1e-6,
            rng=np.random.default_rng(0),
        )
    assert server.seal.decryptor is None and server.seal.encryptor is None


def test_server_loader_refuses_a_context_with_the_secret_key(keydir: Path, tmp_path: Path) -> None:
    # Prepare: the operator copies client.ctx where server.ctx belongs (same fingerprint)
    bad = _copy(keydir, tmp_path)
    shutil.copy(bad / CLIENT_CONTEXT, bad / SERVER_CONTEXT)

    # Execute / Assert
    with pytest.raises(KeyDirError, match="holds the secret key"):
        load_server_context(bad)


def test_client_loader_refuses_the_public_context(keydir: Path, tmp_path: Path) -> None:
    bad = _copy(keydir, tmp_path)
    shutil.copy(bad / SERVER_CONTEXT, bad / CLIENT_CONTEXT)
    with pytest.raises(KeyDirError, match="no secret key"):
        load_client_context(bad)


def test_fingerprint_mismatch_is_refused(keydir: Path, tmp_path: Path) -> None:
    bad = _copy(keydir, tmp_path)
    (bad / FINGERPRINT).write_text("0" * 64 + "\n")
    with pytest.raises(KeyDirError, match="fingerprint"):
        load_server_context(bad)


def test_insecure_params_json_is_refused_on_load(keydir: Path, tmp_path: Path) -> None:
    # Prepare: n=2048 allows 54 coefficient bits, 30 + 30 = 60
    bad = _copy(keydir, tmp_path)
    insecure = {"name": "weak", "poly_modulus_degree": 2048, "coeff_mod_bit_sizes": [30, 30]}
    (bad / PARAMS).write_text(json.dumps({**insecure, "scale_bits": 20}))

    # Execute / Assert
    with pytest.raises(KeyDirError, match="coeff_mod_bit_sizes total 60 bits exceeds 54"):
        load_server_context(bad)


def test_context_other_than_params_json_is_refused(tmp_path: Path) -> None:
    # Prepare: a FLARE-parameter key pair whose params.json claims fedrec's set
    keydir = tmp_path / "keys"
    init_keys(keydir, params=ParamSet.FLARE_DEFAULT.params)
    (keydir / PARAMS).write_text(json.dumps(ParamSet.FEDREC.params.to_json()))

    # Execute / Assert
    with pytest.raises(KeyDirError, match="poly_modulus_degree of the context is 8192"):
        load_client_context(keydir)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_insecure_context_file_is_refused_on_load(keydir: Path, tmp_path: Path) -> None:
    # Prepare: server.ctx is a protobuf of field 1 (SEAL parameters) then field 2 (public part);
    # swap field 1 for n=2048 with 60 coefficient bits, which no secure API can create
    bad = _copy(keydir, tmp_path)
    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(2048)
    parms.set_coeff_modulus(sealapi.CoeffModulus.Create(2048, [30, 30]))
    weak = buffer().save(parms)
    original = (bad / SERVER_CONTEXT).read_bytes()
    assert original[0] == 0x0A  # field 1, length-delimited
    length, i, shift = 0, 1, 0
    while True:
        length |= (original[i] & 0x7F) << shift
        shift, i = shift + 7, i + 1
        if original[i - 1] < 0x80:
            break
    (bad / SERVER_CONTEXT).write_bytes(b"\x0a" + _varint(len(weak)) + weak + original[i + length :])

    # Execute / Assert
    with pytest.raises(KeyDirError, match="not a valid TenSEAL context"):
        load_server_context(bad)


def test_missing_folder_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(KeyDirError, match="cannot read"):
        load_server_context(tmp_path / "nowhere")


def test_cli_keys_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    first = main(["keys", "init", "--out", str(tmp_path / "k"), "--params", "fedrec"])
    again = main(["keys", "init", "--out", str(tmp_path / "k")])
    forced = main(["keys", "init", "--out", str(tmp_path / "k"), "--force"])

    # Assert
    assert (first, again, forced) == (0, 2, 0)
    fingerprint = (tmp_path / "k" / FINGERPRINT).read_text().strip()
    assert fingerprint in capsys.readouterr().out
    assert load_server_context(tmp_path / "k").fingerprint == fingerprint

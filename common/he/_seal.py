"""A thin layer over ``tenseal.sealapi`` (Microsoft SEAL's own objects inside TenSEAL).

TenSEAL's ``CKKSVector`` cannot make *seeded* ciphertexts: SEAL's symmetric-key encryption can
replace the uniformly random half of a ciphertext by the 64-byte seed of the PRNG that made it,
which halves the bytes on the wire (SEAL 3.6+, ``Encryptor::encrypt_symmetric`` returning a
``Serializable<Ciphertext>``). TenSEAL 0.3.18's ``sealapi`` exposes that call, but its ``save`` and
``load`` read and write a *file path* only. :class:`SealBuffer` gives them an in-memory file
(``memfd_create``, reached as ``/proc/self/fd/N``), or a private temporary file where that does not
exist, so no ciphertext ever touches a disk on Linux.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import tenseal as ts
from tenseal import sealapi

__all__ = ["SealBuffer", "SealTools", "buffer"]


class SealBuffer:
    """A reusable file that SEAL objects are saved to and loaded from; one per thread."""

    def __init__(self) -> None:
        self._tmpdir: str | None = None
        memfd = getattr(os, "memfd_create", None)
        if memfd is not None and Path("/proc/self/fd").is_dir():
            self._fd = memfd("fedrec-seal", os.MFD_CLOEXEC)
            self._path = f"/proc/self/fd/{self._fd}"
        else:
            # mkdtemp makes the folder 0o700: other users cannot read the ciphertexts
            self._tmpdir = tempfile.mkdtemp(prefix="fedrec-seal-")
            self._path = os.path.join(self._tmpdir, "obj")
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)

    def save(self, obj: Any) -> bytes:
        """``obj.save(path)`` (any SEAL object or ``Serializable``), returned as bytes."""
        obj.save(self._path)
        size = os.fstat(self._fd).st_size
        return os.pread(self._fd, size, 0)

    def load(self, obj: Any, context: Any, data: bytes) -> None:
        """``obj.load(context, path)`` from ``data``; SEAL checks the bytes and raises if bad."""
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        obj.load(context, self._path)

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self._fd)
            if self._tmpdir is not None:
                os.unlink(self._path)
                os.rmdir(self._tmpdir)


_local = threading.local()


def buffer() -> SealBuffer:
    """This thread's :class:`SealBuffer` (SEAL calls hold the GIL; threads get their own file)."""
    buf: SealBuffer | None = getattr(_local, "buffer", None)
    if buf is None:
        buf = SealBuffer()
        _local.buffer = buf
    return buf


class SealTools:
    """SEAL encoder, evaluator and (with a secret key) encryptor and decryptor of one context."""

    def __init__(self, context: ts.Context) -> None:
        self.seal_context = context.seal_context().data
        self.encoder = sealapi.CKKSEncoder(self.seal_context)
        self.evaluator = sealapi.Evaluator(self.seal_context)
        self.first_parms_id = self.seal_context.first_parms_id()
        self.encryptor: Any = None
        self.decryptor: Any = None
        self.public_encryptor: Any = None
        if context.has_secret_key():
            secret = context.secret_key().data
            self.encryptor = sealapi.Encryptor(self.seal_context, secret)
            self.decryptor = sealapi.Decryptor(self.seal_context, secret)
        elif context.has_public_key():  # a threshold scheme's collective public context
            self.public_encryptor = sealapi.Encryptor(self.seal_context, context.public_key().data)

    def new_ciphertext(self) -> Any:
        """An empty SEAL ciphertext to load into."""
        return sealapi.Ciphertext(self.seal_context)

    def new_plaintext(self) -> Any:
        """An empty SEAL plaintext to encode or decrypt into."""
        return sealapi.Plaintext()

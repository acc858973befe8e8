"""What a message costs on the wire: ciphertext lists are counted without serializing them."""

from __future__ import annotations

import os

from flwr.app import ConfigRecord, RecordDict

from server.aggregation import _config_size, wire_bytes


def test_a_large_list_of_bytes_is_counted_as_protobuf_lays_it_out() -> None:
    # Prepare: an encrypted reply's record (22 chunks of 256 KiB) and a small one
    chunks = [os.urandom(262_144 + i) for i in range(22)]
    record = ConfigRecord({"version": 1, "kind": "update", "chunks": chunks, "layout": "[]"})
    small = ConfigRecord({"version": 1, "chunks": [b"ab", b"cd"]})

    # Execute
    counted = _config_size(record)

    # Assert: within a few bytes of the serialized size, and exact for small records
    exact = len(record.deflate())
    assert abs(counted - exact) <= 16
    assert _config_size(small) == len(small.deflate())
    assert wire_bytes(RecordDict({"he": record})) >= counted

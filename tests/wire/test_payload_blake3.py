"""The BLAKE3 digest: named by the manifest, checked like sha256, never a way around it."""

import hashlib

import blake3
import numpy as np
import pytest

from fedpilot.v1 import errors_pb2, transfer_pb2
from fedpilot.wire import PayloadReceiver, WireError, encode_tensors, iter_chunks
from fedpilot.wire.payload import EncodedPayload


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "m/lora_A": rng.standard_normal((4, 300)).astype(np.float32),
        "m/lora_B": rng.standard_normal((300, 4)).astype(np.float32),
    }


def _feed(rx: PayloadReceiver, data: bytes) -> PayloadReceiver:
    for part in iter_chunks(bytes(data), 1000):
        rx.feed(part)
    return rx


def _reason(excinfo) -> str:
    return errors_pb2.ErrorReason.Name(excinfo.value.reason)


def test_a_blake3_manifest_names_only_blake3_and_round_trips() -> None:
    data, manifest = encode_tensors(_tensors(), "blake3")
    assert manifest.sha256 == ""
    assert manifest.blake3 == blake3.blake3(bytes(data)).hexdigest()
    out = _feed(PayloadReceiver(manifest), data).finish()
    assert all(np.array_equal(out[k], v) for k, v in _tensors().items())


def test_the_streamed_encoding_hashes_what_it_sends() -> None:
    payload = EncodedPayload(_tensors(), "blake3")
    joined = b"".join(payload.chunks(1000))
    assert blake3.blake3(joined).hexdigest() == payload.digest
    assert payload.sha256 == ""


def test_one_flipped_byte_fails_the_blake3_check() -> None:
    data, manifest = encode_tensors(_tensors(), "blake3")
    data[200] ^= 1
    with pytest.raises(WireError, match="blake3 of the received bytes") as e:
        _feed(PayloadReceiver(manifest), data).finish()
    assert _reason(e) == "ERROR_REASON_CHECKSUM_MISMATCH"
    assert e.value.field == "manifest.blake3"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({}, "carries no digest"),
        ({"blake3": "ab" * 31}, "manifest.blake3 must be 64 lowercase hex"),
        ({"blake3": "AB" * 32}, "manifest.blake3 must be 64 lowercase hex"),
        ({"blake3": "0" * 64, "sha256": "z" * 64}, "manifest.sha256 must be 64 lowercase hex"),
    ],
)
def test_missing_or_malformed_digests_are_refused_before_any_byte(fields, match) -> None:
    _, honest = encode_tensors(_tensors())
    manifest = transfer_pb2.PayloadManifest(
        tensors=honest.tensors, total_bytes=honest.total_bytes, **fields
    )
    with pytest.raises(WireError, match=match) as e:
        PayloadReceiver(manifest)
    assert _reason(e) == "ERROR_REASON_MALFORMED"


def test_a_receiver_holding_the_sha256_checks_both_digests() -> None:
    """The coordinator computes sha256 anyway (blobs are stored under it): a correct BLAKE3
    does not excuse a wrong sha256 beside it."""
    data, manifest = encode_tensors(_tensors(), "blake3")
    manifest.sha256 = hashlib.sha256(b"other bytes").hexdigest()
    rx = _feed(PayloadReceiver(manifest, keep=False, hashing=False), data)
    with pytest.raises(WireError, match="sha256 of the received bytes") as e:
        rx.finish_with(data, sha256=hashlib.sha256(bytes(data)).hexdigest())
    assert e.value.field == "manifest.sha256"
    rx = _feed(PayloadReceiver(manifest, keep=False, hashing=False), data)
    manifest.sha256 = hashlib.sha256(bytes(data)).hexdigest()
    rx.finish_with(data, sha256=manifest.sha256)


def test_with_both_digests_a_receiver_that_hashes_itself_checks_blake3() -> None:
    """A worker downloading a manifest with both checks the fast one; a wrong BLAKE3 beside
    a right sha256 is refused, so the fast digest is never the weaker check."""
    data, manifest = encode_tensors(_tensors())
    manifest.blake3 = blake3.blake3(b"other bytes").hexdigest()
    with pytest.raises(WireError, match="blake3") as e:
        _feed(PayloadReceiver(manifest), data).finish()
    assert _reason(e) == "ERROR_REASON_CHECKSUM_MISMATCH"

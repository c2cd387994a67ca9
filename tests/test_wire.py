"""The tensor wire format: encode, chunk, reassemble, decode, and every way a payload can be wrong."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from federation import wire
from federation.wire import Chunk, Manifest, Reassembler, WireError, chunk, decode_state, encode_state

ALL_DTYPES = ["float32", "float64", "int64", "int32", "uint32", "uint64", "bool"]


def _sample(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def _state() -> dict[str, np.ndarray]:
    return {
        "encoder.weight": _sample("float32", (4, 3), 0),
        "encoder.bias": _sample("float32", (4,), 1),
        "steps": np.array(7, dtype=np.int64),
        "mask": _sample("bool", (2, 5), 2),
    }


def _roundtrip(named: dict[str, np.ndarray], max_chunk: int = 7) -> dict[str, np.ndarray]:
    enc = encode_state(named)
    manifest = Manifest.from_json(enc.manifest.to_json())
    r = Reassembler(max_payload_bytes=len(enc.payload), payload_sha256=manifest.payload_sha256)
    for piece in chunk(enc, max_chunk):
        r.add(piece)
    return decode_state(manifest, r.payload())


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_allowed_dtype_round_trips_exactly(dtype: str) -> None:
    named = {"t": _sample(dtype, (3, 2, 5), 3), "scalar": _sample(dtype, (), 4), "empty": _sample(dtype, (0, 4), 5)}
    out = _roundtrip(named)
    assert list(out) == list(named)
    for name, arr in named.items():
        assert out[name].dtype == np.dtype(dtype) and out[name].shape == arr.shape
        np.testing.assert_array_equal(out[name], arr)
        assert out[name].flags.writeable


def test_big_endian_input_is_sent_little_endian_and_decoded_natively() -> None:
    values = np.arange(6, dtype=">f8").reshape(2, 3)
    enc = encode_state({"x": values})
    assert enc.payload[:8] == np.float64(0.0).tobytes() and enc.payload[8:16] == np.array(1.0, "<f8").tobytes()
    out = decode_state(enc.manifest, enc.payload)
    assert out["x"].dtype.byteorder in ("=", "|")
    np.testing.assert_array_equal(out["x"], values)


def test_non_contiguous_input_is_encoded_in_logical_order() -> None:
    base = np.arange(12, dtype=np.int32).reshape(3, 4)
    out = _roundtrip({"t": base.T, "s": base[:, ::2]})
    np.testing.assert_array_equal(out["t"], base.T)
    np.testing.assert_array_equal(out["s"], base[:, ::2])


@pytest.mark.parametrize("dtype", [np.float16, np.complex64, np.int8, np.uint8, np.int16, object, "U3"])
def test_dtypes_outside_the_allow_list_are_refused(dtype: object) -> None:
    with pytest.raises(WireError, match=r"tensor 'bad': dtype .* not allowed"):
        encode_state({"ok": np.zeros(2, np.float32), "bad": np.zeros(2, dtype=dtype)})


def test_manifest_layout_and_json_round_trip() -> None:
    enc = encode_state(_state())
    m = enc.manifest
    assert [t.name for t in m.tensors] == ["encoder.weight", "encoder.bias", "steps", "mask"]
    assert [(t.offset, t.length) for t in m.tensors] == [(0, 48), (48, 16), (64, 8), (72, 10)]
    assert m.payload_bytes == len(enc.payload) == 82
    text = m.to_json()
    assert json.loads(text)["tensors"][0] == {
        "name": "encoder.weight",
        "dtype": "float32",
        "shape": [4, 3],
        "offset": 0,
        "length": 48,
    }
    assert Manifest.from_json(text) == m


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(version=2), "unsupported wire format version 2"),
        (lambda d: d.update(extra=1), r"unknown keys \['extra'\]"),
        (lambda d: d.pop("payload_sha256"), r"missing keys \['payload_sha256'\]"),
        (lambda d: d["tensors"][1].update(dtype="float16"), "'encoder.bias': dtype 'float16' not allowed"),
        (lambda d: d["tensors"][1].update(shape=[5]), r"'encoder.bias': length 16 does not match shape \(5,\)"),
        (lambda d: d["tensors"][1].update(shape=[-4]), "negative dimension"),
        (lambda d: d["tensors"][1].update(offset=40), "'encoder.bias': offset 40, expected 48"),
        (lambda d: d["tensors"][2].update(name="encoder.bias"), "'encoder.bias': name appears twice"),
        (lambda d: d["tensors"][0].update(shape=[4, "3"]), r"manifest.tensors\[0\].shape: expected an integer"),
        (lambda d: d.update(payload_bytes=100), "payload_bytes is 100 but the tensors span 82"),
        (lambda d: d.update(payload_sha256="XYZ"), "64 lowercase hex"),
    ],
)
def test_malformed_manifests_are_refused_with_the_field(edit, message: str) -> None:
    data = encode_state(_state()).manifest.to_dict()
    edit(data)
    with pytest.raises(WireError, match=message):
        Manifest.from_json(json.dumps(data))


def test_chunks_cover_the_payload_and_carry_checksums() -> None:
    enc = encode_state(_state())
    pieces = chunk(enc, 20)
    assert [p.index for p in pieces] == [0, 1, 2, 3, 4] and all(p.total == 5 for p in pieces)
    assert all(len(p.data) <= 20 for p in pieces) and b"".join(p.data for p in pieces) == enc.payload
    assert all(p.payload_sha256 == enc.manifest.payload_sha256 for p in pieces)
    empty = chunk(encode_state({}), 20)
    assert len(empty) == 1 and empty[0].data == b"" and empty[0].total == 1
    with pytest.raises(WireError, match="max_chunk_bytes"):
        chunk(enc, 0)


def test_chunks_in_any_order_and_repeats_reassemble() -> None:
    enc = encode_state(_state())
    pieces = chunk(enc, 9)
    shuffled = pieces + pieces[:3]
    random.Random(0).shuffle(shuffled)
    r = Reassembler(max_payload_bytes=1000)
    done = [r.add(p) for p in shuffled]
    assert done[-1] and r.complete and r.received == len(pieces)
    np.testing.assert_array_equal(decode_state(enc.manifest, r.payload())["mask"], _state()["mask"])


def test_corrupted_chunk_is_rejected_naming_it() -> None:
    pieces = chunk(encode_state(_state()), 16)
    bad = dataclasses.replace(pieces[2], data=b"\x00" + pieces[2].data[1:])
    r = Reassembler(max_payload_bytes=1000)
    r.add(pieces[0])
    with pytest.raises(WireError, match="chunk 2 of 6: SHA-256 mismatch"):
        r.add(bad)
    # A consistent but forged chunk (its own hash recomputed) is caught by the payload hash.
    forged = dataclasses.replace(bad, sha256=wire._sha256(bad.data))
    r2 = Reassembler(max_payload_bytes=1000)
    for p in [*pieces[:2], forged, *pieces[3:]]:
        r2.add(p)
    with pytest.raises(WireError, match="does not match its SHA-256"):
        r2.payload()


def test_conflicting_duplicate_out_of_range_and_foreign_chunks_are_rejected() -> None:
    pieces = chunk(encode_state(_state()), 16)
    r = Reassembler(max_payload_bytes=1000)
    r.add(pieces[1])
    other = encode_state({"x": np.ones(20, np.float32)})
    twin = dataclasses.replace(chunk(other, 16)[1], payload_sha256=pieces[1].payload_sha256, total=6)
    with pytest.raises(WireError, match="chunk 1 of 6: received twice with different content"):
        r.add(twin)
    with pytest.raises(WireError, match=r"chunk 6 of 6: index out of range 0\.\.5"):
        r.add(dataclasses.replace(pieces[0], index=6))
    with pytest.raises(WireError, match="chunk -1 of 6: index out of range"):
        r.add(dataclasses.replace(pieces[0], index=-1))
    with pytest.raises(WireError, match="total 7 differs from the 6"):
        r.add(dataclasses.replace(pieces[0], total=7))
    with pytest.raises(WireError, match="chunk 0 of 6: belongs to a different payload"):
        r.add(dataclasses.replace(chunk(other, 16)[0], total=6))
    assert r.received == 1


def test_payload_size_limit_is_enforced_while_receiving() -> None:
    enc = encode_state({"big": np.zeros(100, np.float64)})
    r = Reassembler(max_payload_bytes=500)
    pieces = chunk(enc, 256)
    r.add(pieces[0])
    with pytest.raises(WireError, match="chunk 1 of 4: payload would exceed the limit of 500 bytes"):
        r.add(pieces[1])


def test_incomplete_payload_lists_missing_chunks() -> None:
    pieces = chunk(encode_state(_state()), 16)
    r = Reassembler(max_payload_bytes=1000)
    for p in pieces[::2]:
        r.add(p)
    with pytest.raises(WireError, match=r"3 of 6 chunks missing \(1, 3, 5\)"):
        r.payload()
    with pytest.raises(WireError, match="no chunks received"):
        Reassembler(max_payload_bytes=10).payload()


def test_truncated_and_padded_payloads_are_rejected() -> None:
    enc = encode_state(_state())
    with pytest.raises(WireError, match="payload truncated: 81 bytes, manifest describes 82"):
        decode_state(enc.manifest, enc.payload[:-1])
    with pytest.raises(WireError, match="3 trailing bytes"):
        decode_state(enc.manifest, enc.payload + b"abc")
    flipped = bytes([enc.payload[0] ^ 1]) + enc.payload[1:]
    with pytest.raises(WireError, match="does not match the manifest's SHA-256"):
        decode_state(enc.manifest, flipped)


def test_expected_names_dtypes_and_shapes_are_enforced() -> None:
    enc = encode_state(_state())
    expected = {name: (arr.dtype, arr.shape) for name, arr in _state().items()}
    assert set(decode_state(enc.manifest, enc.payload, expected)) == set(expected)
    cases = [
        ({**expected, "encoder.weight": ("float32", (3, 4))}, r"'encoder.weight': shape \(4, 3\), expected \(3, 4\)"),
        ({**expected, "steps": ("int32", ())}, "'steps': dtype int64, expected int32"),
        ({**expected, "decoder.weight": ("float32", (2,))}, r"missing tensors \['decoder.weight'\]"),
        ({k: v for k, v in expected.items() if k != "mask"}, r"unexpected tensors \['mask'\]"),
    ]
    for exp, message in cases:
        with pytest.raises(WireError, match=message):
            decode_state(enc.manifest, enc.payload, exp)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected_when_asked(bad: float) -> None:
    state = _state()
    state["encoder.bias"][2] = bad
    enc = encode_state(state)
    with pytest.raises(WireError, match=r"'encoder\.bias': 1 NaN or infinite values"):
        decode_state(enc.manifest, enc.payload, finite=True)
    out = decode_state(enc.manifest, enc.payload)
    assert not np.isfinite(out["encoder.bias"][2])


def test_bool_bytes_other_than_zero_or_one_are_rejected() -> None:
    enc = encode_state({"m": np.array([True, False, True])})
    payload = b"\x01\x02\x01"
    manifest = dataclasses.replace(enc.manifest, payload_sha256=wire._sha256(payload))
    with pytest.raises(WireError, match="'m': bool bytes must be 0 or 1"):
        decode_state(manifest, payload)


def test_bad_names_are_refused() -> None:
    with pytest.raises(WireError, match="tensor name ''"):
        encode_state({"": np.zeros(1, np.float32)})
    with pytest.raises(WireError, match="tensor name 3"):
        encode_state({3: np.zeros(1, np.float32)})  # type: ignore[dict-item]


_arrays = st.sampled_from(ALL_DTYPES).flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
)


@settings(max_examples=60, deadline=None)
@given(
    named=st.dictionaries(st.text(min_size=1, max_size=12), _arrays, max_size=5),
    max_chunk=st.integers(min_value=1, max_value=64),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_round_trip_property(named: dict[str, np.ndarray], max_chunk: int, seed: int) -> None:
    enc = encode_state(named)
    pieces = chunk(enc, max_chunk)
    random.Random(seed).shuffle(pieces)
    r = Reassembler(max_payload_bytes=enc.manifest.payload_bytes)
    for p in pieces:
        r.add(p)
    expected = {name: (arr.dtype, arr.shape) for name, arr in named.items()}
    out = decode_state(Manifest.from_json(enc.manifest.to_json()), r.payload(), expected)
    assert list(out) == list(named)
    for name, arr in named.items():
        # Byte equality keeps NaN payloads and -0.0 exact.
        assert out[name].shape == arr.shape and out[name].dtype == arr.dtype
        assert out[name].tobytes() == np.ascontiguousarray(arr).tobytes()


def test_chunk_objects_are_plain_data() -> None:
    piece = chunk(encode_state({"x": np.ones(3, np.float32)}), 4)[0]
    assert isinstance(piece, Chunk)
    assert set(dataclasses.asdict(piece)) == {"index", "total", "data", "sha256", "payload_sha256"}


def test_a_manifest_with_too_many_dimensions_tensors_or_characters_is_refused_before_any_product() -> None:
    data = encode_state(_state()).manifest.to_dict()
    deep = json.loads(json.dumps(data))
    deep["tensors"][0]["shape"] = [2] * 9
    with pytest.raises(WireError, match=r"manifest.tensors\[0\].shape: 9 dimensions, at most 8"):
        Manifest.from_json(json.dumps(deep))
    # 100,000 dimensions (issue 13: a 14 s freeze) make a manifest too long to be read at all.
    deep["tensors"][0]["shape"] = [2] * 100_000
    with pytest.raises(WireError, match=f"manifest: 300[0-9]{{3}} characters, at most {wire.MAX_MANIFEST_CHARS}"):
        Manifest.from_json(json.dumps(deep))
    many = {**data, "tensors": [data["tensors"][0]] * (wire.MAX_TENSORS + 1)}
    with pytest.raises(WireError, match=f"{wire.MAX_TENSORS + 1} tensors, at most {wire.MAX_TENSORS}"):
        Manifest.from_dict(many)
    wide = json.loads(json.dumps(data))
    wide["tensors"][0]["shape"] = [2**40, 0]
    with pytest.raises(WireError, match="exceeds 2147483647"):
        Manifest.from_json(json.dumps(wide))
    with pytest.raises(WireError, match="characters, at most"):
        Manifest.from_json(" " * (wire.MAX_MANIFEST_CHARS + 1))


def test_a_chunk_announcing_more_chunks_than_the_payload_can_have_is_refused_and_nothing_kept() -> None:
    enc = encode_state({"big": np.zeros(1000, np.float32)})  # 4,000 bytes
    pieces = chunk(enc, 1024)
    r = Reassembler(max_payload_bytes=4000, payload_sha256=enc.manifest.payload_sha256, min_chunk_bytes=1024)
    assert r.max_chunks == 4
    with pytest.raises(WireError, match="chunk 0 of 30000000: a payload of at most 4000 bytes has at most 4 chunks"):
        r.add(dataclasses.replace(pieces[0], total=30_000_000))
    with pytest.raises(WireError, match="no chunks received"):
        r.payload()
    for p in pieces:
        r.add(p)
    assert r.payload() == enc.payload
    # Missing chunks are listed without walking every index of a huge total.
    r2 = Reassembler(max_payload_bytes=2**31, min_chunk_bytes=1)
    r2.add(dataclasses.replace(pieces[0], total=2**31, index=2**31 - 1))
    missing = r"2147483647 of 2147483648 chunks missing \(0, 1, 2, 3, 4, 5, 6, 7, 8, 9 \.\.\.\)"
    with pytest.raises(WireError, match=missing):
        r2.payload()

"""Proto <-> wire conversion shared by coordinator and silo: states, updates, summaries, settings."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator

import numpy as np
import pytest

from condi_models.evaluation import EvalOptions
from condi_models.nn.config import ModelConfig
from condi_models.training import LocalTrainingConfig
from federation import wire
from federation.messages import UpdateHeader, UploadPart
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.serde import upload_from_proto
from federation.settings import RoundSettings, RunSettings, SettingsError
from federation.stages import Stage, StageKey
from federation.transfer import (
    GROUP_WEIGHTS,
    LayoutLimits,
    NonFiniteUpdateError,
    StateDownload,
    TransferError,
    data_summary,
    decode_plain_update,
    encode_plain_update,
    info_from_summary,
    plain_update_payload_bytes,
    receive_state,
    receive_upload,
    stage_key,
    stage_ref,
    state_parts,
    update_parts,
)
from tests.helpers import toy_dataset

GROUPS = ("all", "modality/0", "modality/1")
SHAPES = {"a.weight": (3, 4), "b.bias": (5,)}


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def _weights() -> dict[str, float]:
    return {"all": 10.0, "modality/0": 10.0, "modality/1": 4.0}


def test_plain_update_round_trip_keeps_values_and_weights() -> None:
    params = _params()
    encoded = encode_plain_update(params, _weights(), GROUPS)
    assert encoded.manifest.payload_bytes == plain_update_payload_bytes(SHAPES, len(GROUPS))
    got, weights = decode_plain_update(encoded.manifest, encoded.payload, SHAPES, GROUPS)
    assert weights == _weights()
    for name, value in params.items():
        np.testing.assert_array_equal(got[name], value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_silo_refuses_to_encode_non_finite_values(bad: float) -> None:
    params = _params()
    params["b.bias"][2] = bad
    with pytest.raises(NonFiniteUpdateError, match=r"b\.bias"):
        encode_plain_update(params, _weights(), GROUPS)
    with pytest.raises(NonFiniteUpdateError, match=GROUP_WEIGHTS):
        encode_plain_update(_params(), {**_weights(), "all": bad}, GROUPS)


def _forged(named: dict[str, np.ndarray]) -> wire.EncodedState:
    """An update built without the silo-side checks, as a faulty or hostile sender could."""
    return wire.encode_state(named)


def test_the_coordinator_rejects_forged_updates_naming_the_problem() -> None:
    good = {**_params(), GROUP_WEIGHTS: np.array([10.0, 10.0, 4.0])}
    nan = dict(good)
    nan["a.weight"] = good["a.weight"].copy()
    nan["a.weight"][0, 0] = np.nan
    cases = {
        "NaN": (nan, "NaN or infinite"),
        "shape": ({**good, "b.bias": np.zeros(6, np.float32)}, "shape (6,), expected (5,)"),
        "dtype": ({**good, "b.bias": np.zeros(5, np.float64)}, "dtype float64, expected float32"),
        "extra": ({**good, "c": np.zeros(1, np.float32)}, "unexpected tensors ['c']"),
        "missing": ({k: v for k, v in good.items() if k != "a.weight"}, "missing tensors ['a.weight']"),
        "negative weight": ({**good, GROUP_WEIGHTS: np.array([10.0, -1.0, 4.0])}, "negative group weights"),
        "modality above samples": ({**good, GROUP_WEIGHTS: np.array([3.0, 10.0, 4.0])}, "exceed the sample"),
    }
    for what, (named, message) in cases.items():
        encoded = _forged(named)
        with pytest.raises(TransferError) as err:
            decode_plain_update(encoded.manifest, encoded.payload, SHAPES, GROUPS)
        assert message in str(err.value), what


def test_state_download_checks_chunks_and_resumes_after_a_broken_stream() -> None:
    state = {"x": np.arange(3000, dtype=np.float32), "y": np.ones((7, 3), np.float64)}
    encoded = wire.encode_state(state)
    parts = list(state_parts(encoded, 1000))
    assert parts[0].WhichOneof("part") == "manifest_json" and len(parts) == 1 + 13
    sha = encoded.manifest.payload_sha256
    download = StateDownload(sha, max_payload_bytes=10**6, max_chunk_bytes=1000)
    download.start_stream()
    for part in parts[:6]:  # the stream breaks after five chunks
        download.feed(part)
    assert download.next_chunk == 5 and not download.complete
    download.start_stream()
    for part in state_parts(encoded, 1000, first_chunk=download.next_chunk):
        download.feed(part)
    result = download.result()
    assert result.payload == encoded.payload
    assert receive_state(parts, sha, max_payload_bytes=10**6, max_chunk_bytes=1000).payload == encoded.payload

    corrupt = list(parts)
    corrupt[3] = pb.StatePart()
    corrupt[3].chunk.CopyFrom(parts[3].chunk)
    corrupt[3].chunk.data = bytes([parts[3].chunk.data[0] ^ 0xFF]) + parts[3].chunk.data[1:]
    with pytest.raises(TransferError, match="chunk 2 of 13: SHA-256 mismatch"):
        receive_state(corrupt, sha, max_payload_bytes=10**6, max_chunk_bytes=1000)
    with pytest.raises(TransferError, match="over the limit of 500"):
        receive_state(parts, sha, max_payload_bytes=10**6, max_chunk_bytes=500)
    with pytest.raises(TransferError, match="expected"):
        receive_state(parts, "f" * 64, max_payload_bytes=10**6, max_chunk_bytes=1000)
    with pytest.raises(TransferError, match="over the limit"):
        receive_state(parts, sha, max_payload_bytes=100, max_chunk_bytes=1000)
    with pytest.raises(TransferError, match="first message"):
        receive_state(parts[1:], sha, max_payload_bytes=10**6, max_chunk_bytes=1000)
    with pytest.raises(TransferError, match="chunks missing"):
        receive_state(parts[:-1], sha, max_payload_bytes=10**6, max_chunk_bytes=1000)


def test_upload_stream_is_checked_header_first() -> None:
    encoded = encode_plain_update(_params(), _weights(), GROUPS)
    key = StageKey("r", 1, 0, pb.STAGE_TRAIN)
    header = pb.UpdateHeader(ref=stage_ref(key), encoding=pb.UPDATE_ENCODING_PLAIN)
    parts = list(update_parts(header, encoded, 64))
    seen = []

    def read(messages: Iterable[pb.UpdatePart]) -> Iterator[UploadPart]:
        # As the coordinator's servicer hands an upload on: converted message by message.
        return upload_from_proto(iter(messages))

    def check(h: UpdateHeader) -> None:
        seen.append((h.key, h.manifest.payload_bytes))

    got = receive_upload(read(parts), max_chunk_bytes=64, max_payload_bytes=10**6, check_header=check)
    assert got.payload == encoded.payload and seen == [(key, len(encoded.payload))]

    def refuse(h: UpdateHeader) -> None:
        raise PermissionError("refused before any chunk")

    consumed = []

    def counting():
        for p in parts:
            consumed.append(p)
            yield p

    with pytest.raises(PermissionError):
        receive_upload(read(counting()), max_chunk_bytes=64, max_payload_bytes=10**6, check_header=refuse)
    assert len(consumed) == 1
    with pytest.raises(TransferError, match="over the limit of 32"):
        receive_upload(read(parts), max_chunk_bytes=32, max_payload_bytes=10**6)
    with pytest.raises(TransferError, match="over the limit of 50"):
        receive_upload(read(parts), max_chunk_bytes=64, max_payload_bytes=50)
    with pytest.raises(TransferError, match="first message must be the header"):
        receive_upload(read(parts[1:]), max_chunk_bytes=64, max_payload_bytes=10**6)
    with pytest.raises(TransferError, match="second header"):
        receive_upload(read([*parts, parts[0]]), max_chunk_bytes=64, max_payload_bytes=10**6)


def test_data_summary_carries_the_layout_without_records_or_counts() -> None:
    ds = toy_dataset(20, modalities=(1, 2, 3), length=30, n_classes=3)
    summary = data_summary(ds.info)
    assert summary.modalities[1].channels == 2 and info_from_summary(summary) == ds.info
    # No count travels at Join (issue 13 item 9): the fields are gone from the wire contract.
    assert "num_samples" not in pb.DataSummary.DESCRIPTOR.fields_by_name
    assert "observed_samples" not in pb.ModalitySummary.DESCRIPTOR.fields_by_name
    broken = pb.DataSummary()
    broken.CopyFrom(summary)
    del broken.modalities[1].channel_names[1]
    with pytest.raises(TransferError, match="'m1' has 2 channels but 1 channel names"):
        info_from_summary(broken)
    broken.CopyFrom(summary)
    del broken.classes[1:]
    with pytest.raises(TransferError, match="1 classes"):
        info_from_summary(broken)


def test_run_and_round_settings_round_trip_and_refuse_bad_documents() -> None:
    ds = toy_dataset(10, modalities=(1, 2), length=40, n_classes=3)
    settings = RunSettings(
        model=ModelConfig.for_dataset(ds.info),
        training=LocalTrainingConfig(epochs_a=2, window=40),
        evaluation=EvalOptions(steps=3),
        layout=ds.info,
    )
    assert RunSettings.from_json(settings.to_json()) == settings
    doc = json.loads(settings.to_json())
    doc["training"]["epochs_z"] = 1
    with pytest.raises(SettingsError, match="epochs_z"):
        RunSettings.from_json(json.dumps(doc))
    with pytest.raises(SettingsError, match="missing"):
        RunSettings.from_json("{}")
    plan = RoundSettings(eval_seed=3, eval_splits=("val", "test"))
    assert RoundSettings.from_json(plan.to_json()) == plan
    assert RoundSettings.from_json("") == RoundSettings()
    scaled = RoundSettings(train_seed=5, lr_scale=0.25)
    assert RoundSettings.from_json(scaled.to_json()) == scaled
    for bad in ('{"eval_splits": ["train"]}', '{"train_seed": -1}', '{"colour": 1}', "[1]", '{"lr_scale": 0}',
                '{"lr_scale": 2.0}', '{"lr_scale": true}'):
        with pytest.raises(SettingsError):
            RoundSettings.from_json(bad)
    assert dataclasses.replace(plan, train_seed=1) != plan


def test_a_layout_past_the_federations_limits_is_refused_before_any_model_is_built() -> None:
    # Issue 13: 1,600 modalities made a 58 M-parameter model (it grows quadratically with them).
    wide = toy_dataset(4, modalities=(1,) * 1_600, length=10, n_classes=2)
    with pytest.raises(TransferError, match="1600 modalities, this federation takes at most 64"):
        info_from_summary(data_summary(wide.info))
    limits = LayoutLimits(max_channels=5, max_length=20, max_classes=2, max_name_chars=3)
    ds = toy_dataset(4, modalities=(1, 2, 3), length=30, n_classes=3)
    cases = {
        "6 channels, this federation takes at most 5": limits,
        "30 length, this federation takes at most 20": LayoutLimits(max_length=20),
        "3 classes, this federation takes at most 2": LayoutLimits(max_classes=2),
        "a name of 6 characters, at most 3": LayoutLimits(max_name_chars=3),
    }
    for message, case in cases.items():
        with pytest.raises(TransferError, match=message):
            info_from_summary(data_summary(ds.info), case)
    assert info_from_summary(data_summary(ds.info), LayoutLimits()) == ds.info


def test_the_stage_enum_is_the_protocols_and_unknown_stages_are_refused() -> None:
    assert {s.name: int(s) for s in Stage} == {
        pb.Stage.Name(v).removeprefix("STAGE_"): v for v in pb.Stage.values()
    }
    key = stage_key(pb.StageRef(run_id="r", round=2, attempt=1, stage=pb.STAGE_UNMASK))
    assert key == StageKey("r", 2, 1, Stage.UNMASK) and type(key.stage) is Stage
    assert stage_ref(key) == pb.StageRef(run_id="r", round=2, attempt=1, stage=pb.STAGE_UNMASK)
    with pytest.raises(TransferError, match="unknown stage 42"):
        stage_key(pb.StageRef(run_id="r", stage=42))

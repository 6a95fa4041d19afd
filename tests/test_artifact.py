"""ssmrt.artifact: the one reader of an artifact's metadata raises only SsmrtError, whatever the file holds."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from ssmrt import artifact
from ssmrt.errors import SsmrtError


def small_model(meta: dict[str, str] | None = None) -> onnx.ModelProto:
    """A model with a weight (so the metadata comes after a large field) and the given metadata_props."""
    w = onnx.numpy_helper.from_array(np.arange(4096, dtype=np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["w"], ["y"])], "g", [],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4096])], [w])
    model = onnx.helper.make_model(graph)
    for k, v in (meta or {}).items():
        model.metadata_props.add(key=k, value=v)
    return model


META = {artifact.META_CONFIG: json.dumps({"arch": "mamba2"}), artifact.META_STATES: "[]",
        artifact.META_EXPORT: json.dumps({"dtype": "float32", "logits": "all"})}


def test_reads_what_onnx_reads(tmp_path):
    f = tmp_path / "model.onnx"
    onnx.save_model(small_model({**META, "other": "x"}), f)
    assert artifact.read_metadata_props(f) == {p.key: p.value for p in onnx.load(str(f)).metadata_props}
    meta = artifact.read_metadata(tmp_path)  # a directory means its model.onnx
    assert meta["config"] == {"arch": "mamba2"} and meta["states"] == [] and meta["export"]["dtype"] == "float32"
    assert artifact.export_info(f) == {"dtype": "float32", "logits": "all", "arch": "mamba2"}


def test_every_truncation_is_one_ssmrt_error(tmp_path):
    whole = small_model(META).SerializeToString()
    f = tmp_path / "model.onnx"
    cuts = sorted({*range(0, 64), *range(len(whole) - 400, len(whole)), *range(64, len(whole), 997)})
    for n in cuts:
        f.write_bytes(whole[:n])
        try:
            props = artifact.read_metadata_props(f)
        except SsmrtError as e:
            assert str(e).startswith(f"{f}: not an ONNX model ("), e
        else:  # a cut between top-level fields leaves a shorter but well-formed message
            assert set(props) <= set(META), n


@pytest.mark.parametrize("payload,why", [
    (b"\x0f\x00\x00", "protobuf wire type 7"),
    (b"\x72" + b"\xff" * 9 + b"\x7f", "runs past the end of the file"),  # field 14, length ~2^62
    (b"\x72" + b"\xff" * 11, "a varint longer than 10 bytes"),
    (b"\x72\x05\x0a\x03\xff\xfe\xfd", "not UTF-8"),
    (b"\x72", "truncated"),
])
def test_garbage_is_one_ssmrt_error(tmp_path, payload, why):
    f = tmp_path / "junk.onnx"
    f.write_bytes(payload)
    with pytest.raises(SsmrtError, match=f"junk.onnx: not an ONNX model .*{why}"):
        artifact.read_metadata_props(f)


@pytest.mark.parametrize("change,why", [
    ({artifact.META_CONFIG: None}, "not an ssmrt export"),
    ({artifact.META_STATES: None}, "lacks 'ssmrt.states'"),
    ({artifact.META_EXPORT: "{not json"}, "metadata 'ssmrt.export' is not valid JSON"),
    ({artifact.META_STATES: "{}"}, "metadata 'ssmrt.states' must be a JSON list, got dict"),
])
def test_bad_metadata_is_named(tmp_path, change, why):
    meta = {k: v for k, v in {**META, **change}.items() if v is not None}
    onnx.save_model(small_model(meta), tmp_path / "model.onnx")
    with pytest.raises(SsmrtError, match=why):
        artifact.read_metadata(tmp_path)


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(SsmrtError, match="model.onnx: not found"):
        artifact.read_metadata(tmp_path)
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(SsmrtError, match="dir.onnx: cannot be read"):
        artifact.read_metadata_props(tmp_path / "dir.onnx")
    if os.geteuid() != 0:
        f = tmp_path / "locked.onnx"
        f.write_bytes(b"")
        f.chmod(0)
        with pytest.raises(SsmrtError, match="cannot be read"):
            artifact.read_metadata_props(f)


def test_state_helpers():
    specs = artifact.state_specs(2, ["batch", 6, 3], ["batch", 4, 8, 16], "float16", "float32")
    assert [s["name"] for s in specs] == artifact.state_names(2)[0]
    assert [s["output"] for s in specs] == artifact.state_names(2)[1]
    # per sequence: 2 layers x (6 x 3 fp16 + 4 x 8 x 16 fp32) bytes, by hand
    assert artifact.state_bytes(specs) == 2 * (18 * 2 + 512 * 4)
    assert artifact.state_bytes(specs, batch=3) == 3 * artifact.state_bytes(specs)
    flat = ["c0", "s0", "c1", "s1"]
    assert artifact.pair_states(flat) == (("c0", "s0"), ("c1", "s1"))
    assert artifact.flatten_states(artifact.pair_states(flat)) == flat

"""`ssmrt export --target tensorrt`: model.onnx as in a portable export, plus prefill.onnx with each scan as its
chain of one-kernel nodes (ssmrt.ops.spec.CHAINS), both graphs reading one weights file. On stock ONNX Runtime
(the chain nodes' fallback bodies) the prefill graph gives what the one-node graph and the torch reference give,
from a zero state and from a given one."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
import pytest
from test_models import random_lm
from test_ort_ops import native_library

from ssmrt import SsmrtError
from ssmrt.artifact import DATA_FILE, MODEL_FILE, PREFILL_FILE, read_metadata
from ssmrt.closeness import assert_close
from ssmrt.compare import compare_runners
from ssmrt.exporter import export_model
from ssmrt.ops.spec import CHAINS, SELECTIVE_CHAIN_CHUNK, ssd_chain_chunk, tolerance
from ssmrt.runtime import OnnxRuntimeRunner, TorchRunner

FAMILIES = {
    "mamba1": dict(arch="mamba1", d_model=32, n_layer=2, d_state=8),
    "mamba2": dict(arch="mamba2", d_model=48, n_layer=2, d_state=16, headdim=16, ngroups=2, chunk_size=4),
}
SCAN = {"mamba1": "SelectiveScan", "mamba2": "SSDScan"}
MODEL = dict(zip(("atol", "rtol"), tolerance("float32", "model"), strict=True))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (model, artifact dir), exported once per module with target tensorrt."""
    cache = {}

    def get(family):
        if family not in cache:
            model = random_lm(**FAMILIES[family])
            cache[family] = (model, export_model(model, tmp_path_factory.mktemp(family) / "art", target="tensorrt"))
        return cache[family]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_files_metadata_and_one_copy_of_the_weights(family, exported):
    _, art = exported(family)
    assert sorted(os.listdir(art)) == sorted([MODEL_FILE, DATA_FILE, PREFILL_FILE])
    one, prefill = read_metadata(art / MODEL_FILE), read_metadata(art / PREFILL_FILE)
    assert one["export"]["target"] == "tensorrt" and one["export"]["prefill"] == PREFILL_FILE
    assert prefill == {**one, "export": {**one["export"], "graph": "prefill"}}
    graphs = {f: onnx.load(str(art / f), load_external_data=False) for f in (MODEL_FILE, PREFILL_FILE)}
    for m in graphs.values():
        for t in m.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                assert {kv.key: kv.value for kv in t.external_data}["location"] == DATA_FILE
            else:
                assert t.ByteSize() < 1100, t.name  # only small tensors stay inline
    # the prefill graph's weights are byte ranges model.onnx's weights occupy (names of folded constants differ)
    external = {f: {tuple(kv.value for kv in t.external_data) for t in m.graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL} for f, m in graphs.items()}
    assert external[PREFILL_FILE] <= external[MODEL_FILE]
    assert external[PREFILL_FILE]
    io = {f: [(v.name, v.type.SerializeToString()) for v in (*m.graph.input, *m.graph.output)]
          for f, m in graphs.items()}
    assert io[MODEL_FILE] == io[PREFILL_FILE]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_prefill_graph_carries_each_scan_as_its_chain(family, exported):
    model, art = exported(family)
    n = model.config.n_layer
    m = onnx.load(str(art / PREFILL_FILE), load_external_data=False)
    ops = Counter(node.op_type for node in m.graph.node if node.domain == "ssmrt")
    chain = CHAINS[SCAN[family]]
    assert ops == Counter({"CausalConv1d": n, **dict.fromkeys(chain, n)})
    assert sorted(f.name for f in m.functions) == sorted(["CausalConv1d", *chain])
    chunk = ssd_chain_chunk(model.config.chunk_size) if family == "mamba2" else SELECTIVE_CHAIN_CHUNK
    for node in m.graph.node:
        if node.op_type in chain:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["chunk_size"] == chunk and attrs["plugin_namespace"] == b"ssmrt", node.op_type
    one = onnx.load(str(art / MODEL_FILE), load_external_data=False)
    assert Counter(node.op_type for node in one.graph.node if node.domain == "ssmrt") == Counter(
        {"CausalConv1d": n, SCAN[family]: n})


# seqlens: one token, a partial chunk, several chunks with a partial last one (Mamba-2's chain chunk is 16
# here; Mamba-1's is 256)
SEQLENS = {"mamba1": [1, 9, 300], "mamba2": [1, 7, 37]}


@pytest.mark.parametrize("family,seqlen", [(f, n) for f in FAMILIES for n in SEQLENS[f]])
def test_the_prefill_graph_gives_what_the_one_node_graph_gives(family, seqlen, exported):
    model, art = exported(family)
    ids = np.random.default_rng(seqlen).integers(0, 97, (2, seqlen))
    runners = {f: OnnxRuntimeRunner(art / f, native_ops="off") for f in (MODEL_FILE, PREFILL_FILE)}
    native_library()
    native = OnnxRuntimeRunner(art / PREFILL_FILE, native_ops="on")  # the native conv beside the chains' bodies
    assert native.native_ops == ("CausalConv1d",), native.describe()
    runners["prefill.onnx, native conv"] = native
    ref = TorchRunner(model)
    want_logits, want_state = ref.forward(ids, ref.zero_state(2))
    for f, r in runners.items():
        logits, state = r.forward(ids, r.zero_state(2))
        assert_close(logits, want_logits, **MODEL, name=f"{f} logits, L {seqlen}")
        for i, (s, w) in enumerate(zip(state, want_state, strict=True)):
            assert_close(np.asarray(s), np.asarray(w), **MODEL, name=f"{f} state {i}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_prefill_graph_continues_from_a_given_state(family, exported):
    """A prefill, then teacher-forced steps, all through the prefill graph (its chains at one token too), against
    the reference: the entering state flows through the state-passing node."""
    model, art = exported(family)
    prompt = np.random.default_rng(3).integers(0, 97, 21).tolist()
    report = compare_runners(TorchRunner(model), OnnxRuntimeRunner(art / PREFILL_FILE, native_ops="off"), prompt,
                             steps=4)
    print(report.format())
    assert report.passed


def test_a_portable_export_replaces_a_tensorrt_one_whole(exported, tmp_path):
    model, _ = exported("mamba2")
    out = tmp_path / "art"
    export_model(model, out, target="tensorrt")
    export_model(model, out, overwrite=True)
    assert sorted(os.listdir(out)) == [MODEL_FILE]
    assert read_metadata(out)["export"]["target"] == "portable"
    export_model(model, out, target="tensorrt", overwrite=True)
    assert sorted(os.listdir(out)) == sorted([MODEL_FILE, DATA_FILE, PREFILL_FILE])


def test_an_unknown_target_is_refused(tmp_path):
    with pytest.raises(SsmrtError, match="--target must be one of portable, tensorrt, got 'tensorrt-llm'"):
        export_model(random_lm(**FAMILIES["mamba2"]), tmp_path / "a", target="tensorrt-llm")
    assert not (tmp_path / "a").exists()


def test_the_cli_exports_for_tensorrt(tmp_path):
    from click.testing import CliRunner

    from ssmrt.cli import main
    from ssmrt.models.checkpoints import save_model

    ckpt = save_model(random_lm(**FAMILIES["mamba2"]), tmp_path / "ckpt")
    res = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "art"), "--target", "tensorrt"])
    assert res.exit_code == 0, res.output
    assert "prefill.onnx" in res.output and "model.onnx.data" in res.output
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "art" / PREFILL_FILE), "--json"])
    assert res.exit_code == 0, res.output
    assert '"ssmrt::SSDChunkScan": 2' in res.output and '"graph": "prefill"' in res.output
    res = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "b"), "--target", "trt"])
    assert res.exit_code == 2 and "'trt' is not one of 'portable', 'tensorrt'" in res.output

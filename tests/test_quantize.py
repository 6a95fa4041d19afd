"""Weight-only quantisation (`export --weights int8|int4 [--activations int8|float32]`): the graph ONNX Runtime's
quantiser packs, the plain-torch reference of its arithmetic held to it bit for bit (and the int8 activations' to
its kernel), the metadata and `inspect`, the compare against the model the quantised weights mean (and that a wrong
dequantisation fails it), what int8 / int4 cost, and bad arguments."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from bad_inputs import assert_refused, ssmrt, tree
from hf_models import hf_model, save_hf
from onnx import numpy_helper
from test_models import random_lm

from ssmrt import quantize as Q
from ssmrt.closeness import assert_close
from ssmrt.compare import _dequantized_runner, compare_runners, judges, reference_runner
from ssmrt.errors import SsmrtError
from ssmrt.exporter import export
from ssmrt.ops.spec import tolerance
from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact, TorchRunnerFromCheckpoint

PROMPT = [5, 17, 3, 42, 8, 8, 61, 2, 90, 11, 33, 7]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """config id -> (checkpoint, {weights: artifact}) for a Mamba-1 with odd K (dt_rank 5, untied) and a Mamba-2;
    "int8" / "int4" with the default (int8) activations, "int8/float32" / "int4/float32" with float32 ones."""
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for cid in ("mamba-untied-d64-k3-bias", "mamba2-g1"):
        ckpt = save_hf(hf_model(cid), root / f"{cid}-ckpt")
        arts = {w: export(ckpt, root / f"{cid}-{w or 'float'}", weights=w) for w in (None, "int8", "int4")}
        for w in ("int8", "int4"):
            arts[f"{w}/float32"] = export(ckpt, root / f"{cid}-{w}-f32", weights=w, activations="float32")
        out[cid] = ckpt, arts
    return out


def _weight_matmuls(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """A float graph's MatMul output name -> its constant weight [K, N]."""
    inits = {t.name: t for t in model.graph.initializer}
    return {n.output[0]: numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block", [16, 32])
def test_quantize_ref_is_what_onnxruntime_packed_bit_for_bit(models, bits, symmetric, block):
    for cid, (_, arts) in models.items():
        float_graph = onnx.load(str(arts[None] / "model.onnx"))
        weights = _weight_matmuls(float_graph)
        info = {"scheme": f"int{bits}", "bits": bits, "block_size": block, "symmetric": symmetric,
                "activations": "int8"}
        graph = Q.quantize_graph(float_graph, info, len(weights))
        inits = {t.name: t for t in graph.graph.initializer}
        nodes = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
        assert len(nodes) == len(weights)
        for node in nodes:
            w = weights[node.output[0]]
            q, scales, zp = Q.unpack_matmul_nbits(node, inits)
            rq, rs, rz = Q.quantize_ref(torch.from_numpy(w.copy()), bits, block, symmetric)
            assert np.array_equal(q, rq.numpy()), (cid, node.name)
            assert np.array_equal(scales.view(np.uint32), rs.numpy().view(np.uint32)), (cid, node.name)
            assert np.array_equal(zp, rz.numpy()), (cid, node.name)
            deq = Q.dequantize_ref(rq, rs, rz, w.shape[0]).numpy()
            assert deq.shape == w.shape
            # within a code's width of the weight (half of one inside the range; the range's ends can clip by one)
            step = np.repeat(np.abs(rs.numpy()), block, axis=1)[:, :w.shape[0]].T
            assert np.all(np.abs(deq - w) <= step * (1 + 1e-5)), (cid, node.name)


def test_quantize_ref_can_fail():
    """The bit-exact test above compares with something: a scheme one bit off gives other codes."""
    w = torch.randn(64, 8)
    assert not torch.equal(Q.quantize_ref(w, 4, 32, False)[0], Q.quantize_ref(w, 4, 16, False)[0])
    assert not torch.equal(Q.fake_quantize(w, 4, 32, False), Q.fake_quantize(w, 4, 32, True))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block", [16, 32])
def test_quantized_embedding_gathers_what_its_codes_mean(models, bits, symmetric, block):
    """The embedding's Gather becomes GatherBlockQuantized over quantize_ref's int8 codes of the table (the
    scheme's blocks along d_model, whatever its bits): ONNX Runtime's gathered rows equal the dequantised table's
    rows exactly, the float table is gone, and the rows differ from the float ones (so the check can fail)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    for cid, (_, arts) in models.items():
        float_graph = onnx.load(str(arts[None] / "model.onnx"))
        (gather,) = [n for n in float_graph.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"]
        table = numpy_helper.to_array(next(t for t in float_graph.graph.initializer if t.name == gather.input[0]))
        info = {"scheme": f"int{bits}", "bits": bits, "block_size": block, "symmetric": symmetric,
                "activations": "int8", "embedding": "int8"}
        graph = Q.quantize_graph(float_graph, info, len(_weight_matmuls(float_graph)))
        (node,) = [n for n in graph.graph.node if n.op_type == "GatherBlockQuantized"]
        assert node.output[0] == gather.output[0]
        assert not any(n.op_type == "Gather" and n.input[1] == "input_ids" for n in graph.graph.node)
        assert gather.input[0] not in {t.name for t in graph.graph.initializer} or any(
            gather.input[0] in n.input for n in graph.graph.node), cid
        inits = [t for t in graph.graph.initializer if t.name in node.input]
        alone = helper.make_graph([node], "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                                              [None, None])],
                                  [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)], inits)
        session = ort.InferenceSession(helper.make_model(alone, opset_imports=graph.opset_import).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        ids = np.array([[0, table.shape[0] - 1, 3], [5, 5, 1]], np.int64)
        got = session.run(None, {"input_ids": ids})[0]
        want = Q.fake_quantize(torch.from_numpy(table.T.copy()), 8, block, symmetric).t().numpy()[ids]
        assert np.array_equal(got, want), (cid, np.abs(got - want).max())
        assert not np.array_equal(got, table[ids]), cid


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [16, 32])
def test_int8_activations_are_what_onnxruntime_multiplies(bits, block):
    """One MatMulNBits at accuracy level 4 (K not a multiple of the block, a row of zeros, rows of mixed scale)
    equals quantize_activations_ref(x) @ the dequantised weight to float32 summation; the float activations'
    product is hundreds of times further off, so the comparison can fail."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(bits + block)
    K, N = 3 * block + block // 2, 40
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    info = {**Q.check_weights(f"int{bits}", block), "embedding": "float32"}  # a bare MatMul: no table
    assert info["activations"] == "int8"
    import onnxruntime as ort

    q = Q.quantize_graph(model, info, 1)
    session = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    x = (rng.standard_normal((6, K)) * np.array([[1], [1e-3], [30], [1], [0], [5]])).astype(np.float32)
    x[3, :block] = 0  # a block of zeros: scale 0, codes 0
    got = session.run(None, {"x": x})[0].astype(np.float64)
    wq = Q.fake_quantize(torch.from_numpy(w), bits, block, info["symmetric"]).double()
    want = (Q.quantize_activations_ref(torch.from_numpy(x), block).double() @ wq).numpy()
    plain = (torch.from_numpy(x).double() @ wq).numpy()
    scale = np.abs(want).max(axis=1, keepdims=True) + 1e-30
    err, plain_err = np.abs(got - want) / scale, np.abs(got - plain) / scale
    assert err.max() < 2e-6, err.max()
    assert plain_err[[0, 2, 5]].max() > 100 * err.max()


@pytest.mark.parametrize("weights", ["int8", "int4", "int8/float32"])
def test_export_packs_every_projection_and_the_head(models, weights):
    level, activations = (0, "float32") if weights.endswith("/float32") else (4, "int8")
    for cid, (_, arts) in models.items():
        art = arts[weights]
        bits = int(weights[3])
        m = onnx.load(str(art / "model.onnx"))
        cfg = json.loads({p.key: p.value for p in m.metadata_props}["ssmrt.config"])
        per_layer = {"mamba1": 4, "mamba2": 2}[cfg["arch"]]  # in_proj, x_proj, dt_proj, out_proj / in_proj, out_proj
        nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == cfg["n_layer"] * per_layer + 1, cid
        assert all(n.domain == "com.microsoft" for n in nbits)
        assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {bits}
        levels = [[a.i for a in n.attribute if a.name == "accuracy_level"] or [0] for n in nbits]
        assert levels == [[level]] * len(nbits), cid
        inits = {t.name: t for t in m.graph.initializer}
        assert not [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits], cid
        # the head is the last MatMulNBits, N the padded vocabulary; the embedding is gathered from its codes, and
        # no float table is left
        head = {a.name: a.i for a in nbits[-1].attribute}
        assert head["N"] == cfg["vocab_size"] and head["K"] == cfg["d_model"]
        (gather,) = [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]
        assert {a.name: a.i for a in gather.attribute if a.name in ("bits", "block_size")} == {"bits": 8,
                                                                                              "block_size": 32}
        assert not [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                    and list(t.dims) == [cfg["vocab_size"], cfg["d_model"]]], cid
        # the fallback bodies are the float export's
        float_model = onnx.load(str(arts[None] / "model.onnx"), load_external_data=False)
        assert [f.SerializeToString() for f in m.functions] == [f.SerializeToString() for f in float_model.functions]
        meta = json.loads({p.key: p.value for p in m.metadata_props}["ssmrt.export"])
        assert meta["weights"] == {"scheme": f"int{bits}", "bits": bits, "block_size": 32,
                                   "symmetric": Q.SYMMETRIC, "activations": activations, "embedding": "int8"}
        assert (art / "model.onnx").stat().st_size < (arts[None] / "model.onnx").stat().st_size


def test_inspect_shows_the_scheme(models):
    _, arts = models["mamba2-g1"]
    res = ssmrt("inspect", arts["int4"])
    assert res.returncode == 0, res.stderr
    assert "weights: int4 weights (block 32, asymmetric, int8 activations, int8 embedding)" in res.stdout
    assert "com.microsoft::MatMulNBits x5" in res.stdout
    assert "com.microsoft::GatherBlockQuantized x1" in res.stdout
    info = json.loads(ssmrt("inspect", arts["int4"], "--json").stdout)
    assert info["weights"]["scheme"] == "int4" and info["weights"]["block_size"] == 32
    plain = json.loads(ssmrt("inspect", arts[None], "--json").stdout)
    assert plain["weights"] is None
    # the packed weights count as the parameters they stand for
    assert info["parameters"] == plain["parameters"]


def _report(ckpt, art, reference=None, baseline=None, steps=6, free_steps=8, band=None):
    """The compare of `art` by its judges, or by the reference / baseline given (with the unquantised model as
    `original`)."""
    candidate = OnnxRuntimeRunnerFromArtifact(art)
    if reference is None:
        return compare_runners(candidate=candidate, prompt_ids=PROMPT, steps=steps, free_steps=free_steps,
                               **judges(ckpt, candidate, band=band))
    return compare_runners(reference, candidate, PROMPT, steps, baseline=baseline, free_steps=free_steps,
                           original=reference_runner(ckpt))


def _cost(report) -> list:
    """The candidate's per-step figures against the unquantised model."""
    return [s.original if report.original is not None else s.candidate for s in report.steps]


@pytest.mark.parametrize("weights", ["int8/float32", "int4/float32"])
def test_float32_activations_compute_their_dequantised_model(models, weights):
    for cid, (ckpt, arts) in models.items():
        report = _report(ckpt, arts[weights])
        assert report.mode == "calibrated"
        assert report.passed, (cid, report.format())
        assert "dequantized" in report.reference and "dequantized" in report.baseline
        assert "activations" not in report.baseline and report.original is not None
        assert all(s.original is not None for s in report.steps)
        assert report.free_run.original_agreement is not None


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_int8_activations_cost_what_their_scheme_costs(models, weights):
    """Judged against the unquantised model, with the scheme computed in float32 on plain PyTorch as the baseline."""
    for cid, (ckpt, arts) in models.items():
        report = _report(ckpt, arts[weights])
        assert report.mode == "calibrated" and report.original is None
        assert "dequantized" not in report.reference
        assert "dequantized, int8 activations" in report.baseline
        assert report.passed, (cid, report.format())
        assert all(s.candidate.kl_mean > 0 for s in report.steps)


def test_a_wrong_dequantisation_fails_the_compare(models):
    """Judged as a float32 artifact (the unquantised model as reference and baseline), or against the dequantised
    model of another block size (reference and baseline alike), a quantised artifact fails: the compare sees what
    its weights are."""
    for cid, (ckpt, arts) in models.items():
        art = arts["int4/float32"]
        plain = _report(ckpt, art, reference=reference_runner(ckpt),
                        baseline=TorchRunnerFromCheckpoint(ckpt, dtype="float32", kernels=False, decode="eager"))
        assert not plain.passed, cid
        assert "FAILED (calibrated)" in plain.verdict.line
        info = {**OnnxRuntimeRunnerFromArtifact(art).weights, "block_size": 16}
        other = _report(ckpt, art, reference=reference_runner(ckpt, weights=info),
                        baseline=_dequantized_runner(ckpt, info, "float32", "cpu"))
        assert not other.passed, cid
        # int8 activations judged as float32 ones (and the other way round) fail too
        for name, activations in (("int8", "float32"), ("int8/float32", "int8")):
            art = arts[name]
            info = {**OnnxRuntimeRunnerFromArtifact(art).weights, "activations": activations}
            other = _report(ckpt, art, reference=reference_runner(ckpt, weights=info),
                            baseline=_dequantized_runner(ckpt, info, "float32", "cpu"))
            assert not other.passed, (cid, name)


def test_int4_costs_more_than_int8(models):
    for cid, (ckpt, arts) in models.items():
        kl = {}
        for weights in ("int8", "int4"):
            report = _report(ckpt, arts[weights], steps=8, free_steps=0)
            kl[weights] = float(np.mean([s.kl_mean for s in _cost(report)]))
        assert kl["int4"] > kl["int8"] > 0, (cid, kl)


def test_cli_compare_of_a_quantised_artifact(models):
    ckpt, arts = models["mamba2-g1"]
    res = ssmrt("compare", ckpt, arts["int8/float32"], "--steps", "4", "--free-steps", "8")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "int8 weights dequantized" in res.stdout
    assert "what the quantised weights cost, against the unquantised model" in res.stdout
    doc = json.loads(ssmrt("compare", ckpt, arts["int8/float32"], "--steps", "2", "--json").stdout)
    assert doc["original"] and doc["steps"][0]["original"]["kl_mean"] > 0
    res = ssmrt("compare", ckpt, arts["int8"], "--steps", "4")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "int8 weights dequantized, int8 activations" in res.stdout
    assert "what the quantised weights cost" not in res.stdout


def test_band_judges_against_another_precisions_band(models):
    """--band float16: the unquantised model as reference, the model in float16 as baseline, float16's band. An
    int4 artifact of these small random models costs more than float16 does; the float32 band judges the same
    errors stricter still, and a float artifact passes the float32 band."""
    ckpt, arts = models["mamba2-g1"]
    rep = _report(ckpt, arts["int4"], band="float16")
    assert "float16" in rep.baseline and "dequantized" not in rep.baseline + rep.reference
    assert "2 x the float16 baseline's" in rep.verdict.line
    assert not rep.passed, rep.verdict.line
    assert _report(ckpt, arts[None], band="float32").passed
    res = ssmrt("compare", ckpt, arts["int8"], "--steps", "2", "--band", "float16", "--json")
    doc = json.loads(res.stdout)
    assert res.returncode in (0, 1) and doc["mode"] == "calibrated" and "float16" in doc["baseline"]
    assert_refused(ssmrt("compare", ckpt, arts["int8"], "--band", "float16", "--atol", "1"), "--band")


def test_a_quantised_artifact_runs_where_torch_cannot_be_imported(models):
    _, arts = models["mamba-untied-d64-k3-bias"]
    art = arts["int4"]
    from ssmrt.runtime import Session

    want = Session(OnnxRuntimeRunnerFromArtifact(art)).generate(PROMPT, 8)
    code = f"""import sys; sys.modules['torch'] = None
import copy
import json
from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact, Session
runner = OnnxRuntimeRunnerFromArtifact({str(art)!r})
print(json.dumps({{"tokens": Session(runner).generate({PROMPT!r}, 8), "scheme": runner.weights["scheme"]}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got == {"tokens": list(map(int, want)), "scheme": "int4"}


@pytest.mark.parametrize("args,fragment", [
    (["--weights", "int3"], "--weights"),
    (["--weights", "int4", "--block-size", "0"], "--block-size must be a power of two"),
    (["--weights", "int4", "--block-size", "7"], "--block-size must be a power of two"),
    (["--weights", "int8", "--block-size", "48"], "--block-size must be a power of two"),
    (["--weights", "int4", "--block-size", "1000000"], "--block-size must be a power of two"),
    (["--block-size", "32"], "--block-size applies to quantised weights"),
    (["--activations", "float32"], "--activations applies to quantised weights"),
    (["--weights", "int8", "--activations", "int4"], "--activations"),
    (["--weights", "int4", "--dtype", "float16"], "--dtype float32"),
    (["--weights", "int8", "--target", "tensorrt"], "--target portable"),
    (["--embedding", "float32"], "--embedding applies to quantised weights"),
    (["--weights", "int8", "--embedding", "int4"], "--embedding"),
])
def test_bad_weight_options_are_refused_and_write_nothing(models, tmp_path, args, fragment):
    ckpt, _ = models["mamba2-g1"]
    before = tree(tmp_path)
    assert_refused(ssmrt("export", ckpt, "-o", tmp_path / "out", *args), fragment)
    assert tree(tmp_path) == before


def test_quantising_leaves_the_caller_s_logging_as_it_was(models, tmp_path):
    """ONNX Runtime's quantiser configures the root logger when it is imported (INFO, a stderr handler); an export
    with --weights in a fresh process leaves the root logger as the caller had it, and a second export prints no
    other library's INFO lines."""
    ckpt, _ = models["mamba2-g1"]
    code = ("import logging, sys; from ssmrt.exporter import export; "
            f"export({str(ckpt)!r}, {str(tmp_path / 'a')!r}, weights='int8'); "
            "root = logging.getLogger(); print(root.level, len(root.handlers)); "
            f"export({str(ckpt)!r}, {str(tmp_path / 'b')!r}, weights='int4')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == [str(logging.WARNING), "0"], res.stdout
    assert "[INFO]" not in res.stderr, res.stderr[-2000:]


def test_the_api_refuses_bad_weight_options_before_loading(tmp_path):
    for kw in ({"weights": "int3"}, {"weights": "int4", "block_size": 24}, {"block_size": 32},
               {"weights": "int4", "block_size": True}, {"weights": "int4", "dtype": "bfloat16"},
               {"activations": "int8"}, {"weights": "int8", "activations": "float16"}, {"embedding": "float32"},
               {"weights": "int8", "embedding": "float16"}):
        with pytest.raises(SsmrtError):
            export(tmp_path / "no-such-checkpoint", tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_cli_export_with_activations_records_and_runs_them(models, tmp_path):
    """`ssmrt export --weights int4 --block-size 16 --activations float32` on the command line: the artifact records
    the choice, every MatMulNBits carries it (accuracy level 0), and the runner reads it back."""
    ckpt, _ = models["mamba2-g1"]
    res = ssmrt("export", ckpt, "-o", tmp_path / "art", "--weights", "int4", "--block-size", "16",
                "--activations", "float32")
    assert res.returncode == 0, res.stderr
    m = onnx.load(str(tmp_path / "art" / "model.onnx"))
    meta = json.loads({p.key: p.value for p in m.metadata_props}["ssmrt.export"])
    assert meta["weights"] == {"scheme": "int4", "bits": 4, "block_size": 16, "symmetric": Q.SYMMETRIC,
                               "activations": "float32", "embedding": "int8"}
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all({a.name: a.i for a in n.attribute}.get("accuracy_level", 0) == 0 for n in nbits)
    assert all({a.name: a.i for a in n.attribute}["block_size"] == 16 for n in nbits)
    assert OnnxRuntimeRunnerFromArtifact(tmp_path / "art").weights["activations"] == "float32"


def test_cli_export_with_a_float_embedding_keeps_the_table(models, tmp_path):
    """`--embedding float32`: the table stays a float Gather of input_ids (no GatherBlockQuantized), the metadata
    and inspect say so, and the artifact computes the model its quantised matrices mean (its own verdict), which
    is closer to the unquantised model than the int8 table's."""
    ckpt, arts = models["mamba2-g1"]
    res = ssmrt("export", ckpt, "-o", tmp_path / "art", "--weights", "int8", "--activations", "float32",
                "--embedding", "float32")
    assert res.returncode == 0, res.stderr
    m = onnx.load(str(tmp_path / "art" / "model.onnx"))
    assert not [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]
    inits = {t.name for t in m.graph.initializer}
    assert [n for n in m.graph.node if n.op_type == "Gather" and n.input[0] in inits and n.input[1] == "input_ids"]
    assert OnnxRuntimeRunnerFromArtifact(tmp_path / "art").weights["embedding"] == "float32"
    assert "float32 activations, float32 embedding)" in ssmrt("inspect", tmp_path / "art").stdout
    kept = _report(ckpt, tmp_path / "art")
    assert kept.passed, kept.format()
    coded = _report(ckpt, arts["int8/float32"])
    assert (np.mean([s.original.kl_mean for s in kept.steps])
            < np.mean([s.original.kl_mean for s in coded.steps])), (kept.format(), coded.format())


def test_a_forged_weights_entry_is_refused(models, tmp_path):
    _, arts = models["mamba2-g1"]
    m = onnx.load(str(arts["int8"] / "model.onnx"))
    for p in m.metadata_props:
        if p.key == "ssmrt.export":
            p.value = json.dumps({**json.loads(p.value), "weights": {"scheme": "int3"}})
    (tmp_path / "art").mkdir()
    onnx.save(m, str(tmp_path / "art" / "model.onnx"))
    with pytest.raises(SsmrtError, match="export.weights"):
        OnnxRuntimeRunnerFromArtifact(tmp_path / "art")


def test_an_artifact_without_the_activations_entry_computed_float32_ones(models, tmp_path):
    """Artifacts exported before --activations existed have accuracy level 0 and no entry: read as float32."""
    _, arts = models["mamba2-g1"]
    m = onnx.load(str(arts["int8/float32"] / "model.onnx"))
    for p in m.metadata_props:
        if p.key == "ssmrt.export":
            doc = json.loads(p.value)
            del doc["weights"]["activations"]
            p.value = json.dumps(doc)
    (tmp_path / "art").mkdir()
    onnx.save(m, str(tmp_path / "art" / "model.onnx"))
    assert OnnxRuntimeRunnerFromArtifact(tmp_path / "art").weights["activations"] == "float32"
    assert "asymmetric, float32 activations, int8 embedding)" in ssmrt("inspect", tmp_path / "art").stdout


def test_a_weights_entry_without_the_embedding_entry_has_a_float_table():
    """Artifacts exported before the embedding was quantised record no `embedding`: their table is float32, and
    the model they mean keeps it so (dequantized_model); a quantised table is int8 whatever the weights' bits."""
    old = {"scheme": "int4", "bits": 4, "block_size": 32, "symmetric": False, "activations": "int8"}
    info = Q.scheme_of(old, "art")
    assert info["embedding"] == "float32"
    assert Q.describe_scheme(info).endswith("int8 activations, float32 embedding)")
    with pytest.raises(SsmrtError, match="embedding must be one of int8, float32"):
        Q.scheme_of({**old, "embedding": True}, "art")
    model = random_lm(arch="mamba2", d_model=64, d_state=16, headdim=16)
    table = model.backbone.embeddings.weight.detach().clone()
    kept = Q.dequantized_model(copy.deepcopy(model), info).backbone.embeddings.weight
    quantized = Q.dequantized_model(copy.deepcopy(model), {**info, "embedding": "int8"}).backbone.embeddings.weight
    assert torch.equal(kept, table) and not torch.equal(quantized, table)
    assert torch.equal(quantized, Q.fake_quantize(table.t(), 8, 32, False).t())


def test_the_decode_floor_counts_the_packed_weights(models):
    from ssmrt.bench import step_read_bytes

    _, arts = models["mamba2-g1"]
    sizes = {w: step_read_bytes(OnnxRuntimeRunnerFromArtifact(arts[w])) for w in (None, "int8", "int4")}
    assert sizes["int4"] < sizes["int8"] < sizes[None]


def test_a_tied_head_left_as_a_transpose_is_packed_too(tmp_path):
    """The exporter may leave a tied head as Transpose(embedding) (the demo's byte model): the head is quantised
    all the same, and the embedding is gathered from its own codes of the table."""
    from ssmrt.demo import char_model_config
    from ssmrt.exporter import export_model
    from ssmrt.models.mamba import MambaLM

    torch.manual_seed(0)
    cfg = char_model_config("mamba2")
    art = export_model(MambaLM(cfg).eval(), tmp_path / "art", weights="int8")
    m = onnx.load(str(art / "model.onnx"))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("MatMulNBits") == 2 * cfg.n_layer + 1 and "Transpose" not in ops
    (gather,) = [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]
    table = next(t for t in m.graph.initializer if t.name == gather.input[0])
    assert table.data_type == onnx.TensorProto.UINT8 and list(table.dims) == [cfg.padded_vocab_size, cfg.d_model]


@pytest.mark.parametrize("cid", ["mamba-untied-d64-k3-bias", "mamba2-g1"])
def test_float32_activation_int8_decode_runs_on_the_native_matmul(models, cid):
    """With the native library, the decode step of an artifact with int8 weights and float32 activations runs its
    MatMulNBits (every projection and the head) on Int8MatMul, the prompt on MatMulNBits: logits and states over a
    prompt and decode steps as ONNX Runtime's own kernels give them, to float32 rounding. int4 weights with float32
    activations keep MatMulNBits."""
    _, arts = models[cid]
    matmuls = sum(n.op_type == "MatMulNBits" for n in onnx.load(str(arts["int8/float32"] / "model.onnx")).graph.node)
    routed = OnnxRuntimeRunnerFromArtifact(arts["int8/float32"], provider="cpu", native_ops="on")
    plain = OnnxRuntimeRunnerFromArtifact(arts["int8/float32"], provider="cpu", native_ops="off")
    assert routed.decode_matmuls == matmuls > 0 and f"{matmuls} decode matmuls on Int8MatMul" in routed.describe()
    assert_same_decode(routed, plain)
    assert OnnxRuntimeRunnerFromArtifact(arts["int4/float32"], provider="cpu", native_ops="on").decode_matmuls == 0


def assert_same_decode(routed, plain):
    """Logits and states of a prompt and three decode steps on both runners within the float32 model tolerance."""
    atol, rtol = tolerance("float32", "model")
    results = []
    for r in (routed, plain):
        logits, state = r.forward(np.asarray([PROMPT]), r.zero_state(1))
        steps = [(logits, state)]
        for t in (7, 3, 9):
            steps.append(r.forward(np.asarray([[t]]), steps[-1][1]))
        results.append(steps)
    for i, ((lr, sr), (lp, sp)) in enumerate(zip(*results, strict=True)):
        assert_close(torch.from_numpy(lr), torch.from_numpy(lp), atol=atol, rtol=rtol, name=f"logits {i}")
        for j, (a, b) in enumerate(zip(sr, sp, strict=True)):
            assert_close(torch.from_numpy(a), torch.from_numpy(b), atol=atol, rtol=rtol, name=f"state {j} at {i}")


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("cid", ["mamba-untied-d64-k3-bias", "mamba2-g1"])
def test_int8_activation_decode_runs_on_the_integer_dot_matmul(models, cid, weights, monkeypatch):
    """With the native library built with its vector code, the decode step of an int8 / int4 artifact with int8
    activations runs its MatMulNBits on IntDotMatMul, the prompt on MatMulNBits: the same scheme (activation codes
    and integer sums) as ONNX Runtime's kernel, so logits and states over a prompt and decode steps as ONNX
    Runtime's own kernels give them, to float32 rounding. (Sums rounded differently could round an activation to
    the neighbouring code, moving that matmul's outputs by ~1e-3 of their size; in these models none does, and a
    wrong scheme shows as that much or more.)"""
    from ssmrt import ort_ops

    _, arts = models[cid]
    matmuls = sum(n.op_type == "MatMulNBits" for n in onnx.load(str(arts[weights] / "model.onnx")).graph.node)
    routed = OnnxRuntimeRunnerFromArtifact(arts[weights], provider="cpu", native_ops="on")
    if not ort_ops.int_dot_vectorised():
        assert routed.decode_matmuls == 0
        pytest.skip("IntDotMatMul has no vector code on this CPU: the runner keeps MatMulNBits")
    plain = OnnxRuntimeRunnerFromArtifact(arts[weights], provider="cpu", native_ops="off")
    assert routed.decode_matmuls == matmuls > 0 and f"{matmuls} decode matmuls on IntDotMatMul" in routed.describe()
    assert_same_decode(routed, plain)
    # where the library has only its plain loops, the runner leaves MatMulNBits alone
    monkeypatch.setattr(ort_ops, "int_dot_vectorised", lambda library=None: False)
    assert OnnxRuntimeRunnerFromArtifact(arts[weights], provider="cpu", native_ops="on").decode_matmuls == 0

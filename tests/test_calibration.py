"""GPTQ rounding of quantised weights (`export --weights ... --calibration TEXT`): the reference arithmetic
(`gptq_quantize_ref`: round-to-nearest where H says nothing, a smaller output error where the inputs are
correlated, the same codes as a column-at-a-time loop), the packing into MatMulNBits' initializers held to ONNX
Runtime's own bit for bit, the export (every matrix holds the codes of its own statistics, the metadata maps them),
the compare that reads those codes back (and fails when it rounds to nearest instead), the command line, and bad
input."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from bad_inputs import assert_refused, ssmrt, tree
from hf_models import hf_model, save_hf

from ssmrt import quantize as Q
from ssmrt.compare import _dequantized_runner, compare_runners, judges, reference_runner
from ssmrt.errors import SsmrtError
from ssmrt.exporter import export
from ssmrt.exporter.torch_to_onnx import export_model
from ssmrt.models.checkpoints import load_model
from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact
from ssmrt.runtime.tokenizer import TOKENIZER_FILE, byte_level_tokenizer_json

PROMPT = [5, 17, 3, 42, 8, 8, 61, 2, 90, 11, 33, 7]
# bytes under the test models' vocabulary of 97: the byte-level tokenizer gives each its own id
TEXT = "THE QUICK BROWN FOX 0123456789 JUMPS OVER THE LAZY DOG; " * 12


def _correlated(n: int, K: int, seed: int) -> torch.Tensor:
    """n rows of K features mixed by one random matrix (strongly correlated, as a trained model's are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=torch.Generator().manual_seed(1000 + K))
    return torch.randn(n, K, generator=g) @ mix * 0.3 + torch.randn(n, K, generator=g) * 0.05


def _output_error(X, w, codes) -> float:
    return float((X @ (w - Q.dequantize_ref(*codes, w.shape[0]))).pow(2).mean().sqrt())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("K,N,block", [(70, 9, 16), (64, 5, 32), (300, 7, 128), (33, 3, 64)])
def test_gptq_with_an_identity_hessian_is_round_to_nearest(bits, symmetric, K, N, block):
    """Where H is a multiple of the identity no rounding error is spread, and every code, scale and zero point
    is quantize_ref's, exactly (K not a multiple of the block, a block longer than K, both schemes)."""
    w = torch.randn(K, N, generator=torch.Generator().manual_seed(K * N))
    rtn = Q.quantize_ref(w, bits, block, symmetric)
    gptq = Q.gptq_quantize_ref(w, torch.eye(K, dtype=torch.float64) * 7.0, bits, block, symmetric)
    for a, b in zip(rtn, gptq, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("K,N,block", [(96, 40, 32), (200, 24, 16), (257, 12, 128)])
def test_gptq_lowers_the_output_error_on_correlated_inputs(bits, K, N, block):
    """On inputs like its calibration's (another sample of the same distribution) GPTQ's codes move the matmul's
    outputs clearly less than rounding to nearest; its codes stay on the scheme's grid."""
    w = torch.randn(K, N, generator=torch.Generator().manual_seed(3)) * 0.02
    calib, held_out = _correlated(4 * K, K, 1), _correlated(2 * K, K, 2)
    H = calib.double().t() @ calib.double()
    rtn = Q.quantize_ref(w, bits, block, False)
    q, scales, zp = gptq = Q.gptq_quantize_ref(w, H, bits, block, False)
    assert q.dtype == torch.uint8 and int(q.max()) < (1 << bits) and int(zp.max()) < (1 << bits)
    assert q.shape == rtn[0].shape and scales.shape == rtn[1].shape and zp.shape == rtn[2].shape
    assert not torch.any(q.reshape(N, -1)[:, K:])  # nothing past K
    for X in (calib, held_out):
        assert _output_error(X, w, gptq) < 0.8 * _output_error(X, w, rtn)


def _gptq_one_column_at_a_time(w, H, bits, block):
    """GPTQ written as the paper states it, in float64: after each feature's rounding every later feature is
    updated at once (no batches of columns), each block's grid taken from its weights as they then stand."""
    K, N = w.shape
    Hd = H.clone()
    Hd += Q.GPTQ_DAMP * float(Hd.diagonal().mean()) * torch.eye(K, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    W = w.t().double().clone()
    out = torch.zeros(N, K, dtype=torch.float64)
    for i in range(K):
        if i % block == 0:
            width = min(block, K - i)
            cols = torch.zeros(N, 1, block, dtype=torch.float32)
            cols[:, 0, :width] = W[:, i:i + width].float()
            valid = (torch.arange(block) < width).reshape(1, 1, block)
            s, z, r = (t[:, 0] for t in Q._block_grid(cols, valid, bits, False))
        deq = (s * (Q._code(W[:, i].float(), r, z, bits) - z)).double()
        out[:, i] = deq
        W[:, i + 1:] -= ((W[:, i] - deq) / U[i, i])[:, None] * U[i, i + 1:][None, :]
    return out.t()


@pytest.mark.parametrize("K,block", [(300, 32), (600, 256)])
def test_gptq_batches_do_what_the_paper_s_loop_does(K, block):
    """The batched columns (GPTQ_COLUMNS at a time, the rest of the matrix updated once a batch; blocks inside a
    batch and blocks spanning several) against a column-at-a-time loop in float64. One code flipped by rounding
    order changes every update after it, so the two are compared by what GPTQ minimises, |X (W - W')|^2: within
    3% of each other, and well under rounding to nearest."""
    N = 16
    w = torch.randn(K, N, generator=torch.Generator().manual_seed(5)) * 0.02
    X = _correlated(3 * K, K, 6)
    H = X.double().t() @ X.double()
    batched = Q.dequantize_ref(*Q.gptq_quantize_ref(w, H, 4, block, False), K).double()
    plain = _gptq_one_column_at_a_time(w, H, 4, block)

    def cost(wq):
        d = w.double() - wq
        return float(torch.einsum("kn,kj,jn->", d, H, d))

    rtn = Q.dequantize_ref(*Q.quantize_ref(w, 4, block, False), K).double()
    assert abs(cost(batched) - cost(plain)) < 0.03 * cost(plain)
    assert cost(plain) < 0.7 * cost(rtn)


@pytest.mark.parametrize("as_linear", [False, True])
def test_gptq_leaves_its_inputs_as_they_were(as_linear):
    """gptq_quantize_ref updates a working copy of the weight, never the caller's: the weight as a plain [K, N]
    tensor or as the transposed view of an nn.Linear's [N, K] weight (what the export hands it; a view whose
    transpose is contiguous), K past one lazy batch of columns so that the later columns are updated, and H."""
    K, N = Q.GPTQ_COLUMNS + 72, 6
    X = _correlated(400, K, seed=3)
    H = (X.t() @ X).double()
    base = torch.randn(N, K, generator=torch.Generator().manual_seed(4)) * 0.1
    w = base.clone().t() if as_linear else base.t().contiguous()
    before, H_before = w.clone(), H.clone()
    codes = Q.gptq_quantize_ref(w, H, 4, 32, False)
    assert torch.equal(w, before) and torch.equal(H, H_before)
    assert not torch.equal(codes[0], Q.quantize_ref(w, 4, 32, False)[0])  # the later columns were updated


def test_gptq_refuses_a_hessian_of_another_size():
    with pytest.raises(SsmrtError, match=r"H must be \[8, 8\]"):
        Q.gptq_quantize_ref(torch.zeros(8, 3), torch.eye(7), 8, 16, False)


# ----------------------------------------------------------------------------------------- the export


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """config id -> (checkpoint with a byte-level tokenizer, {variant: artifact}): "rtn" int4 with float32
    activations; "int4/float32" and "int8" (int8 activations) rounded with GPTQ against TEXT."""
    root = tmp_path_factory.mktemp("calib")
    out = {}
    for cid in ("mamba-untied-d64-k3-bias", "mamba2-g1"):
        ckpt = save_hf(hf_model(cid), root / f"{cid}-ckpt")
        (ckpt / TOKENIZER_FILE).write_text(byte_level_tokenizer_json())
        (root / "calib.txt").write_text(TEXT)
        arts = {"rtn": export(ckpt, root / f"{cid}-rtn", weights="int4", activations="float32"),
                "int4/float32": export(ckpt, root / f"{cid}-gptq4", weights="int4", activations="float32",
                                       calibration=root / "calib.txt"),
                "int8": export(ckpt, root / f"{cid}-gptq8", weights="int8", calibration=root / "calib.txt")}
        out[cid] = ckpt, arts
    return out


@pytest.mark.parametrize("variant", ["int4/float32", "int8"])
def test_every_matrix_holds_the_codes_of_its_own_statistics(calibrated, variant):
    """The metadata names a MatMulNBits node for every quantised matrix, and each holds exactly
    calibrated_codes_ref's codes for it (the whole models' inputs on the calibration text, under the artifact's
    own scheme): the export hands each matrix its own statistics."""
    for cid, (ckpt, arts) in calibrated.items():
        info = OnnxRuntimeRunnerFromArtifact(arts[variant]).weights
        ids = list(TEXT.encode())
        assert info["rounding"] == "gptq" and info["calibration_tokens"] == len(ids)
        model = load_model(ckpt, dtype="float32")
        names = [name for name, _, _ in Q.quantised_linears(model)]
        assert sorted(info["calibrated_nodes"]) == sorted(names)
        want = Q.calibrated_codes_ref(model, ids, info)
        codes = Q.artifact_codes(arts[variant] / "model.onnx", info)
        for name in names:
            for a, b in zip(want[name], codes[name], strict=True):
                assert np.array_equal(a.numpy(), b), (cid, name)


def _hessians(model, ids) -> dict:
    """{name: sum of x^T x} (float64) over what each quantised matrix multiplies as the model runs `ids` in one
    piece, seen through Q._Capture, the hooks calibrated_codes takes its inputs with."""
    sums: dict = {}

    def add(name, x):
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        sums[name] = sums.get(name, 0) + x.t() @ x

    with Q._Capture(model, [name for name, _, _ in Q.quantised_linears(model)], add), torch.no_grad():
        model(torch.tensor([list(ids)]))
    return sums


def test_the_hessians_see_every_matrix_s_input(calibrated):
    """The capture (Q._Capture) hands over what each matrix multiplies, checked through H = X^T X: for the head,
    the final norm's output, computed here from the model's own forward pass; every H is symmetric and non-zero; and the
    model is left as it came (no hooks, Mamba-1's dt_input back to what it was, and still applied meanwhile),
    also when its forward pass fails."""
    ckpt, _ = calibrated["mamba-untied-d64-k3-bias"]
    model = load_model(ckpt, dtype="float32")
    ids = list(TEXT.encode())[:40]
    sums = _hessians(model, ids)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(torch.tensor([ids]))
    hook.remove()
    x = seen[0].double()
    assert torch.allclose(sums[Q.HEAD], x.t() @ x, rtol=1e-5, atol=1e-5 * float((x.t() @ x).abs().max()))
    for name, H in sums.items():
        assert torch.allclose(H, H.t(), rtol=1e-6, atol=0) and float(H.diagonal().min()) >= 0, name
        assert float(H.abs().max()) > 0, name

    def untouched():
        return all(not mod._forward_hooks for mod in model.modules())

    mixers = [layer.mixer for layer in model.backbone.layers]
    calls = []
    for m in mixers:
        m.dt_input = lambda dt: (calls.append(1), dt * 2)[1]
    before = [m.dt_input for m in mixers]
    doubled = _hessians(model, ids)
    assert calls and untouched() and [m.dt_input for m in mixers] == before
    name = "backbone.layers.0.mixer.dt_proj"  # H of what dt_proj multiplies: dt_input's output, twice the input
    assert torch.allclose(doubled[name], 4 * sums[name], rtol=1e-5, atol=1e-5 * float(sums[name].abs().max()))
    with pytest.raises(IndexError):
        _hessians(model, [1, 2, 10_000])  # past the vocabulary: the embedding raises
    assert untouched() and [m.dt_input for m in mixers] == before


def _snapshot(model):
    return ([(k, v.clone()) for k, v in model.state_dict().items()], list(model.modules()),
            [getattr(layer.mixer, "dt_input", None) for layer in model.backbone.layers])


def _assert_as_it_came(model, snap):
    tensors, modules, dt_inputs = snap
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in tensors) and list(now) == [k for k, _ in tensors]
    assert list(model.modules()) == modules  # the same module objects: no wrapper left in place
    assert [getattr(layer.mixer, "dt_input", None) for layer in model.backbone.layers] == dt_inputs
    assert all(not mod._forward_hooks for mod in model.modules())
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.backbone.embeddings.weight


INFOS = {"int4/float32/float table": {"bits": 4, "block_size": 16, "symmetric": False, "activations": "float32",
                                      "embedding": "float32"},
         "int8/int8/int8 table": {"bits": 8, "block_size": 32, "symmetric": False, "activations": "int8",
                                  "embedding": "int8"}}


@pytest.mark.parametrize("scheme", sorted(INFOS))
def test_calibrated_codes_are_the_whole_model_reference_s_and_leave_the_model_as_it_came(calibrated, scheme):
    """calibrated_codes (the export's, a layer at a time along two streams) packs exactly calibrated_codes_ref's
    codes (the whole float and quantised models for each matrix in turn), for every matrix in quantised_linears'
    order, both families (Mamba-1's dt_proj applied as a bare matmul), with float and int8 activations and tables,
    the text in two pieces; and the model comes back as it was (weights, modules, dt_input, hooks, tying)."""
    info = INFOS[scheme]
    for cid, (ckpt, _) in calibrated.items():
        model = load_model(ckpt, dtype="float32")
        ids = list(TEXT.encode())
        assert len(ids) > Q.CALIBRATION_CHUNK  # more than one piece, each from an empty state
        snap = _snapshot(model)
        got = Q.calibrated_codes(model, ids, info)
        _assert_as_it_came(model, snap)
        want = Q.calibrated_codes_ref(model, ids, info)
        _assert_as_it_came(model, snap)
        assert list(got) == list(want) == [name for name, _, _ in Q.quantised_linears(model)], cid
        for name, owner, attr in Q.quantised_linears(model):
            w = getattr(owner, attr).weight.detach().t().contiguous().numpy()
            assert got[name][0] == (w.shape, Q._digest(w)), (cid, name)
            for a, b in zip(got[name][1], Q.pack_matmul_nbits(*want[name], info["bits"]), strict=True):
                assert np.array_equal(a, b), (cid, scheme, name)


def test_calibrated_codes_leave_the_model_as_it_came_when_they_fail(calibrated, monkeypatch):
    """An error part of the way through a layer (here the third matrix's rounding) leaves no matrix on its codes,
    no wrapper and no hook behind."""
    ckpt, _ = calibrated["mamba-untied-d64-k3-bias"]
    model = load_model(ckpt, dtype="float32")
    snap = _snapshot(model)
    calls = []
    real = Q.gptq_quantize_ref

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("planted")
        return real(*a, **k)

    monkeypatch.setattr(Q, "gptq_quantize_ref", failing)
    with pytest.raises(RuntimeError, match="planted"):
        Q.calibrated_codes(model, list(TEXT.encode()), INFOS["int8/int8/int8 table"])
    assert len(calls) == 3
    _assert_as_it_came(model, snap)


def test_the_compensated_target_undoes_what_the_earlier_matrices_changed():
    """compensated_target's weight W' maps the quantised model's inputs Xq to the float model's outputs X w
    (least squares, damped): where Xq is X plus a systematic error (a bias and a mixing), Xq W' is far closer to
    X w than Xq w is; where Xq is X, W' is w and H is X^T X."""
    K, N = 24, 7
    X = _correlated(600, K, seed=5)
    w = torch.randn(K, N, generator=torch.Generator().manual_seed(6))
    mix = torch.eye(K) + 0.05 * torch.randn(K, K, generator=torch.Generator().manual_seed(7))
    Xq = X @ mix + 0.02
    pieces = lambda t: [t[:250], t[250:]]  # noqa: E731
    target, H = Q.compensated_target(w, pieces(X), pieces(Xq), damp=1e-6)
    want = (Xq.t() @ Xq).double()
    assert torch.allclose(H, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    before = float((Xq @ w - X @ w).pow(2).mean())
    after = float((Xq @ target - X @ w).pow(2).mean())
    assert after < 0.01 * before, (after, before)
    same, H_same = Q.compensated_target(w, pieces(X), pieces(X))
    want = (X.t() @ X).double()
    assert torch.equal(same, w) and torch.allclose(H_same, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_the_packing_is_what_onnxruntime_wrote_bit_for_bit(calibrated):
    """pack_matmul_nbits of the codes ONNX Runtime's quantiser packed gives back its initializers byte for
    byte (int4: two codes a byte, the zero points' padding nibble; int8 too), so GPTQ's codes are laid out as
    the kernels read them. One nibble is left out: with an odd K, the int4 byte that holds a row's last code
    holds in its high nibble a code past K that the kernels never read, and that ONNX Runtime leaves as
    whatever its packing loop had there."""
    checked = 0
    for _, (ckpt, _) in calibrated.items():
        float_graph = export(ckpt, ckpt.parent / f"{ckpt.name}-float") / "model.onnx"  # what quantize_graph starts from
        for weights in ("int8", "int4"):
            for block in (16, 32):
                graph = Q.quantize_graph(onnx.load(str(float_graph)), {
                    "scheme": weights, "bits": Q.SCHEMES[weights], "block_size": block, "symmetric": False,
                    "activations": "float32", "embedding": "float32"}, Q.expected_matmuls(load_model(ckpt).config))
                inits = {t.name: t for t in graph.graph.initializer}
                for node in (n for n in graph.graph.node if n.op_type == "MatMulNBits"):
                    K = {a.name: a.i for a in node.attribute}["K"]
                    packed = Q.pack_matmul_nbits(*Q.unpack_matmul_nbits(node, inits), Q.SCHEMES[weights])
                    for name, a in zip(node.input[1:4], packed, strict=True):
                        wrote = onnx.numpy_helper.to_array(inits[name]).reshape(a.shape).copy()
                        if name == node.input[1] and weights == "int4" and K % 2:
                            wrote[:, -1, (K % block) // 2] &= 0x0F
                        assert wrote.tobytes() == a.tobytes(), (node.name, name)
                    checked += 1
    assert checked > 0


def _report(ckpt, art, **kw):
    candidate = OnnxRuntimeRunnerFromArtifact(art)
    return compare_runners(candidate=candidate, prompt_ids=PROMPT, steps=6, **judges(ckpt, candidate), **kw)


def test_compare_judges_the_codes_the_artifact_holds(calibrated):
    """A GPTQ-rounded artifact passes its own verdict (the model its codes mean, read from it), with float32 and
    with int8 activations; judged as if rounded to nearest (the codes computed again from the checkpoint) it
    fails: the codes differ, and the compare sees it."""
    for cid, (ckpt, arts) in calibrated.items():
        for variant in ("int4/float32", "int8"):
            report = _report(ckpt, arts[variant])
            assert report.passed, (cid, variant, report.format())
            assert "GPTQ rounding" in report.candidate
        art = arts["int4/float32"]
        info = OnnxRuntimeRunnerFromArtifact(art).weights
        as_rtn = {k: v for k, v in info.items() if k not in ("rounding", "calibrated_nodes")}
        wrong = compare_runners(reference_runner(ckpt, weights=as_rtn), OnnxRuntimeRunnerFromArtifact(art), PROMPT, 6,
                                baseline=_dequantized_runner(ckpt, as_rtn, "float32", "cpu"))
        assert not wrong.passed, cid


def test_gptq_brings_the_model_closer_than_rounding_to_nearest(calibrated):
    """On the calibration text, the model the GPTQ artifact's codes mean (float32 activations) has logits closer
    to the float model's than the model of the round-to-nearest artifact's codes: the codes chosen against the
    quantised model's own inputs make up for the earlier matrices' error rather than add to it."""
    ids = torch.tensor([list(TEXT.encode())[:256]])
    for cid, (ckpt, arts) in calibrated.items():
        with torch.no_grad():
            want = load_model(ckpt, dtype="float32").double()(ids)[0]
        err = {}
        for kind in ("rtn", "int4/float32"):
            info = OnnxRuntimeRunnerFromArtifact(arts[kind]).weights
            codes = Q.artifact_codes(arts[kind] / "model.onnx", info) if kind != "rtn" else None
            model = Q.dequantized_model(load_model(ckpt, dtype="float32"), info, codes).double()
            with torch.no_grad():
                err[kind] = float((model(ids)[0] - want).pow(2).mean().sqrt())
        assert err["int4/float32"] < 0.8 * err["rtn"], (cid, err)


def test_dequantized_model_needs_the_codes_of_gptq_weights(calibrated):
    ckpt, arts = calibrated["mamba2-g1"]
    info = OnnxRuntimeRunnerFromArtifact(arts["int8"]).weights
    with pytest.raises(SsmrtError, match="need their codes"):
        Q.dequantized_model(load_model(ckpt, dtype="float32"), info)
    with pytest.raises(SsmrtError, match="name the artifact"):
        _dequantized_runner(ckpt, info, "float32", "cpu")
    codes = Q.artifact_codes(arts["int8"] / "model.onnx", info)
    del codes[Q.HEAD]
    with pytest.raises(SsmrtError, match="no codes for lm_head"):
        Q.dequantized_model(load_model(ckpt, dtype="float32"), info, codes)
    codes = Q.artifact_codes(arts["int8"] / "model.onnx", info)
    name = "backbone.layers.0.mixer.out_proj"
    codes[name] = tuple(t[:-1] for t in codes[name])  # one output column short
    with pytest.raises(SsmrtError, match=f"codes for {name} are a "):
        Q.dequantized_model(load_model(ckpt, dtype="float32"), info, codes)


# ----------------------------------------------------------------------------------------- the command line


def test_cli_export_with_calibration_records_it_and_inspect_shows_it(calibrated, tmp_path):
    ckpt, _ = calibrated["mamba2-g1"]
    (tmp_path / "calib.txt").write_text(TEXT[:200])
    res = ssmrt("export", ckpt, "-o", tmp_path / "art", "--weights", "int4", "--calibration", tmp_path / "calib.txt")
    assert res.returncode == 0, res.stderr
    shown = ssmrt("inspect", tmp_path / "art")
    assert shown.returncode == 0, shown.stderr
    assert ("weights: int4 weights (block 32, asymmetric, int8 activations, int8 embedding, GPTQ rounding on 200 "
            "calibration tokens)") in shown.stdout
    info = json.loads(ssmrt("inspect", tmp_path / "art", "--json").stdout)["weights"]
    assert info["rounding"] == "gptq" and info["calibration_tokens"] == 200
    compared = ssmrt("compare", ckpt, tmp_path / "art", "--steps", "4")
    assert compared.returncode == 0, compared.stdout + compared.stderr


@pytest.mark.parametrize("args,fragment", [
    (["--calibration", "{text}"], "--calibration applies to quantised weights"),
    (["--weights", "int8", "--calibration", "{missing}"], "not a file"),
    (["--weights", "int8", "--calibration", "{binary}"], "not UTF-8 text"),
    (["--weights", "int8", "--calibration", "{empty}"], "has no tokens"),
    (["--weights", "int8", "--calibration", "{wide}"], "outside the model's vocabulary [0, 97)"),
])
def test_bad_calibration_is_refused_and_writes_nothing(calibrated, tmp_path, args, fragment):
    ckpt, _ = calibrated["mamba2-g1"]
    files = tmp_path / "in"
    files.mkdir()
    (files / "text.txt").write_text(TEXT)
    (files / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (files / "empty.txt").write_text("")
    (files / "wide.txt").write_text("lower case bytes are past a vocabulary of 97")
    paths = {"text": files / "text.txt", "missing": files / "nothing.txt", "binary": files / "binary.txt",
             "empty": files / "empty.txt", "wide": files / "wide.txt"}
    before = tree(tmp_path)
    assert_refused(ssmrt("export", ckpt, "-o", tmp_path / "out", *[a.format(**paths) for a in args]), fragment)
    assert tree(tmp_path) == before


def test_calibration_without_a_tokenizer_is_refused(tmp_path):
    ckpt = save_hf(hf_model("mamba2-g1"), tmp_path / "ckpt")
    (tmp_path / "calib.txt").write_text(TEXT)
    assert_refused(ssmrt("export", ckpt, "-o", tmp_path / "out", "--weights", "int4", "--calibration",
                         tmp_path / "calib.txt"), "needs the checkpoint's tokenizer.json")
    assert not (tmp_path / "out").exists()


def test_identical_weights_cannot_be_told_apart(tmp_path):
    """Two projections with the same bytes: the graph does not say which matmul is which, so calibrating is
    refused (nothing written), where rounding to nearest, which needs no such map, exports."""
    model = load_model(save_hf(hf_model("mamba2-g1"), tmp_path / "ckpt"))
    with torch.no_grad():
        model.backbone.layers[1].mixer.out_proj.weight.copy_(model.backbone.layers[0].mixer.out_proj.weight)
    with pytest.raises(SsmrtError, match="identical"):
        export_model(model, tmp_path / "out", weights="int8", calibration_ids=list(range(50)))
    assert not (tmp_path / "out").exists()
    export_model(model, tmp_path / "rtn", weights="int8")


def test_the_api_takes_ids_as_arrays_and_refuses_a_misplaced_keyword(calibrated, tmp_path):
    ckpt, arts = calibrated["mamba2-g1"]
    ids = torch.tensor(list(TEXT.encode()))
    art = export_model(load_model(ckpt), tmp_path / "art", weights="int8", calibration_ids=ids)
    codes = Q.artifact_codes(art / "model.onnx", OnnxRuntimeRunnerFromArtifact(art).weights)
    same = Q.artifact_codes(arts["int8"] / "model.onnx", OnnxRuntimeRunnerFromArtifact(arts["int8"]).weights)
    assert all(np.array_equal(a, b) for name in codes for a, b in zip(codes[name], same[name], strict=True))
    with pytest.raises(SsmrtError, match="calibration_ids= is export_model's"):
        export(ckpt, tmp_path / "other", weights="int8", calibration_ids=[1, 2])


def test_the_api_refuses_bad_calibration_ids(tmp_path):
    model = load_model(save_hf(hf_model("mamba2-g1"), tmp_path / "ckpt"))
    for kw, fragment in (({"calibration_ids": [1, 2]}, "applies to quantised weights"),
                         ({"weights": "int8", "calibration_ids": []}, "non-empty"),
                         ({"weights": "int8", "calibration_ids": "abc"}, "non-empty"),
                         ({"weights": "int8", "calibration_ids": [1, 97]}, "[0, 97)"),
                         ({"weights": "int8", "calibration_ids": [1, 2.0]}, "not a token id"),
                         ({"weights": "int8", "calibration_ids": [True]}, "not a token id")):
        with pytest.raises(SsmrtError, match=None) as e:
            export_model(model, tmp_path / "out", **kw)
        assert fragment in str(e.value), (kw, str(e.value))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,fragment", [
    ({"rounding": "stochastic"}, "rounding must be one of"),
    ({"calibrated_nodes": None}, "without the map of their"),
    ({"calibrated_nodes": {"lm_head": 3}}, "without the map of their"),
])
def test_a_forged_rounding_entry_is_refused(calibrated, tmp_path, change, fragment):
    _, arts = calibrated["mamba2-g1"]
    m = onnx.load(str(arts["int8"] / "model.onnx"))
    for p in m.metadata_props:
        if p.key == "ssmrt.export":
            doc = json.loads(p.value)
            doc["weights"].update(change)
            p.value = json.dumps(doc)
    (tmp_path / "art").mkdir()
    onnx.save(m, str(tmp_path / "art" / "model.onnx"))
    with pytest.raises(SsmrtError, match=fragment):
        OnnxRuntimeRunnerFromArtifact(tmp_path / "art")


def test_codes_named_but_missing_from_the_graph_are_refused(calibrated):
    _, arts = calibrated["mamba2-g1"]
    info = copy.deepcopy(OnnxRuntimeRunnerFromArtifact(arts["int8"]).weights)
    info["calibrated_nodes"][Q.HEAD] = "no_such_node"
    with pytest.raises(SsmrtError, match="no_such_node"):
        Q.artifact_codes(arts["int8"] / "model.onnx", info)

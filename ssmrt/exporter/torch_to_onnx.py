"""MambaLM -> model.onnx: one graph for prefill and decode, SSM ops as ssmrt::* nodes with fallback bodies.

Graph inputs: input_ids (batch, seqlen) int64, then per layer i conv_state.{i}, ssm_state.{i}.
Graph outputs: logits (batch, seqlen | 1, vocab), then present_conv_state.{i}, present_ssm_state.{i}.
The model's config and the state specs go into metadata_props, so a runtime needs only the .onnx file.

With target "tensorrt" the artifact also holds prefill.onnx: the same graph (inputs, outputs, weights) with each
scan as its chain of three nodes (ssmrt.ops.spec.CHAINS), each of which a TensorRT AOT plugin runs as one
kernel; model.onnx keeps one node per op, the recurrence, for decode and short prompts. Both graphs read the
weights from the one external data file.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

from .. import artifact
from ..artifact import (
    DATA_FILE,
    DEFAULT_OPSET,
    DTYPES,
    LOGITS_MODES,
    MODEL_FILE,
    PREFILL_FILE,
    TARGETS,
    TOKENIZER_FILES,
    flatten_states,
    pair_states,
    state_names,
)
from ..errors import SsmrtError
from ..fsutil import output_directory
from ..ops.spec import ALL_OPS, DOMAIN, OPSET_VERSION, SELECTIVE_CHAIN_CHUNK, ssd_chain_chunk
from .functions import MIN_OPSET, Static, all_functions

# Above this many bytes of weights the tensors go to an external data file (protobuf stops at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30
EXTERNAL_SIZE = 1024  # in external data, the tensors of at least this many bytes (smaller ones stay inline)
PLUGIN_ATTRS = {"plugin_namespace": DOMAIN, "plugin_version": str(OPSET_VERSION)}


# ----------------------------------------------------------------------------- symbolic op emission


class _StaticInfo:
    """Records what every node of each op agrees on, for the fallback bodies (functions.Static): input
    dimensions that are ints at every node (batch and seqlen are symbolic during export), input dtypes, and
    attribute values."""

    def __init__(self):
        self.static: dict[str, Static] = {}

    def record(self, op_name: str, inputs, attrs: dict):
        spec = ALL_OPS[op_name]
        first = op_name not in self.static
        seen = self.static.setdefault(op_name, Static())
        for tspec, t in zip(spec.inputs, inputs, strict=True):
            shape = tuple(d if isinstance(d, int) else None for d in t.shape)
            old = seen.shapes.get(tspec.name, shape)
            if len(old) != len(shape):
                shape = (None,) * len(shape)
            seen.shapes[tspec.name] = tuple(a if a == b else None for a, b in zip(old, shape, strict=True))
            dtype = str(t.dtype).removeprefix("torch.")
            if first:
                seen.dtypes[tspec.name] = dtype
            elif seen.dtypes.get(tspec.name) != dtype:
                seen.dtypes.pop(tspec.name, None)
        for name, value in attrs.items():
            if first:
                seen.attrs[name] = value
            elif seen.attrs.get(name) != value:
                seen.attrs.pop(name, None)


class _SymbolicOps:
    """The ops as ssmrt::* nodes (what ops.dispatch runs during export), recording what is static.

    Every input is supplied, so the fallback bodies need no presence test: a missing conv bias, D or bias
    becomes zeros. A missing z cannot be expressed (no z has silu(z) == 1 exactly) and is refused.
    """

    def __init__(self, recorder: _StaticInfo, chains: bool = False):
        self.recorder = recorder
        self.chains = chains  # each scan as its chain of three nodes (the prefill graph of a TensorRT export)

    def _emit(self, op_name, inputs, attrs, like):
        """One ssmrt::op_name node; `like`: per output, a tensor of its dtype and shape, or a (dtype, shape)."""
        import torch

        self.recorder.record(op_name, inputs, attrs)
        like = [(t.dtype, t.shape) if isinstance(t, torch.Tensor) else t for t in like]
        return tuple(torch.onnx.ops.symbolic_multi_out(
            f"{DOMAIN}::{op_name}",
            inputs,
            {**attrs, **PLUGIN_ATTRS},
            dtypes=tuple(dtype for dtype, _ in like),
            shapes=tuple(tuple(shape) for _, shape in like),
            version=OPSET_VERSION,
        ))

    def causal_conv1d(self, x, weight, bias, conv_state, activation):
        if bias is None:
            bias = weight.new_zeros(weight.shape[0])
        return self._emit("CausalConv1d", (x, weight, bias, conv_state), {"activation": activation or "none"},
                          (x, conv_state))

    def selective_scan(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state):
        import torch

        if z is None:
            raise SsmrtError("SelectiveScan without a z gate cannot be exported (every Mamba-1 model has one)")
        dim = u.shape[-1]
        D = D if D is not None else torch.zeros(dim, dtype=torch.float32)
        delta_bias = delta_bias if delta_bias is not None else torch.zeros(dim, dtype=torch.float32)
        softplus = int(bool(delta_softplus))
        if not self.chains:
            return self._emit("SelectiveScan", (u, delta, A, B, C, D, z, delta_bias, ssm_state),
                              {"delta_softplus": softplus}, (u, ssm_state))
        Q = SELECTIVE_CHAIN_CHUNK
        batch, seqlen, _ = u.shape
        dstate = A.shape[-1]
        nchunks = (seqlen + Q - 1) // Q
        f32 = torch.float32
        states, delta_sum = self._emit(
            "SelectiveChunkState", (u, delta, A, B, delta_bias), {"chunk_size": Q, "delta_softplus": softplus},
            [(f32, (batch, nchunks, dim, dstate)), (f32, (batch, nchunks, dim))])
        entering, present = self._emit("SelectiveStatePassing", (states, delta_sum, A, ssm_state), {"chunk_size": Q},
                                       [(f32, (batch, nchunks, dim, dstate)), ssm_state])
        (y,) = self._emit("SelectiveChunkScan", (u, delta, A, B, C, D, z, delta_bias, entering),
                          {"chunk_size": Q, "delta_softplus": softplus}, [u])
        return y, present

    def ssd_scan(self, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, ssm_state, chunk_size):
        import torch

        nheads = x.shape[2]
        D = D if D is not None else torch.zeros(nheads, dtype=torch.float32)
        dt_bias = dt_bias if dt_bias is not None else torch.zeros(nheads, dtype=torch.float32)
        lo, hi = dt_limit
        dt_attrs = {"dt_softplus": int(bool(dt_softplus)), "dt_min": float(lo), "dt_max": float(hi)}
        if not self.chains:
            return self._emit("SSDScan", (x, dt, A, B, C, D, dt_bias, ssm_state),
                              {"chunk_size": int(chunk_size), **dt_attrs}, (x, ssm_state))
        Q = ssd_chain_chunk(int(chunk_size))
        batch, seqlen, _, headdim = x.shape
        dstate = B.shape[-1]
        nchunks = (seqlen + Q - 1) // Q
        f32 = torch.float32
        side, states_shape = (batch, nheads, nchunks, Q), (batch, nchunks, nheads, headdim, dstate)
        dt_out, dA_cumsum, states = self._emit("SSDChunkState", (x, dt, A, B, dt_bias), {"chunk_size": Q, **dt_attrs},
                                               [(f32, side), (f32, side), (f32, states_shape)])
        entering, present = self._emit("SSDStatePassing", (states, dA_cumsum, ssm_state), {"chunk_size": Q},
                                       [(f32, states_shape), ssm_state])
        (y,) = self._emit("SSDChunkScan", (x, B, C, D, dt_out, dA_cumsum, entering), {"chunk_size": Q}, [x])
        return y, present


# ------------------------------------------------------------------------------------------ export


def _torch_dtype(name: str, what: str):
    import torch

    if name not in DTYPES:
        raise SsmrtError(f"{what} must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def _graph_module(model, logits: str):
    """The module torch.onnx.export traces: forward(input_ids, *flat_states) -> (logits, *flat_new_states)."""
    import torch

    class GraphModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, *states):
            # "last" slices the hidden state before the head, not the logits after it (MambaLM.forward)
            out, new = self.model(input_ids, pair_states(states), last_only=logits == "last")
            return (out, *flatten_states(new))

    return GraphModule()


def _trace(model, ids, states, opset: int, logits: str, chains: bool):
    """The ModelProto of the model's graph (ssmrt::* nodes, each op's fallback body attached), without metadata.
    chains: each scan as its chain of three nodes."""
    import logging

    import onnx
    import torch

    from ..ops import dispatch

    cfg = model.config
    in_states, out_states = state_names(cfg.n_layer)
    B = torch.export.Dim("batch", min=1)
    L = torch.export.Dim("seqlen", min=1)
    dynamic = ({0: B, 1: L}, tuple({0: B} for _ in states))  # forward(input_ids, *states)
    # the exporter logs a warning per torchvision op it cannot register; torchvision is not ours to need
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    recorder = _StaticInfo()
    symbolic = _SymbolicOps(recorder, chains=chains)
    with warnings.catch_warnings(), dispatch.override(
        causal_conv1d=symbolic.causal_conv1d, selective_scan=symbolic.selective_scan, ssd_scan=symbolic.ssd_scan
    ):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                _graph_module(model, logits), (ids, *states), dynamo=True, opset_version=opset,
                input_names=["input_ids", *in_states], output_names=["logits", *out_states],
                dynamic_shapes=dynamic, verbose=False,
            )
        except Exception as e:  # the exporter's own errors are long; keep the first line
            raise SsmrtError(f"torch.onnx.export failed: {str(e).strip().splitlines()[0]}") from e
    proto = program.model_proto
    # the one-node graph carries every one-node op's body (as it always has); the prefill graph those it uses
    proto.functions.extend(all_functions(opset, recorder.static, ops=tuple(recorder.static)) if chains
                           else all_functions(opset, recorder.static))
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION))
    proto.producer_name = "ssmrt"
    from .. import __version__

    proto.producer_version = __version__
    return proto


def _share_weights(proto, saved: Path) -> None:
    """Points proto's initializers at the bytes the saved model (saved: its .onnx file) keeps in its external data
    file, where type, shape and contents agree (the exporter names folded constants by position, so names may
    differ between two graphs of one model): one copy of the weights for both. Anything else stays inline."""
    import hashlib

    import onnx

    def key(data_type, dims, data: bytes):
        return data_type, tuple(dims), len(data), hashlib.sha256(data).digest()

    kept = {}
    with open(saved.parent / DATA_FILE, "rb") as f:
        for t in onnx.load(str(saved), load_external_data=False).graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                where = {kv.key: kv.value for kv in t.external_data}
                f.seek(int(where.get("offset", 0)))
                kept.setdefault(key(t.data_type, t.dims, f.read(int(where["length"]))), t)
    for t in proto.graph.initializer:
        e = kept.get(key(t.data_type, t.dims, t.raw_data)) if t.HasField("raw_data") else None
        if e is not None:
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            t.external_data.extend(e.external_data)


def export_model(
    model,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    state_dtype: str = "float32",
    opset: int = DEFAULT_OPSET,
    logits: str = "all",
    source_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    target: str = "portable",
    weights: str | None = None,
    block_size: int | None = None,
    activations: str | None = None,
    embedding: str | None = None,
    calibration_ids=None,
) -> Path:
    """Export a MambaLM to out_dir/model.onnx (+ model.onnx.data for large models, + the tokenizer files).

    dtype: weights and activations; A, D, dt biases stay float32.
    state_dtype: the SSM state's dtype (the conv state follows the activations).
    logits: "all" positions or only the "last".
    source_dir: a checkpoint directory whose tokenizer files are copied along.
    overwrite: replace an earlier ssmrt export in out_dir. Without it an existing export is refused; with it,
        a directory holding anything ssmrt did not write is still refused. The new export is staged beside
        the old one and swapped in, so a failure or Ctrl-C leaves the old export or the new one, complete
        (ssmrt.fsutil).
    target: "portable" (one node per op), or "tensorrt": also prefill.onnx, the graph with each scan as its
        chain of one-kernel nodes, for long prompts on TensorRT AOT plugins; the weights then always go to
        model.onnx.data, which both graphs read.
    weights: None (float weights), "int8" or "int4": the projections and the LM head as ONNX Runtime's
        block-wise MatMulNBits (ssmrt.quantize), blocks of block_size (default 32) input features; a float32
        export for the portable target only. activations: what those matmuls multiply, "int8" (the default:
        each block of inputs quantised in the matmul, ONNX Runtime's integer kernels) or "float32".
        embedding: the token embedding table "int8" (the default: a row's codes dequantised as it is gathered)
        or "float32" (a larger file, one approximation less).
    calibration_ids: with weights, token ids (a sequence of ints) of a calibration text: the weights are rounded
        with GPTQ against the activations the model computes on it (ssmrt.quantize) instead of to nearest.
    """
    import copy

    import onnx
    import torch

    from ..models.mamba import MambaLM
    from ..runtime.sampling import is_int

    if not isinstance(model, MambaLM):
        raise SsmrtError(f"export_model(model) takes an ssmrt model (ssmrt.load_model), got {type(model).__name__}")
    act_dtype = _torch_dtype(dtype, "--dtype")
    st_dtype = _torch_dtype(state_dtype, "--state-dtype")
    if not is_int(opset):
        raise SsmrtError(f"--opset must be an integer, got {opset!r}")
    if logits not in LOGITS_MODES:
        raise SsmrtError(f"--logits must be one of {', '.join(LOGITS_MODES)}, got {logits!r}")
    if target not in TARGETS:
        raise SsmrtError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    from ..quantize import check_weights, expected_matmuls, quantize_graph

    quantized = check_weights(weights, block_size, dtype, target, activations, embedding)
    if calibration_ids is not None:
        calibration_ids = check_calibration_ids(calibration_ids, quantized, model.config.vocab_size)
    if opset < MIN_OPSET:
        raise SsmrtError(f"--opset must be {MIN_OPSET} or newer (the fallback bodies need it), got {opset}")
    if opset > onnx.defs.onnx_opset_version():
        raise SsmrtError(f"--opset {opset} is newer than the installed onnx {onnx.__version__} knows (up to "
                         f"{onnx.defs.onnx_opset_version()})")
    for name, t in model.state_dict().items():  # a NaN weight would export, and decode garbage, without a word
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SsmrtError(f"the model's weight {name} has NaN or Inf values; refusing to export it")
    plan = artifact.check_output(out_dir, overwrite)  # before the (long) trace, not after it

    # Export needs an eval-mode CPU model in the target dtype; copy only if getting there would change the
    # caller's model (a copy of a 2.7B fp32 model is 11 GB).
    device = next(model.parameters()).device
    if model.training or device.type != "cpu" or model.dtype != act_dtype:
        model = copy.deepcopy(model).cpu().eval().cast(act_dtype)
    cfg = model.config
    batch, seqlen = 2, 3  # > 1 so that torch.export keeps both dimensions symbolic
    ids = torch.zeros(batch, seqlen, dtype=torch.long)
    states = [t.to(st_dtype) if j == 1 else t
              for pair in model.zero_state(batch, "cpu", ssm_state_dtype=st_dtype) for j, t in enumerate(pair)]
    calibration = None
    if calibration_ids is not None:
        # before the trace: the calibration pass's working memory is free again for it, and only the packed
        # codes are held on
        from ..quantize import calibrated_codes

        calibration = calibrated_codes(model, calibration_ids, quantized)
        quantized["calibration_tokens"] = len(calibration_ids)
    graphs = {MODEL_FILE: _trace(model, ids, states, opset, logits, chains=False)}
    if target == "tensorrt":
        graphs[PREFILL_FILE] = _trace(model, ids, states, opset, logits, chains=True)
    if quantized is not None:
        graphs[MODEL_FILE] = quantize_graph(graphs[MODEL_FILE], quantized, expected_matmuls(cfg), calibration)

    from .. import __version__

    conv_shape, ssm_shape = cfg.state_shapes("batch")
    export_info = {"dtype": dtype, "state_dtype": state_dtype, "logits": logits, "opset": opset, "target": target,
                   "ssmrt_version": __version__}
    if target == "tensorrt":
        export_info["prefill"] = PREFILL_FILE
    if quantized is not None:
        export_info["weights"] = quantized
    for name, proto in graphs.items():
        # prefill.onnx says it is the prefill graph, so a runtime handed that file knows its scans are chains
        graph = {"graph": "prefill"} if name == PREFILL_FILE else {}
        artifact.write_metadata(proto, cfg.to_dict(),
                                artifact.state_specs(cfg.n_layer, conv_shape, ssm_shape, dtype, state_dtype),
                                {**export_info, **graph})
        onnx.checker.check_model(proto, full_check=proto.ByteSize() < (1 << 31) - 1)

    with output_directory(plan, main_file=MODEL_FILE) as tmp:
        weight_bytes = sum(t.nbytes for t in model.state_dict().values())
        external = weight_bytes > EXTERNAL_DATA_THRESHOLD or target == "tensorrt"
        onnx.save_model(graphs[MODEL_FILE], tmp / MODEL_FILE, save_as_external_data=external,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=EXTERNAL_SIZE)
        if PREFILL_FILE in graphs:
            _share_weights(graphs[PREFILL_FILE], tmp / MODEL_FILE)
            onnx.save_model(graphs[PREFILL_FILE], tmp / PREFILL_FILE)
        if source_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(source_dir) / name).is_file():
                    shutil.copyfile(Path(source_dir) / name, tmp / name)
    return plan.out


def export(model_dir, out_dir, overwrite: bool = False, calibration=None, **kwargs) -> Path:
    """Load a checkpoint directory and export it (see export_model for the options). The output location is
    checked before the checkpoint is loaded. calibration: with weights, a UTF-8 text file, tokenised with the
    checkpoint's tokenizer, whose activations GPTQ rounds the weights against (export_model's
    calibration_ids)."""
    from ..models.checkpoints import load_model
    from ..quantize import check_weights

    quantized = check_weights(kwargs.get("weights"), kwargs.get("block_size"), kwargs.get("dtype", "float32"),
                              kwargs.get("target", "portable"), kwargs.get("activations"),
                              kwargs.get("embedding"))  # a typo costs no load either
    if "calibration_ids" in kwargs:
        raise SsmrtError("export() takes calibration= (a text file); calibration_ids= is export_model's")
    ids = None
    if calibration is not None:
        if quantized is None:
            raise SsmrtError("--calibration applies to quantised weights; give --weights int8 or int4 with it")
        ids = read_calibration_text(calibration, model_dir)
    artifact.check_output(out_dir, overwrite)
    model = load_model(model_dir)
    vocab = model.config.vocab_size
    if ids is not None and max(ids) >= vocab:
        raise SsmrtError(f"--calibration {calibration}: the tokenizer gave id {max(ids)}, outside the model's "
                         f"vocabulary [0, {vocab}) (is {model_dir}'s tokenizer.json this model's?)")
    return export_model(model, out_dir, source_dir=model_dir, overwrite=overwrite, calibration_ids=ids, **kwargs)


def read_calibration_text(path, model_dir) -> list[int]:
    """The token ids of a calibration text file (UTF-8), through the checkpoint's tokenizer.json."""
    from ..runtime.tokenizer import load_tokenizer

    p = Path(path)
    if not p.is_file():
        raise SsmrtError(f"--calibration {p}: not a file; give a UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SsmrtError(f"--calibration {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise SsmrtError(f"--calibration {p}: cannot be read ({e.strerror})") from None
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise SsmrtError(f"--calibration needs the checkpoint's tokenizer.json to read the text; {model_dir} has none")
    ids = tokenizer.encode(text)
    if not ids:
        raise SsmrtError(f"--calibration {p}: the text has no tokens")
    return ids


def check_calibration_ids(ids, quantized: dict | None, vocab: int) -> list[int]:
    """Calibration token ids as a list of ints, checked: only with quantised weights, at least one, each in
    [0, vocab)."""
    from ..runtime.sampling import is_int

    if quantized is None:
        raise SsmrtError("--calibration applies to quantised weights; give --weights int8 or int4 with it")
    if hasattr(ids, "tolist") and not isinstance(ids, str | bytes):  # a numpy array or a torch tensor
        ids = ids.tolist()
    if isinstance(ids, str | bytes) or not hasattr(ids, "__len__") or len(ids) == 0:
        raise SsmrtError("calibration_ids must be a non-empty sequence of token ids")
    bad = [t for t in ids if not is_int(t) or not 0 <= int(t) < vocab]
    if bad:
        raise SsmrtError(f"calibration_ids: {bad[0]!r} is not a token id in [0, {vocab})")
    return [int(t) for t in ids]

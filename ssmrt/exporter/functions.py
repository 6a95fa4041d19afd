"""Portable fallback bodies of the ssmrt::* ops, as ONNX FunctionProtos in standard ops.

ONNX Runtime inlines them, so an exported model runs anywhere with no plugin; TensorRT maps the same nodes
to plugins instead. The math is the ops/ references', in float32 whatever the activation dtype:

- CausalConv1d: with the channels and width known, a depthwise Conv in the channels-first layout the state
  already has. ONNX Runtime runs it as its blocked depthwise kernel, faster than gathered windows at prefill,
  and at decode it is fewer nodes than unrolled multiply-adds, which is what a decode step pays for (each node
  runs on caches the weight reads have just evicted). Otherwise one Gather builds the K-wide windows, then a
  multiply and a sum.
- SelectiveScan: decode (L == 1) is one recurrence step. Prefill is a Scan over chunks of SCAN_CHUNK tokens
  whose body computes the chunk's discretisation and unrolls its recurrence, so the (chunk, dim, dstate)
  working set stays in cache and nothing of size (L, dim, dstate) is ever written.
- SSDScan: decode is one step; prefill is the chunked matmul form (Mamba-2 paper, listing 1) with a chunk of
  min(SSD_CHUNK, L), the inter-chunk recurrence done as one masked-decay matmul: no Loop or Scan at all.
- The chains (three nodes per scan, for TensorRT's one-kernel plugins; ssmrt.ops.chains): SSDChunkState and
  SSDChunkScan are _ssd_prefill's chunked matmul form cut at the chain's chunk_size, SSDStatePassing and
  SelectiveStatePassing a Scan over the chunks, SelectiveChunkState and SelectiveChunkScan a Scan over the positions
  within a chunk that runs all chunks at once, unrolled as the Mamba-1 prefill body is.

Each one-node body is an If on L == 1 between a decode helper and a prefill helper, each filling one Builder of
its own (one graph). The fixed maths is ONNX text (onnx.parser), as ONNX's own schemas write their function bodies; only
what an export specialises is made in Python, from the Static passed in: dimensions the export knows become
constants (ONNX Runtime folds them instead of evaluating a Shape on every call), inputs already float32 get no
Cast and outputs no cast back, attribute values the export saw at every node decide at build time what would
otherwise be a test at run time (an unknown one is read through a Constant with ref_attr_name).

The exporter always supplies every input (zeros / ones for what a model lacks), so the bodies need no
presence tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, parser

from ..ops.spec import (
    CAUSAL_CONV1D,
    DOMAIN,
    OPS,
    SELECTIVE_CHUNK_SCAN,
    SELECTIVE_CHUNK_STATE,
    SELECTIVE_SCAN,
    SELECTIVE_STATE_PASSING,
    SOFTPLUS_THRESHOLD,
    SSD_CHUNK_SCAN,
    SSD_CHUNK_STATE,
    SSD_SCAN,
    SSD_STATE_PASSING,
    dt_limit_active,
)

# Tokens per Scan iteration in the Mamba-1 prefill body: long enough that the Scan runs L/16 iterations,
# short enough that a chunk's (16, dim, dstate) decay and input tensors stay in cache.
SCAN_CHUNK = 16
# The SSD result does not depend on the chunk length; the fallback picks its own. The (l, l) intra-chunk
# tensors grow with it, the (chunks, chunks) inter-chunk decay with its inverse: 64 balances them on CPU.
SSD_CHUNK = 64
PLUGIN_ATTRS = ("plugin_namespace", "plugin_version")
# The value the scan bodies branch on: seqlen == 1 (the decode step) or not (the prefill form).
STEP_CONDITION = "is_step"
BRANCHES = {"step": "then_branch", "prefill": "else_branch"}
MIN_OPSET = 19  # Equal on strings (the activation attribute)


@dataclass
class Static:
    """What an export knows of one op, the same at all its nodes.

    shapes: input name -> shape, None where a dimension is dynamic (batch, seqlen);
    dtypes: input name -> dtype name ("float32", ...); attrs: attribute name -> value. A name is absent where
    the nodes disagree.
    """

    shapes: dict[str, tuple] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, object] = field(default_factory=dict)

    def dim(self, name: str, axis: int) -> int | None:
        """The size of input `name` along `axis`, None where unknown."""
        shape = self.shapes.get(name)
        return shape[axis] if shape is not None and axis < len(shape) else None

    def is_float32(self, name: str) -> bool:
        return self.dtypes.get(name) == "float32"


class Builder:
    """The nodes of one graph: a function body, an If branch or a Scan body.

    `add` appends nodes written in ONNX text; `op` appends one node made in Python (the specialised parts). Text
    refers to values by name, and a name must be bound: by `let` (a value made in Python, or handed in from the
    enclosing graph through `values`) or as an output of earlier text or of `op(..., out=name)`. Outputs get the
    builder's prefix in the proto, so an If branch's names cannot meet its sibling's or the enclosing graph's;
    `b[name]` is the value a name stands for. No name is bound twice, no value defined twice. A subgraph (If
    branch, Scan body) is built by a Builder of its own, from the values handed to it, and attached with `op`.
    """

    def __init__(self, prefix: str = "", values: dict[str, str] | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self._prefix = prefix
        self._names: dict[str, str] = {}  # name in text -> value name in the proto
        self._defined: set[str] = set()  # the value names this graph's nodes define
        self._count = 0
        self.let(**(values or {}))

    def let(self, **values: str) -> None:
        for name, value in values.items():
            if name in self._names:
                raise ValueError(f"{name!r} is bound already")
            self._names[name] = value

    def __getitem__(self, name: str) -> str:
        return self._names[name]

    def values(self, *names: str) -> dict[str, str]:
        """The values of these names, to hand to the builder of a subgraph."""
        return {n: self._names[n] for n in names}

    def declare(self, *names: str) -> None:
        """Binds names for the graph's own inputs (a Scan body's)."""
        for name in names:
            self._define(name)

    def _define(self, name: str) -> str:
        self.let(**{name: self._prefix + name})
        return self._fresh(name, numbered=False)

    def _fresh(self, hint: str, numbered: bool = True) -> str:
        if numbered:
            self._count += 1
        value = f"{self._prefix}{hint}_{self._count}" if numbered else self._prefix + hint
        if value in self._defined:
            raise ValueError(f"{value!r} is defined already")
        self._defined.add(value)
        return value

    def add(self, text: str, **values: str) -> None:
        """Nodes in ONNX text, one a line (`#` starts a comment); `values` binds names first, as `let`."""
        self.let(**values)
        for node in parser.parse_graph(f"body () => () {{\n{text}\n}}").node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise ValueError(f"{node.op_type}: a subgraph is built by its own Builder and attached with op")
            for i, name in enumerate(node.input):
                if name:
                    if name not in self._names:
                        raise KeyError(f"{name!r} is not bound (in {node.op_type} -> {list(node.output)})")
                    node.input[i] = self._names[name]
            for i, name in enumerate(node.output):
                node.output[i] = self._define(name)
            self.nodes.append(node)

    def op(self, op_type: str, *inputs: str, out: str | tuple[str, ...] | None = None, outputs: int = 1,
           hint: str | None = None, **attrs):
        """One node over value names; its outputs are bound to `out` or, without it, fresh unbound names."""
        if out is not None:
            names = [self._define(n) for n in ((out,) if isinstance(out, str) else out)]
        else:
            names = [self._fresh(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, value, dtype=np.float32) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.asarray(value, dtype=dtype)), hint="c")

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def dim(self, value: str, axis: int, known: int | None) -> str:
        """Shape(value)[axis] as a 1-D int64 tensor of one element; a constant where the export knows it."""
        if known is not None:
            return self.ints(int(known))
        return self.op("Shape", value, start=axis, end=axis + 1)

    def graph(self, name: str, outputs: list[tuple[str, int | list[str]]],
              inputs: list[tuple[str, list[str]]] = ()) -> onnx.GraphProto:
        """The subgraph (If branch, Scan body) of the nodes, its inputs and outputs named as in the text and
        typed float32, of the given dimensions (or rank: then distinct symbolic dimensions)."""
        def info(n, dims):
            value = self._names[n]
            dims = [f"{name}_{value}_{i}" for i in range(dims)] if isinstance(dims, int) else dims
            return helper.make_tensor_value_info(value, TensorProto.FLOAT, dims)

        return helper.make_graph(self.nodes, name, [info(n, d) for n, d in inputs], [info(n, d) for n, d in outputs])


def _float32_inputs(b: Builder, spec, static: Static) -> None:
    """Binds each input's name to its value in float32: the input itself where the export saw float32, else a
    Cast of it. The text reads the inputs through these names; the raw inputs keep their own value names."""
    for t in spec.inputs:
        b.let(**{t.name: t.name if static.is_float32(t.name) else b.op("Cast", t.name, to=TensorProto.FLOAT)})


def _dims(b: Builder, static: Static, value: str, **axes: int) -> None:
    """Binds each name to Shape(value)[axis], a constant where the export knows it."""
    for name, axis in axes.items():
        b.let(**{name: b.dim(value, axis, static.dim(value, axis))})


def _output_like(spec, out) -> str | None:
    """The input whose type output `out` takes: a present_<state> that of its <state> input, a float32 intermediate
    (spec fp32) none (it stays float32), y that of the activations (the first input)."""
    if out.name.startswith("present_"):
        return out.name.removeprefix("present_")
    return None if out.fp32 else spec.inputs[0].name


def _function(spec, b: Builder, static: Static, opset: int) -> onnx.FunctionProto:
    """The FunctionProto of b's nodes. b binds each of spec's outputs by name to its float32 value; y is cast back
    to the type of the first input, a state to that of its state input, unless that is float32 already; float32
    intermediates (the chains' dt_out, dA_cumsum, chunk and entering states, delta_sum) stay as they are."""
    inputs = [t.name for t in spec.inputs]
    outputs = []
    for out in spec.outputs:
        value, like = b[out.name], _output_like(spec, out)
        if like is not None:
            if like not in inputs:
                raise ValueError(f"{spec.name}: no input {like!r} gives {out.name!r} its type")
            if not static.is_float32(like):
                value = b.op("CastLike", value, like, hint=out.name)
        outputs.append(value)
    attrs = list(spec.attributes) + list(PLUGIN_ATTRS)
    return helper.make_function(DOMAIN, spec.name, inputs, outputs, b.nodes,
                                [helper.make_opsetid("", opset)], attributes=attrs)


def _chunk_len(b: Builder, static: Static) -> None:
    """Binds Q, the chunk_size attribute as a 1-D int64 of one element: a constant where the export knows it."""
    chunk = static.attrs.get("chunk_size")
    if chunk is not None:
        b.let(Q=b.ints(int(chunk)))
    else:
        b.add("""
            Q_scalar = Constant <value_int: int = @chunk_size> ()
            Q_axis = Constant <value_ints = [0]> ()
            Q = Unsqueeze (Q_scalar, Q_axis)
        """)


# ---------------------------------------------------------------------------------------- CausalConv1d


def causal_conv1d_function(opset: int, static: Static | None = None) -> onnx.FunctionProto:
    static = static or Static()
    b = Builder()
    _float32_inputs(b, CAUSAL_CONV1D, static)
    channels, width = static.dim("weight", 0), static.dim("weight", 1)
    if channels is not None and width is not None and width > 1:
        _conv_depthwise(b, channels, width)
    else:
        _conv_windows(b, static)
    _conv_activation(b, static.attrs.get("activation"))
    return _function(CAUSAL_CONV1D, b, static, opset)


def _conv_depthwise(b: Builder, channels: int, width: int) -> None:
    """y_lin (B, L, C) and the new state: one depthwise Conv over [state, x] in the state's (B, C, K-1+L)."""
    b.add(f"""
        two = Constant <value_ints = [2]> ()
        x_t = Transpose <perm = [0, 2, 1]> (x)
        xs = Concat <axis = 2> (conv_state, x_t)                        # (B, C, K-1+L)
        xs_2d = Unsqueeze (xs, two)                                     # (B, C, 1, K-1+L)
        kernel_shape = Constant <value_ints = [{channels}, 1, 1, {width}]> ()
        kernel = Reshape (weight, kernel_shape)
        conv = Conv <group = {channels}, kernel_shape = [1, {width}]> (xs_2d, kernel, bias)
        conv_1d = Squeeze (conv, two)
        y_lin = Transpose <perm = [0, 2, 1]> (conv_1d)                  # (B, C, L) -> (B, L, C)
        tail_start = Constant <value_ints = [{1 - width}]> ()
        end = Constant <value_ints = [9223372036854775807]> ()         # INT64_MAX: to the last
        present_conv_state = Slice (xs, tail_start, end, two)           # the last K-1
    """)


def _conv_windows(b: Builder, static: Static) -> None:
    """y_lin (B, L, C) and the new state with the width unknown: windows[t, k] = [state, x][t + k] by a Gather."""
    _dims(b, static, "x", L=1)
    width = static.dim("weight", 1)
    if width is not None:
        b.let(k=b.ints(*range(width)))
    b.add("""
        zero = Constant <value = int64 {0}> ()
        one = Constant <value = int64 {1}> ()
        axis0 = Constant <value_ints = [0]> ()
        axis1 = Constant <value_ints = [1]> ()
        axis2 = Constant <value_ints = [2]> ()
        state_t = Transpose <perm = [0, 2, 1]> (conv_state)
        xs = Concat <axis = 1> (state_t, x)                             # (B, K-1+L, C)
        wt = Transpose <perm = [1, 0]> (weight)                         # (K, C)
        L_n = Squeeze (L, axis0)
        t = Range (zero, L_n, one)
    """)
    if width is None:
        b.add("""
            K = Shape <start = 1, end = 2> (weight)
            K_n = Squeeze (K, axis0)
            k = Range (zero, K_n, one)
        """)
    b.add("""
        t_col = Unsqueeze (t, axis1)
        k_row = Unsqueeze (k, axis0)
        idx = Add (t_col, k_row)                                        # (L, K)
        windows = Gather <axis = 1> (xs, idx)                           # (B, L, K, C)
        products = Mul (windows, wt)
        y_nobias = ReduceSum <keepdims = 0> (products, axis2)
        y_lin = Add (y_nobias, bias)
        end = Constant <value_ints = [9223372036854775807]> ()         # INT64_MAX: to the last
        tail = Slice (xs, L, end, axis1)                                # the last K-1
        present_conv_state = Transpose <perm = [0, 2, 1]> (tail)
    """)


def _conv_activation(b: Builder, activation: str | None) -> None:
    """y from y_lin: silu, nothing, or (activation unknown at export) silu where the attribute says "silu"."""
    if activation is None:
        b.add("""
            activation = Constant <value_string: string = @activation> ()
            silu_name = Constant <value_string = "silu"> ()
            is_silu = Equal (activation, silu_name)
            y_sigmoid = Sigmoid (y_lin)
            y_silu = Mul (y_lin, y_sigmoid)
            y = Where (is_silu, y_silu, y_lin)
        """)
    elif activation == "silu":
        b.add("""
            y_sigmoid = Sigmoid (y_lin)
            y = Mul (y_lin, y_sigmoid)
        """)
    else:
        b.let(y=b["y_lin"])


# --------------------------------------------------------------------------------------- SelectiveScan


def selective_scan_function(opset: int, static: Static | None = None) -> onnx.FunctionProto:
    static = static or Static()
    b = Builder()
    _float32_inputs(b, SELECTIVE_SCAN, static)
    # With the sizes known these are constants, and the shape arithmetic on them is folded.
    _dims(b, static, "u", L=1, dim=2)
    _dims(b, static, "B", G=2, N=3)
    b.add("Dg = Div (dim, G)")                                          # channel d reads group d // Dg
    _selective_dt(b, static)
    b.add("dtu = Mul (dt, u)")                                          # (B, L, dim)

    shared = b.values("dt", "dtu", "A", "B", "C", "ssm_state", "L", "dim", "G", "N", "Dg")
    if static.dim("B", 2) == 1:
        step = _selective_step_one_group(Builder("dec_", shared))
    else:
        step = _selective_step(Builder("dec_", shared))
    prefill = _selective_prefill(Builder("pre_", shared))
    b.add("""
        one = Constant <value_ints = [1]> ()
        is_step = Equal (L, one)                                        # shape (1,): what If takes, no Squeeze
    """)
    b.op("If", b[STEP_CONDITION], out=("y_scan", "present_ssm_state"), then_branch=step, else_branch=prefill)
    _selective_gate(b)
    return _function(SELECTIVE_SCAN, b, static, opset)


def _selective_dt(b: Builder, static: Static) -> None:
    """dt (B, L, dim): delta + delta_bias, softplus'd where delta_softplus says so (decided at build time where the
    export knows it)."""
    b.add("delta_biased = Add (delta, delta_bias)")
    softplus = static.attrs.get("delta_softplus")
    if softplus is None:
        _softplus(b)
        b.add("""
            softplus_on = Constant <value_int: int = @delta_softplus> ()
            zero_i = Constant <value = int64 {0}> ()
            softplus_off = Equal (softplus_on, zero_i)
            dt = Where (softplus_off, delta_biased, delta_soft)
        """)
    elif softplus:
        _softplus(b)
        b.let(dt=b["delta_soft"])
    else:
        b.let(dt=b["delta_biased"])


def _selective_gate(b: Builder) -> None:
    """y = (y_scan + D u) silu(z)."""
    b.add("""
        u_D = Mul (u, D)
        y_skip = Add (y_scan, u_D)
        z_sigmoid = Sigmoid (z)
        z_silu = Mul (z, z_sigmoid)
        y = Mul (y_skip, z_silu)
    """)


def _softplus(b: Builder) -> None:
    """delta_soft = the kernels' `delta_biased <= 20 ? log1p(exp(delta_biased)) : delta_biased`.

    ONNX's Softplus (within 2 ulps where exp(x) is small; measured on ONNX Runtime), not Log(Exp(x) + 1): where
    exp(x) = e is small (Mamba's dt starts at 1e-3, x near -7) 1 + e rounds away up to 6e-8 of e, thousands of
    ulps of dt. Softplus is a scalar loop in ONNX Runtime, slower at prefill sizes; the body is the fallback, and a
    decode step's node count stays as it was."""
    b.add("""
        sp_soft = Softplus (delta_biased)
        sp_above = Greater (delta_biased, sp_threshold)
        delta_soft = Where (sp_above, delta_biased, sp_soft)
    """, sp_threshold=b.const(SOFTPLUS_THRESHOLD))


def _selective_step_one_group(b: Builder) -> onnx.GraphProto:
    """Decode with one group, in the state's own (B, dim, N) layout (only free reshapes of vectors).

    The outer product dt u B is a K = 1 MatMul: ONNX Runtime's broadcasting Mul walks the innermost axis in spans
    of N, which is short, and is several times slower. Transposing to (B, N, dim) instead costs more in the
    transpose back than it saves."""
    b.add("""
        zero = Constant <value_ints = [0]> ()                           # a Reshape's 0 keeps the batch
        one = Constant <value_ints = [1]> ()
        col = Concat <axis = 0> (zero, dim, one)                        # (B, 1, dim) -> (B, dim, 1)
        dt_col = Reshape (dt, col)
        dA = Mul (A, dt_col)                                            # (dim, N) * (B, dim, 1)
        decay = Exp (dA)
        dtu_col = Reshape (dtu, col)
        row_shape = Concat <axis = 0> (zero, one, N)
        B_row = Reshape (B, row_shape)                                  # (B, 1, N)
        dBu = MatMul (dtu_col, B_row)                                   # (B, dim, N)
        h_decayed = Mul (decay, ssm_state)
        h = Add (h_decayed, dBu)
        col_shape = Concat <axis = 0> (zero, N, one)
        C_col = Reshape (C, col_shape)                                  # (B, N, 1)
        y_col = MatMul (h, C_col)                                       # (B, dim, 1)
        y_shape = Concat <axis = 0> (zero, one, dim)
        y = Reshape (y_col, y_shape)                                    # (B, 1, dim)
    """)
    return b.graph("selective_scan_step", [("y", 3), ("h", 3)])


def _selective_step(b: Builder) -> onnx.GraphProto:
    """Decode with G groups, in (B, 1, G, Dg, N), so that B and C broadcast over a group's channels."""
    b.add("""
        zero = Constant <value_ints = [0]> ()
        one = Constant <value_ints = [1]> ()
        three = Constant <value_ints = [3]> ()
        four = Constant <value_ints = [4]> ()
        A_shape = Concat <axis = 0> (G, Dg, N)
        A_g = Reshape (A, A_shape)                                      # (G, Dg, N)
        state_shape = Concat <axis = 0> (zero, one, G, Dg, N)
        h0 = Reshape (ssm_state, state_shape)                           # (B, 1, G, Dg, N)
        grouped = Concat <axis = 0> (zero, zero, G, Dg)
        dt_g = Reshape (dt, grouped)                                    # (B, 1, G, Dg)
        dt_5 = Unsqueeze (dt_g, four)
        dA = Mul (dt_5, A_g)
        decay = Exp (dA)                                                # (B, 1, G, Dg, N)
        dtu_g = Reshape (dtu, grouped)
        dtu_5 = Unsqueeze (dtu_g, four)
        B_5 = Unsqueeze (B, three)
        dBu = Mul (dtu_5, B_5)
        h_decayed = Mul (decay, h0)
        h_g = Add (h_decayed, dBu)
        C_5 = Unsqueeze (C, three)
        hC = Mul (h_g, C_5)
        y_g = ReduceSum <keepdims = 0> (hC, four)                       # (B, 1, G, Dg)
        y_shape = Constant <value_ints = [0, 0, -1]> ()
        y = Reshape (y_g, y_shape)                                      # (B, 1, dim)
        h_shape = Concat <axis = 0> (zero, dim, N)
        h = Reshape (h_g, h_shape)                                      # (B, dim, N)
    """)
    return b.graph("selective_scan_step", [("y", 3), ("h", 3)])


def _pad_to_chunks(b: Builder, chunk: str) -> None:
    """Binds pad (how many steps make L a multiple of `chunk`), nc (the number of chunks) and pads (Pad's pads
    for the end of the time axis); needs L, zero and the chunk length bound."""
    b.add(f"""
        L_mod = Mod (L, {chunk})
        short = Sub ({chunk}, L_mod)
        pad = Mod (short, {chunk})
        L_pad = Add (L, pad)
        nc = Div (L_pad, {chunk})
        pads = Concat <axis = 0> (zero, pad)                            # at the end of the time axis
    """)


def _selective_prefill(b: Builder) -> onnx.GraphProto:
    """Prefill: pad to whole chunks of SCAN_CHUNK tokens (dt = 0 there: decay 1, no input), Scan over chunks."""
    b.let(T=b.ints(SCAN_CHUNK))
    b.add("""
        zero = Constant <value_ints = [0]> ()
        one = Constant <value_ints = [1]> ()
        minus_one = Constant <value_ints = [-1]> ()
        A_shape = Concat <axis = 0> (G, Dg, N)
        A_g = Reshape (A, A_shape)                                      # (G, Dg, N)
        state_shape = Concat <axis = 0> (zero, one, G, Dg, N)
        h0 = Reshape (ssm_state, state_shape)                           # (B, 1, G, Dg, N)
    """)
    _pad_to_chunks(b, "T")
    b.add("""
        dt_pad = Pad (dt, pads, , one)
        dtu_pad = Pad (dtu, pads, , one)
        B_pad = Pad (B, pads, , one)
        C_pad = Pad (C, pads, , one)
        chunks_dg = Concat <axis = 0> (zero, nc, T, G, Dg)
        chunks_n = Concat <axis = 0> (zero, nc, T, G, N)
        dt_c = Reshape (dt_pad, chunks_dg)                              # (B, c, T, G, Dg)
        dtu_c = Reshape (dtu_pad, chunks_dg)
        B_c = Reshape (B_pad, chunks_n)                                 # (B, c, T, G, N)
        C_c = Reshape (C_pad, chunks_n)
    """)
    body = _selective_chunk(Builder("body_", b.values("A_g")))
    b.op("Scan", *(b[n] for n in ("h0", "dt_c", "dtu_c", "B_c", "C_c")), out=("h_last", "y_chunks"), body=body,
         num_scan_inputs=4, scan_input_axes=[1, 1, 1, 1], scan_output_axes=[1])
    b.add("""
        y_all_shape = Concat <axis = 0> (zero, minus_one, dim)
        y_all = Reshape (y_chunks, y_all_shape)                         # (B, c T, dim)
        y = Slice (y_all, zero, L, one)                                 # (B, L, dim)
        h_shape = Concat <axis = 0> (zero, dim, N)
        h = Reshape (h_last, h_shape)                                   # (B, dim, N)
    """)
    return b.graph("selective_scan_prefill", [("y", 3), ("h", 3)])


def _selective_chunk(b: Builder) -> onnx.GraphProto:
    """The Scan body: discretises its chunk in bulk, unrolls the recurrence with two ops per token, and reads all
    the chunk's outputs with one batched matmul against C."""
    b.declare("h_in", "dt_c", "dtu_c", "B_c", "C_c")
    b.add("""
        three = Constant <value_ints = [3]> ()
        four = Constant <value_ints = [4]> ()
        dt_5 = Unsqueeze (dt_c, four)
        dA = Mul (dt_5, A_g)
        decay = Exp (dA)                                                # (B, T, G, Dg, N)
        dtu_5 = Unsqueeze (dtu_c, four)
        B_5 = Unsqueeze (B_c, three)
        dBu = MatMul (dtu_5, B_5)                                       # (B, T, G, Dg, N), a K = 1 MatMul
    """)
    decay = b.op("Split", b["decay"], outputs=SCAN_CHUNK, axis=1, num_outputs=SCAN_CHUNK)
    dBu = b.op("Split", b["dBu"], outputs=SCAN_CHUNK, axis=1, num_outputs=SCAN_CHUNK)
    h, hs = b["h_in"], []
    for j in range(SCAN_CHUNK):  # h = decay_j h + dBu_j, (B, 1, G, Dg, N)
        h = b.op("Add", b.op("Mul", decay[j], h), dBu[j], out="h_out" if j == SCAN_CHUNK - 1 else None)
        hs.append(h)
    b.op("Concat", *hs, axis=1, out="states")
    b.add("""
        C_5 = Unsqueeze (C_c, four)
        y_5 = MatMul (states, C_5)                                      # (B, T, G, Dg, N) @ (B, T, G, N, 1)
        y_chunk = Squeeze (y_5, four)                                   # (B, T, G, Dg)
    """)
    state, chunk = ["b", "one", "g", "dg", "n"], ["b", "t", "g"]
    return b.graph("selective_scan_chunk", [("h_out", state), ("y_chunk", [*chunk, "dg"])],
                   [("h_in", state), ("dt_c", [*chunk, "dt_c_d"]), ("dtu_c", [*chunk, "dtu_c_d"]),
                    ("B_c", [*chunk, "B_c_d"]), ("C_c", [*chunk, "C_c_d"])])


# ------------------------------------------------------------------------------------------- SSDScan


def ssd_scan_function(opset: int, static: Static | None = None) -> onnx.FunctionProto:
    static = static or Static()
    b = Builder()
    _float32_inputs(b, SSD_SCAN, static)
    one_group = static.dim("B", 2) == 1
    _dims(b, static, "x", L=1, H=2, P=3)
    _dims(b, static, "B", N=3)
    _ssd_dt(b, static)
    b.add("""
        three = Constant <value_ints = [3]> ()
        dt_4 = Unsqueeze (dt_step, three)
        x_dt = Mul (x, dt_4)                                            # (B, L, H, P)
        a = Mul (dt_step, A)                                            # the log decay per step, (B, L, H)
    """)
    if one_group:  # B and C (B, L, 1, N) broadcast over the heads as they are
        b.let(B_h=b["B"], C_h=b["C"], Hb=b.ints(1))
    else:  # head h reads group h // (H / G): B and C repeated to (B, L, H, N)
        _dims(b, static, "x", batch=0)
        _dims(b, static, "B", G=2)
        b.add("""
            heads_per_group = Div (H, G)
            grouped = Concat <axis = 0> (batch, L, G, heads_per_group, N)
            by_head = Concat <axis = 0> (batch, L, H, N)
            B_5 = Unsqueeze (B, three)
            B_rep = Expand (B_5, grouped)
            B_h = Reshape (B_rep, by_head)
            C_5 = Unsqueeze (C, three)
            C_rep = Expand (C_5, grouped)
            C_h = Reshape (C_rep, by_head)
        """)
        b.let(Hb=b["H"])

    shared = b.values("x_dt", "a", "B_h", "C_h", "ssm_state", "L", "H", "P", "N", "Hb")
    step = _ssd_step(Builder("dec_", shared), one_group)
    pre = Builder("pre_", shared)
    if one_group:  # then batch is read only here, not on every call
        _dims(pre, static, "x", batch=0)
    else:
        pre.let(batch=b["batch"])
    prefill = _ssd_prefill(pre)
    b.add("""
        one = Constant <value_ints = [1]> ()
        is_step = Equal (L, one)                                        # shape (1,): what If takes, no Squeeze
    """)
    b.op("If", b[STEP_CONDITION], out=("y_scan", "present_ssm_state"), then_branch=step, else_branch=prefill)
    b.add("minus_one = Constant <value_ints = [-1]> ()")
    _ssd_d_skip(b)
    return _function(SSD_SCAN, b, static, opset)


def _ssd_dt(b: Builder, static: Static) -> None:
    """dt_step (B, L, H): dt + dt_bias, softplus'd where dt_softplus says so, clamped to [dt_min, dt_max] unless the
    limit is known to be none (each decided at build time where the export knows the attributes)."""
    b.add("dt_biased = Add (dt, dt_bias)")
    # dt is a value per head, a few dozen a token: ONNX's Softplus, one node (abs error <= 5e-7 vs float64; the
    # kernels' threshold changes the value by < 2e-9)
    softplus = static.attrs.get("dt_softplus")
    if softplus is None:
        b.add("""
            dt_soft_all = Softplus (dt_biased)
            softplus_on = Constant <value_int: int = @dt_softplus> ()
            zero_i = Constant <value = int64 {0}> ()
            softplus_off = Equal (softplus_on, zero_i)
            dt_soft = Where (softplus_off, dt_biased, dt_soft_all)
        """)
    elif softplus:
        b.add("dt_soft = Softplus (dt_biased)")
    else:
        b.let(dt_soft=b["dt_biased"])
    lo, hi = static.attrs.get("dt_min"), static.attrs.get("dt_max")
    if lo is None or hi is None or dt_limit_active((lo, hi)):  # the limit, unless known to be none
        b.add("""
            dt_max = Constant <value_float: float = @dt_max> ()
            dt_min = Constant <value_float: float = @dt_min> ()
            dt_below = Min (dt_soft, dt_max)
            dt_step = Max (dt_below, dt_min)
        """)
    else:
        b.let(dt_step=b["dt_soft"])


def _ssd_d_skip(b: Builder) -> None:
    """y = y_scan + D x, D (H,) or (H, P); needs H and minus_one bound."""
    b.add("""
        D_shape = Concat <axis = 0> (H, minus_one)
        D_r = Reshape (D, D_shape)                                      # D (H,) or (H, P) -> (H, 1) or (H, P)
        x_D = Mul (x, D_r)
        y = Add (y_scan, x_D)
    """)


def _ssd_step(b: Builder, one_group: bool) -> onnx.GraphProto:
    """Decode: h = exp(a) h + (dt x) B^T; y = h C. With L == 1, moving the time axis is a Reshape (no copy), not
    a Transpose."""
    b.add("""
        zero = Constant <value_ints = [0]> ()                           # a Reshape's 0 keeps the batch
        one = Constant <value_ints = [1]> ()
        decay_shape = Constant <value_ints = [0, -1, 1, 1]> ()
        decay_1 = Exp (a)
        decay = Reshape (decay_1, decay_shape)                          # (B, H, 1, 1)
        x_shape = Concat <axis = 0> (zero, H, P, one)
        x_col = Reshape (x_dt, x_shape)                                 # (B, H, P, 1)
        C_shape = Concat <axis = 0> (zero, Hb, N, one)
        C_col = Reshape (C_h, C_shape)                                  # (B, Hb, N, 1)
    """)
    if one_group:
        b.let(B_row=b["B_h"])  # (B, 1, 1, N) already
    else:
        b.add("""
            B_shape = Concat <axis = 0> (zero, Hb, one, N)
            B_row = Reshape (B_h, B_shape)                              # (B, H, 1, N)
        """)
    b.add("""
        h_decayed = Mul (decay, ssm_state)
        xB = Mul (x_col, B_row)
        h = Add (h_decayed, xB)                                         # (B, H, P, N)
        hC = MatMul (h, C_col)                                          # (B, H, P, 1)
        y_shape = Concat <axis = 0> (zero, one, H, P)
        y = Reshape (hC, y_shape)                                       # (B, 1, H, P)
    """)
    return b.graph("ssd_step", [("y", 4), ("h", 4)])


def _ssd_prefill(b: Builder) -> onnx.GraphProto:
    """Prefill, the chunked matmul form: chunks of cs = min(SSD_CHUNK, L), the last padded with dt = 0 (decay 1,
    no input). Within a chunk, a difference of cumulative sums is exact enough (the kernels do the same); along
    the chunks, a masked cumulative sum, as a difference loses precision over long sequences."""
    b.let(chunk=b.ints(SSD_CHUNK))
    b.add("""
        zero = Constant <value_ints = [0]> ()
        one = Constant <value_ints = [1]> ()
        minus_one = Constant <value_ints = [-1]> ()
        two = Constant <value_ints = [2]> ()
        three = Constant <value_ints = [3]> ()
        four = Constant <value_ints = [4]> ()
        end = Constant <value_ints = [9223372036854775807]> ()         # INT64_MAX: to the last
        neg_inf = Constant <value = float {-inf}> ()
        cs = Min (chunk, L)
    """)
    _pad_to_chunks(b, "cs")
    b.add("""
        x_pad = Pad (x_dt, pads, , one)
        B_pad = Pad (B_h, pads, , one)
        C_pad = Pad (C_h, pads, , one)
        a_pad = Pad (a, pads, , one)
        x_chunks = Concat <axis = 0> (batch, nc, cs, H, P)
        BC_chunks = Concat <axis = 0> (batch, nc, cs, Hb, N)
        a_chunks = Concat <axis = 0> (batch, nc, cs, H)
        x_r = Reshape (x_pad, x_chunks)
        B_r = Reshape (B_pad, BC_chunks)
        C_r = Reshape (C_pad, BC_chunks)
        a_r = Reshape (a_pad, a_chunks)
        x_c = Transpose <perm = [0, 1, 3, 2, 4]> (x_r)                  # (B, c, H, l, P)
        B_c = Transpose <perm = [0, 1, 3, 2, 4]> (B_r)                  # (B, c, Hb, l, N)
        C_c = Transpose <perm = [0, 1, 3, 2, 4]> (C_r)
        a_c = Transpose <perm = [0, 1, 3, 2]> (a_r)                     # (B, c, H, l)
        minus_one_i = Constant <value = int64 {-1}> ()
        acum = CumSum (a_c, minus_one_i)

        # 1. within chunks: Y_diag = (C B^T o exp(acum_l - acum_s) [s <= l]) X
        square = Concat <axis = 0> (cs, cs)
        ones = ConstantOfShape <value = float[1] {1.0}> (square)
        causal_f = Trilu <upper = 0> (ones)
        causal = Cast <to = 9> (causal_f)
        acum_l = Unsqueeze (acum, four)
        acum_s = Unsqueeze (acum, three)
        diff = Sub (acum_l, acum_s)                                     # (B, c, H, l, s)
        diff_causal = Where (causal, diff, neg_inf)
        L_mask = Exp (diff_causal)
        B_t = Transpose <perm = [0, 1, 2, 4, 3]> (B_c)                  # (B, c, Hb, N, l)
        scores = MatMul (C_c, B_t)
        weights = Mul (scores, L_mask)
        Y_diag = MatMul (weights, x_c)                                  # (B, c, H, l, P)

        # 2. each chunk's input to its end state: sum_l exp(acum_end - acum_l) B_l^T X_l
        last = Slice (acum, minus_one, end, three)                      # (B, c, H, 1)
        to_end_log = Sub (last, acum)
        to_end = Exp (to_end_log)
        to_end_4 = Unsqueeze (to_end, three)
        B_w = Mul (B_t, to_end_4)
        chunk_states = MatMul (B_w, x_c)                                # (B, c, H, N, P)

        # 3. between chunks: the states entering each chunk = exp(segsum(chunk decays)) @ [h0, chunk states]
        h0_t = Transpose <perm = [0, 1, 3, 2]> (ssm_state)              # (B, H, N, P)
        h0_c = Unsqueeze (h0_t, one)
        states = Concat <axis = 1> (h0_c, chunk_states)                 # (B, c+1, H, N, P)
        nc1 = Add (nc, one)
        NP = Mul (N, P)
        states_t = Transpose <perm = [0, 2, 1, 3, 4]> (states)
        flat = Concat <axis = 0> (batch, H, nc1, NP)
        states_flat = Reshape (states_t, flat)                          # (B, H, c+1, N*P)
        last_3 = Squeeze (last, three)
        chunk_log = Transpose <perm = [0, 2, 1]> (last_3)               # (B, H, c)
        lead = Constant <value_ints = [0, 0, 1, 0, 0, 0]> ()
        chunk_a = Pad (chunk_log, lead)                                 # (B, H, c+1), a leading 0 for h0
        #    segsum: [.., i, j] = sum(chunk_a[.., j+1 : i+1]) for j <= i, -inf above
        a_col = Unsqueeze (chunk_a, minus_one)
        a_shape = Shape (chunk_a)
        rep_shape = Concat <axis = 0> (a_shape, nc1)
        rep = Expand (a_col, rep_shape)                                 # [.., i, j] = chunk_a[.., i]
        square_c = Concat <axis = 0> (nc1, nc1)
        ones_c = ConstantOfShape <value = float[1] {1.0}> (square_c)
        strict_f = Trilu <upper = 0> (ones_c, minus_one_i)
        strict_lower = Cast <to = 9> (strict_f)
        lower_f = Trilu <upper = 0> (ones_c)
        lower = Cast <to = 9> (lower_f)
        zero_f = Constant <value = float {0.0}> ()
        rep_lower = Where (strict_lower, rep, zero_f)
        minus_two_i = Constant <value = int64 {-2}> ()
        rep_sum = CumSum (rep_lower, minus_two_i)
        segsum = Where (lower, rep_sum, neg_inf)
        decay_chunk = Exp (segsum)                                      # (B, H, c+1, c+1)
        new_flat = MatMul (decay_chunk, states_flat)                    # (B, H, c+1, N*P)
        new_shape = Concat <axis = 0> (batch, H, nc1, N, P)
        new_states = Reshape (new_flat, new_shape)
        entering = Slice (new_states, zero, nc, two)                    # (B, H, c, N, P)
        final = Slice (new_states, nc, nc1, two)                        # (B, H, 1, N, P)
        final_4 = Squeeze (final, two)
        h = Transpose <perm = [0, 1, 3, 2]> (final_4)                   # (B, H, P, N)

        # 4. the entering state's contribution: Y_off = exp(acum) (C @ state)
        entering_t = Transpose <perm = [0, 2, 1, 3, 4]> (entering)      # (B, c, H, N, P)
        C_state = MatMul (C_c, entering_t)                              # (B, c, H, l, P)
        acum_exp = Exp (acum)
        acum_exp_5 = Unsqueeze (acum_exp, four)
        Y_off = Mul (C_state, acum_exp_5)
        Y_sum = Add (Y_diag, Y_off)
        Y_t = Transpose <perm = [0, 1, 3, 2, 4]> (Y_sum)                # (B, c, l, H, P)
        L_all = Mul (nc, cs)
        Y_shape = Concat <axis = 0> (batch, L_all, H, P)
        Y = Reshape (Y_t, Y_shape)
        y = Slice (Y, zero, L, one)                                     # (B, L, H, P)
    """)
    return b.graph("ssd_prefill", [("y", 4), ("h", 4)])


# ------------------------------------------------------------------------------------------- the chains
#
# Each chain node pads its time axis to whole chunks of Q = chunk_size (dt = 0 past the end: decay 1, no input) and
# reshapes it to (B, c, Q, ...). Everything is float32; the intermediates leave as float32 (_function).


def ssd_chunk_state_function(opset: int, static: Static | None = None) -> onnx.FunctionProto:
    """dt_out, dA_cumsum (B, H, c, Q) and chunk_states (B, c, H, P, N), S_c = sum_l exp(a_last - a_l) dt_l x_l B_l^T:
    one batched matmul per (chunk, group), the heads of a group side by side in its rows, so B is never repeated
    per head."""
    static = static or Static()
    b = Builder()
    _float32_inputs(b, SSD_CHUNK_STATE, static)
    _dims(b, static, "x", L=1, H=2, P=3)
    _dims(b, static, "B", G=2, N=3)
    _ssd_dt(b, static)                                                  # dt_step (B, L, H)
    _chunk_len(b, static)
    b.add("""
        zero = Constant <value_ints = [0]> ()                           # a Reshape's 0 keeps that axis
        one = Constant <value_ints = [1]> ()
        minus_one = Constant <value_ints = [-1]> ()
        three = Constant <value_ints = [3]> ()
        four = Constant <value_ints = [4]> ()
        end = Constant <value_ints = [9223372036854775807]> ()         # INT64_MAX: to the last
    """)
    _pad_to_chunks(b, "Q")
    b.add("""
        dt_pad = Pad (dt_step, pads, , one)                             # (B, T, H), 0 past the end
        dt_shape = Concat <axis = 0> (zero, nc, Q, H)
        dt_r = Reshape (dt_pad, dt_shape)                               # (B, c, Q, H)
        dt_out = Transpose <perm = [0, 3, 1, 2]> (dt_r)                 # (B, H, c, Q)
        A_shape = Constant <value_ints = [-1, 1, 1]> ()
        A_3 = Reshape (A, A_shape)                                      # (H, 1, 1)
        dA = Mul (dt_out, A_3)
        three_i = Constant <value = int64 {3}> ()
        dA_cumsum = CumSum (dA, three_i)                                # within each chunk
        last = Slice (dA_cumsum, minus_one, end, three)                 # (B, H, c, 1)
        to_end_log = Sub (last, dA_cumsum)
        to_end = Exp (to_end_log)
        w = Mul (to_end, dt_out)                                        # exp(a_last - a_l) dt_l, (B, H, c, Q)
        w_t = Transpose <perm = [0, 2, 3, 1]> (w)                       # (B, c, Q, H)
        w_5 = Unsqueeze (w_t, four)
        x_pad = Pad (x, pads, , one)
        x_shape = Concat <axis = 0> (zero, nc, Q, H, P)
        x_r = Reshape (x_pad, x_shape)                                  # (B, c, Q, H, P)
        x_w = Mul (x_r, w_5)
        by_group = Concat <axis = 0> (zero, zero, zero, G, minus_one)
        x_g = Reshape (x_w, by_group)                                   # (B, c, Q, G, Hg P): head h in group h // Hg
        x_gt = Transpose <perm = [0, 1, 3, 4, 2]> (x_g)                 # (B, c, G, Hg P, Q)
        B_pad = Pad (B, pads, , one)
        B_shape = Concat <axis = 0> (zero, nc, Q, G, N)
        B_r = Reshape (B_pad, B_shape)
        B_c = Transpose <perm = [0, 1, 3, 2, 4]> (B_r)                  # (B, c, G, Q, N)
        S_g = MatMul (x_gt, B_c)                                        # (B, c, G, Hg P, N)
        S_shape = Concat <axis = 0> (zero, zero, H, P, N)
        chunk_states = Reshape (S_g, S_shape)                           # (B, c, H, P, N)
    """)
    return _function(SSD_CHUNK_STATE, b, static, opset)


# The state passing is a Scan over the chunks, not the masked-decay matmul of _ssd_prefill: it is state-sized work
# per chunk (read S_c, write H_c, which the outputs need anyway: c H P N multiply-adds), where the matmul does
# (c+1)^2 H P N of them plus the (c+1, c+1) segsum and the transposes into and out of its (c+1, P N) layout, and the
# SSD chain's chunks are short (Q >= 16: c reaches L / 16); the matmul form only pays for a small state and few
# chunks, where both are cheap. Mamba-1's chunk decay exp(A delta_sum) differs per state entry, so a matmul cannot
# carry it at all: its state passing is the same Scan.


def ssd_state_passing_function(opset: int, static: Static | None = None) -> onnx.FunctionProto:
    """entering_states (B, c, H, P, N) and present_ssm_state: H_0 = ssm_state, H_{c+1} = exp(a_last(c)) H_c + S_c."""
    static = static or Static()
    b = Builder()
    _float32_inputs(b, SSD_STATE_PASSING, static)
    b.add("""
        minus_one = Constant <value_ints = [-1]> ()
        three = Constant <value_ints = [3]> ()
        four = Constant <value_ints = [4]> ()
        end = Constant <value_ints = [9223372036854775807]> ()         # INT64_MAX: to the last
        last = Slice (dA_cumsum, minus_one, end, three)                 # (B, H, c, 1): each chunk's log decay
        last_t = Transpose <perm = [0, 2, 1, 3]> (last)                 # (B, c, H, 1)
        log_decay = Unsqueeze (last_t, four)                            # (B, c, H, 1, 1)
        decay = Exp (log_decay)
    """)
    _pass_states(b, 4)
    return _function(SSD_STATE_PASSING, b, static, opset)


def _pass_states(b: Builder, rank: int) -> None:
    """present_ssm_state and entering_states by a Scan over axis 1 of decay and chunk_states, from ssm_state."""
    body = Builder("body_")
    body.declare("h_in", "decay_c", "S_c")
    body.add("""
        h_decayed = Mul (decay_c, h_in)
        h_out = Add (h_decayed, S_c)
        h_entering = Identity (h_in)
    """)
    graph = body.graph("state_passing", [("h_out", rank), ("h_entering", rank)],
                       [("h_in", rank), ("decay_c", rank), ("S_c", rank)])
    b.op("Scan", b["ssm_state"], b["decay"], b["chunk_states"], out=("present_ssm_state", "entering_states"),
         body=graph, num_scan_inputs=2, scan_input_axes=[1, 1], scan_output_axes=[1])


def ssd_chunk_scan_function(opset: int, static: Static | None = None) -> onnx.FunctionProto:
    """y from each chunk's entering state: y_l = exp(a_l) C_l H_c + sum_{s<=l} exp(a_l - a_s) dt_s (C_l . B_s) x_s
    + D x_l, the chunked matmul form of _ssd_prefill with the chunk's dt and cumsum given. C B^T is one (Q, Q)
    matmul per group, not per head: the heads of a group share it."""
    static = static or Static()
    b = Builder()
    _float32_inputs(b, SSD_CHUNK_SCAN, static)
    _dims(b, static, "x", L=1, H=2, P=3)
    _dims(b, static, "B", G=2, N=3)
    _chunk_len(b, static)
    b.add("""
        zero = Constant <value_ints = [0]> ()                           # a Reshape's 0 keeps that axis
        one = Constant <value_ints = [1]> ()
        minus_one = Constant <value_ints = [-1]> ()
        three = Constant <value_ints = [3]> ()
        four = Constant <value_ints = [4]> ()
        five = Constant <value_ints = [5]> ()
        neg_inf = Constant <value = float {-inf}> ()
        Hg = Div (H, G)                                                 # head h reads group h // Hg
    """)
    _pad_to_chunks(b, "Q")
    b.add("""
        x_pad = Pad (x, pads, , one)
        x_shape = Concat <axis = 0> (zero, nc, Q, G, Hg, P)
        x_r = Reshape (x_pad, x_shape)
        x_c = Transpose <perm = [0, 1, 3, 4, 2, 5]> (x_r)               # (B, c, G, Hg, Q, P)
        BC_shape = Concat <axis = 0> (zero, nc, Q, G, N)
        B_pad = Pad (B, pads, , one)
        B_r = Reshape (B_pad, BC_shape)
        B_t = Transpose <perm = [0, 1, 3, 4, 2]> (B_r)                  # (B, c, G, N, Q)
        C_pad = Pad (C, pads, , one)
        C_r = Reshape (C_pad, BC_shape)
        C_c = Transpose <perm = [0, 1, 3, 2, 4]> (C_r)                  # (B, c, G, Q, N)

        # 1. within chunks: y_l = sum_{s<=l} exp(a_l - a_s) dt_s (C_l . B_s) x_s
        side_shape = Concat <axis = 0> (zero, zero, G, Hg, Q)
        a_t = Transpose <perm = [0, 2, 1, 3]> (dA_cumsum)               # (B, c, H, Q)
        a_g = Reshape (a_t, side_shape)                                 # (B, c, G, Hg, Q)
        dt_t = Transpose <perm = [0, 2, 1, 3]> (dt_out)
        dt_g = Reshape (dt_t, side_shape)
        square = Concat <axis = 0> (Q, Q)
        ones = ConstantOfShape <value = float[1] {1.0}> (square)
        causal_f = Trilu <upper = 0> (ones)
        causal = Cast <to = 9> (causal_f)
        a_l = Unsqueeze (a_g, five)
        a_s = Unsqueeze (a_g, four)
        diff = Sub (a_l, a_s)                                           # (B, c, G, Hg, l, s)
        diff_causal = Where (causal, diff, neg_inf)
        decay = Exp (diff_causal)
        dt_s = Unsqueeze (dt_g, four)
        decay_dt = Mul (decay, dt_s)
        scores = MatMul (C_c, B_t)                                      # (B, c, G, l, s)
        scores_6 = Unsqueeze (scores, three)
        weights = Mul (decay_dt, scores_6)
        Y_diag = MatMul (weights, x_c)                                  # (B, c, G, Hg, Q, P)

        # 2. the entering state, decayed to each position: exp(a_l) C_l H_c
        H_shape = Concat <axis = 0> (zero, zero, G, Hg, P, N)
        H_g = Reshape (entering_states, H_shape)
        H_t = Transpose <perm = [0, 1, 2, 3, 5, 4]> (H_g)               # (B, c, G, Hg, N, P)
        C_6 = Unsqueeze (C_c, three)                                    # (B, c, G, 1, Q, N)
        C_H = MatMul (C_6, H_t)                                         # (B, c, G, Hg, Q, P)
        a_exp = Exp (a_g)
        a_exp_6 = Unsqueeze (a_exp, five)
        Y_off = Mul (C_H, a_exp_6)
        Y_sum = Add (Y_diag, Y_off)
        Y_t = Transpose <perm = [0, 1, 4, 2, 3, 5]> (Y_sum)             # (B, c, Q, G, Hg, P)
        Y_shape = Concat <axis = 0> (zero, minus_one, H, P)
        Y = Reshape (Y_t, Y_shape)                                      # (B, c Q, H, P)
        y_scan = Slice (Y, zero, L, one)                                # (B, L, H, P)
    """)
    _ssd_d_skip(b)
    return _function(SSD_CHUNK_SCAN, b, static, opset)


def selective_chunk_state_function(opset: int, static: Static | None = None) -> onnx.FunctionProto:
    """chunk_states (B, c, dim, N), each chunk's final state from a zero state, and delta_sum (B, c, dim)."""
    static = static or Static()
    b = Builder()
    _float32_inputs(b, SELECTIVE_CHUNK_STATE, static)
    steps = _selective_blocks(b, static)
    _dims(b, static, "u", batch=0)
    b.add("""
        dt_q_shape = Concat <axis = 0> (zero, nc, Q, dim)
        dt_q = Reshape (dt_pad, dt_q_shape)                             # (B, c, Q, dim)
        two = Constant <value_ints = [2]> ()
        delta_sum = ReduceSum <keepdims = 0> (dt_q, two)                # (B, c, dim)
        h0_shape = Concat <axis = 0> (batch, nc, one, G, Dg, N)
        h0 = ConstantOfShape <value = float[1] {0.0}> (h0_shape)
    """)
    body = _selective_steps(Builder("body_", b.values("A_g")), steps, read=False)
    b.op("Scan", *(b[n] for n in ("h0", "dt_b", "dtu_b", "B_b")), out="h_last", body=body,
         num_scan_inputs=3, scan_input_axes=[2, 2, 2])
    b.add("""
        S_shape = Concat <axis = 0> (zero, zero, dim, N)
        chunk_states = Reshape (h_last, S_shape)                        # (B, c, dim, N)
    """)
    return _function(SELECTIVE_CHUNK_STATE, b, static, opset)


def selective_state_passing_function(opset: int, static: Static | None = None) -> onnx.FunctionProto:
    """entering_states (B, c, dim, N) and present_ssm_state: H_0 = ssm_state, H_{c+1} = exp(A delta_sum_c) H_c + S_c."""
    static = static or Static()
    b = Builder()
    _float32_inputs(b, SELECTIVE_STATE_PASSING, static)
    b.add("""
        minus_one = Constant <value_ints = [-1]> ()
        delta_4 = Unsqueeze (delta_sum, minus_one)                      # (B, c, dim, 1)
        log_decay = Mul (delta_4, A)                                    # (B, c, dim, N)
        decay = Exp (log_decay)
    """)
    _pass_states(b, 3)
    return _function(SELECTIVE_STATE_PASSING, b, static, opset)


def selective_chunk_scan_function(opset: int, static: Static | None = None) -> onnx.FunctionProto:
    """y = (h C + D u) silu(z), h running from each chunk's entering state."""
    static = static or Static()
    b = Builder()
    _float32_inputs(b, SELECTIVE_CHUNK_SCAN, static)
    steps = _selective_blocks(b, static)
    b.add("""
        C_pad = Pad (C, pads, , one)
        C_b = Reshape (C_pad, blocks_n)
        h0_shape = Concat <axis = 0> (zero, zero, one, G, Dg, N)
        h0 = Reshape (entering_states, h0_shape)                        # (B, c, 1, G, Dg, N)
    """)
    body = _selective_steps(Builder("body_", b.values("A_g")), steps, read=True)
    b.op("Scan", *(b[n] for n in ("h0", "dt_b", "dtu_b", "B_b", "C_b")), out=("h_last", "y_blocks"), body=body,
         num_scan_inputs=4, scan_input_axes=[2, 2, 2, 2], scan_output_axes=[2])
    b.add("""
        y_shape = Concat <axis = 0> (zero, minus_one, dim)
        y_all = Reshape (y_blocks, y_shape)                             # (B, c Q, dim)
        y_scan = Slice (y_all, zero, L, one)                            # (B, L, dim)
    """)
    _selective_gate(b)
    return _function(SELECTIVE_CHUNK_SCAN, b, static, opset)


def _selective_blocks(b: Builder, static: Static) -> int:
    """The Mamba-1 chain's time axis for a Scan over the positions within a chunk, all chunks at once: dt, dt u and
    B padded to whole chunks and cut into (B, c, Q / U, U, G, ...), U tokens per iteration (dt_b, dtu_b, B_b; and
    dt_pad, A_g, the dims, pads, nc). U, the steps one iteration unrolls, is SCAN_CHUNK where Q is known (at most Q,
    dividing it), else 1: then the Scan runs Q iterations. Returns U.

    This carries a (B, c, dim, N) state through Q / U iterations and never writes (L, dim, N) at once; the chunks'
    closed form (sum_l exp(A (a_end - a_l)) dt_l u_l B_l) would."""
    _dims(b, static, "u", L=1, dim=2)
    _dims(b, static, "B", G=2, N=3)
    b.add("Dg = Div (dim, G)")                                          # channel d reads group d // Dg
    _selective_dt(b, static)
    b.add("dtu = Mul (dt, u)")                                          # (B, L, dim)
    _chunk_len(b, static)
    chunk = static.attrs.get("chunk_size")
    steps = math.gcd(int(chunk), SCAN_CHUNK) if chunk is not None else 1
    b.let(U=b.ints(steps), K=b.ints(int(chunk) // steps) if chunk is not None else b["Q"])
    b.add("""
        zero = Constant <value_ints = [0]> ()                           # a Reshape's 0 keeps that axis
        one = Constant <value_ints = [1]> ()
        minus_one = Constant <value_ints = [-1]> ()
        A_shape = Concat <axis = 0> (G, Dg, N)
        A_g = Reshape (A, A_shape)                                      # (G, Dg, N)
    """)
    _pad_to_chunks(b, "Q")
    b.add("""
        dt_pad = Pad (dt, pads, , one)                                  # (B, T, dim), 0 past the end
        dtu_pad = Pad (dtu, pads, , one)
        B_pad = Pad (B, pads, , one)
        blocks_dg = Concat <axis = 0> (zero, nc, K, U, G, Dg)
        blocks_n = Concat <axis = 0> (zero, nc, K, U, G, N)
        dt_b = Reshape (dt_pad, blocks_dg)                              # (B, c, Q / U, U, G, Dg)
        dtu_b = Reshape (dtu_pad, blocks_dg)
        B_b = Reshape (B_pad, blocks_n)                                 # (B, c, Q / U, U, G, N)
    """)
    return steps


def _selective_steps(b: Builder, steps: int, read: bool) -> onnx.GraphProto:
    """The Scan body: `steps` positions of every chunk, (B, c, U, G, ...), discretised in bulk, the recurrence
    unrolled with two ops per position; with `read`, also their outputs h C by one batched matmul (as
    _selective_chunk)."""
    names = ["h_in", "dt_s", "dtu_s", "B_s"] + (["C_s"] if read else [])
    b.declare(*names)
    b.add("""
        four = Constant <value_ints = [4]> ()
        five = Constant <value_ints = [5]> ()
        dt_6 = Unsqueeze (dt_s, five)
        dA = Mul (dt_6, A_g)
        decay = Exp (dA)                                                # (B, c, U, G, Dg, N)
        dtu_6 = Unsqueeze (dtu_s, five)
        B_6 = Unsqueeze (B_s, four)
        dBu = MatMul (dtu_6, B_6)                                       # (B, c, U, G, Dg, N), a K = 1 MatMul
    """)
    if steps == 1:
        b.add("""
            h_decayed = Mul (decay, h_in)
            h_out = Add (h_decayed, dBu)                                # (B, c, 1, G, Dg, N)
        """)
        b.let(states=b["h_out"])
    else:
        decay = b.op("Split", b["decay"], outputs=steps, axis=2, num_outputs=steps)
        dBu = b.op("Split", b["dBu"], outputs=steps, axis=2, num_outputs=steps)
        h, hs = b["h_in"], []
        for j in range(steps):  # h = decay_j h + dBu_j, (B, c, 1, G, Dg, N)
            h = b.op("Add", b.op("Mul", decay[j], h), dBu[j], out="h_out" if j == steps - 1 else None)
            hs.append(h)
        b.op("Concat", *hs, axis=2, out="states")
    outputs = [("h_out", 6)]
    if read:
        b.add("""
            C_6 = Unsqueeze (C_s, five)                                 # (B, c, U, G, N, 1)
            y_6 = MatMul (states, C_6)                                  # (B, c, U, G, Dg, 1)
            y_s = Squeeze (y_6, five)                                   # (B, c, U, G, Dg)
        """)
        outputs.append(("y_s", 5))
    return b.graph("selective_chunk_steps", outputs, [("h_in", 6)] + [(n, 5) for n in names[1:]])


# The body builders by op name.
BODIES = {
    CAUSAL_CONV1D.name: causal_conv1d_function,
    SELECTIVE_SCAN.name: selective_scan_function,
    SSD_SCAN.name: ssd_scan_function,
    SSD_CHUNK_STATE.name: ssd_chunk_state_function,
    SSD_STATE_PASSING.name: ssd_state_passing_function,
    SSD_CHUNK_SCAN.name: ssd_chunk_scan_function,
    SELECTIVE_CHUNK_STATE.name: selective_chunk_state_function,
    SELECTIVE_STATE_PASSING.name: selective_state_passing_function,
    SELECTIVE_CHUNK_SCAN.name: selective_chunk_scan_function,
}


def single_branch(model: onnx.ModelProto, branch: str) -> int:
    """Inlines, in every ssmrt function body of `model`, the If on seqlen == 1 as one of its branches: "step" (the
    one-token recurrence: right for seqlen 1 only) or "prefill" (right for any length). Returns how many If
    nodes it inlined. For builders that check both branches of an If against every shape of a profile
    (TensorRT does, and refuses or crashes on a branch whose shapes only hold for the other case): an engine
    for one token takes the step, an engine for prompts the prefill."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
    count = 0
    for f in model.functions:
        if f.domain != DOMAIN:
            continue
        nodes = []
        for node in f.node:
            if node.op_type != "If" or list(node.input) != [STEP_CONDITION]:
                nodes.append(node)
                continue
            graph = next(a.g for a in node.attribute if a.name == BRANCHES[branch])
            nodes.extend(graph.node)
            nodes.extend(helper.make_node("Identity", [out.name], [name])
                         for out, name in zip(graph.output, node.output, strict=True))
            count += 1
        del f.node[:]
        f.node.extend(nodes)
    return count


def all_functions(opset: int, static: dict[str, Static] | None = None,
                  ops: Sequence[str] | None = None) -> list[onnx.FunctionProto]:
    """The bodies of `ops` (op names, in that order; by default the three one-node ops). static: op name -> what
    the export saw at every node of it (shapes, dtypes, attribute values), which turns the bodies' shape arithmetic
    into constants and drops casts and tests it decides."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old for the fallback bodies; use {MIN_OPSET} or newer")
    static = static or {}
    ops = tuple(OPS) if ops is None else tuple(ops)
    unknown = [op for op in ops if op not in BODIES]
    if unknown:
        raise KeyError(f"no fallback body for {unknown}; known: {sorted(BODIES)}")
    return [BODIES[op](opset, static.get(op)) for op in ops]

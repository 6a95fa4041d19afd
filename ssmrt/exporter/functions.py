"""Portable fallback bodies of the ssmrt::* ops, as ONNX FunctionProtos in standard ops.

ONNX Runtime inlines them, so an exported model runs anywhere with no plugin; TensorRT maps the same nodes
to plugins instead. The math is the ops/ references', in float32 whatever the activation dtype:

- CausalConv1d: with the channels and width known, a depthwise Conv in the channels-first layout the state
  already has (ONNX Runtime runs it as its blocked depthwise kernel: 2.1x faster than windows at L = 512, and
  at decode 10 nodes a layer instead of 16 for unrolled multiply-adds: a node costs ~1.85 us there, the caches
  cold from the weight reads; benchmarks/cpu_ort_nodes.py). Otherwise one Gather builds the K-wide windows,
  then a multiply and a sum.
- SelectiveScan: decode (L == 1) is one recurrence step. Prefill is a Scan over chunks of SCAN_CHUNK tokens
  whose body computes the chunk's discretisation and unrolls its recurrence, so the (chunk, dim, dstate)
  working set stays in cache and nothing of size (L, dim, dstate) is ever written.
- SSDScan: decode is one step; prefill is the chunked matmul form (Mamba-2 paper, listing 1) with a chunk of
  min(SSD_CHUNK, L), the inter-chunk recurrence done as one masked-decay matmul: no Loop or Scan at all.

The exporter always supplies every input (zeros / ones for what a model lacks), so the bodies need no
presence tests. Attributes are read through Constant nodes with ref_attr_name, unless the export saw the same
value at every node of the op (Static): then the body is specialised to it, as it is to the static shapes and
dtypes (no Cast of what is float32 already, no test of a flag whose value is known).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ops.spec import CAUSAL_CONV1D, DOMAIN, SELECTIVE_SCAN, SOFTPLUS_THRESHOLD, SSD_SCAN, dt_limit_active

# Tokens per Scan iteration in the Mamba-1 prefill body: long enough that the Scan runs L/16 iterations,
# short enough that a chunk's (16, dim, dstate) decay and input tensors stay in cache.
SCAN_CHUNK = 16
# The SSD result does not depend on the chunk length; the fallback picks its own. The (l, l) intra-chunk
# tensors grow with it, the (chunks, chunks) inter-chunk decay with its inverse: 64 balances them on CPU.
SSD_CHUNK = 64
PLUGIN_ATTRS = ("plugin_namespace", "plugin_version")
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


class Builder:
    """Collects nodes with fresh value names; `op` returns the output name(s).

    static: what the export knows of the function's inputs and attributes. `dim` then gives a constant that
    ONNX Runtime folds instead of a Shape node evaluated on every call; `f32` / `cast_like` skip casts that
    would not change the type; `known` gives an attribute's value.
    """

    def __init__(self, prefix: str = "", static: Static | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self._prefix = prefix
        self._count = 0
        self.static = static or Static()

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self._prefix}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, hint: str | None = None, **attrs):
        outs = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype=np.float32) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.asarray(value, dtype=dtype)), hint="c")

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def attr(self, name: str, kind: int) -> str:
        """A Constant holding the value of the function's attribute `name`."""
        field = {onnx.AttributeProto.INT: "value_int", onnx.AttributeProto.FLOAT: "value_float",
                 onnx.AttributeProto.STRING: "value_string"}[kind]
        node = helper.make_node("Constant", [], [self.fresh(name)])
        a = onnx.AttributeProto(name=field, ref_attr_name=name, type=kind)
        node.attribute.append(a)
        self.nodes.append(node)
        return node.output[0]

    # small helpers ---------------------------------------------------------------------------------
    def known(self, name: str):
        """The attribute's value when the export saw one value at every node, else None."""
        return self.static.attrs.get(name)

    def f32(self, x: str) -> str:
        if self.static.dtypes.get(x) == "float32":
            return x
        return self.op("Cast", x, to=TensorProto.FLOAT)

    def cast_like(self, y: str, like: str, hint: str) -> str:
        """y (float32) in the type of `like`."""
        if self.static.dtypes.get(like) == "float32":
            return y
        return self.op("CastLike", y, like, hint=hint)

    def dim(self, x: str, axis: int) -> str:
        """Shape(x)[axis] as a 1-D int64 tensor of one element (a constant when statically known)."""
        known = self.static.shapes.get(x)
        if known is not None and known[axis] is not None:
            return self.ints(int(known[axis]))
        return self.op("Shape", x, start=axis, end=axis + 1)

    def unsqueeze(self, x: str, *axes: int) -> str:
        return self.op("Unsqueeze", x, self.ints(*axes))

    def squeeze(self, x: str, *axes: int) -> str:
        return self.op("Squeeze", x, self.ints(*axes))

    def silu(self, x: str) -> str:
        return self.op("Mul", x, self.op("Sigmoid", x))

    def softplus(self, x: str, small: bool = False) -> str:
        """The kernels' `x <= 20 ? log1p(exp(x)) : x`.

        small (a dt per head, a few dozen values a token): ONNX's Softplus, one node (abs error <= 5e-7 vs
        float64; the kernels' threshold changes the value by < 2e-9). Otherwise Where(x > 20, x, Log(Exp(x) + 1)):
        ONNX Runtime's Softplus is a scalar loop, 3x slower at prefill sizes (4.0 vs 1.4 ms on 512 x 1536).
        Absolute error at most 6e-8 below 20 (1 + exp(x) rounds where exp(x) is tiny); above 20 the value is x
        itself, as in the kernels."""
        if small:
            return self.op("Softplus", x)
        soft = self.op("Log", self.op("Add", self.op("Exp", x), self.const(1.0)))
        return self.op("Where", self.op("Greater", x, self.const(SOFTPLUS_THRESHOLD)), x, soft)

    def flag(self, name: str, if_set, x_else: str) -> str:
        """if_set() where the int attribute `name` is non-zero, else x_else: decided here when the value is
        known, else a Where at run time."""
        value = self.known(name)
        if value is not None:
            return if_set() if value else x_else
        flag = self.attr(name, onnx.AttributeProto.INT)
        return self.op("Where", self.op("Not", self.op("Equal", flag, self.const(0, np.int64))), if_set(), x_else)

    def concat(self, *dims: str) -> str:
        return self.op("Concat", *dims, axis=0)

    def graph(self, name: str, outputs: list[tuple[str, int]]) -> onnx.GraphProto:
        """A subgraph (If branch / Scan body) of the collected nodes; outputs typed float32 of given rank."""
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"{name}_{n}_{i}" for i in range(rank)])
                for n, rank in outputs]
        return helper.make_graph(self.nodes, name, [], outs)


def _function(spec, nodes, inputs, outputs, opset: int) -> onnx.FunctionProto:
    attrs = list(spec.attributes) + list(PLUGIN_ATTRS)
    return helper.make_function(
        DOMAIN, spec.name, inputs, outputs, nodes, [helper.make_opsetid("", opset)], attributes=attrs
    )


# ---------------------------------------------------------------------------------------- CausalConv1d


def causal_conv1d_function(opset: int, static: Static | None = None) -> onnx.FunctionProto:
    b = Builder(static=static)
    x, w, bias, state = (s.name for s in CAUSAL_CONV1D.inputs)
    channels, width = b.static.shapes.get(w, (None, None))
    if channels is not None and width is not None and width > 1:
        xs = b.op("Concat", b.f32(state), b.op("Transpose", b.f32(x), perm=[0, 2, 1]), axis=2)  # (B, C, K-1+L)
        kernel = b.op("Reshape", b.f32(w), b.ints(channels, 1, 1, width))
        y = b.op("Conv", b.unsqueeze(xs, 2), kernel, b.f32(bias), group=channels, kernel_shape=[1, width])
        y = b.op("Transpose", b.squeeze(y, 2), perm=[0, 2, 1])  # (B, C, 1, L) -> (B, L, C)
        tail = b.op("Slice", xs, b.ints(1 - width), b.ints(np.iinfo(np.int64).max), b.ints(2))  # the last K-1
        return _conv_outputs(b, y, tail, x, state, opset)
    xs = b.op("Concat", b.op("Transpose", b.f32(state), perm=[0, 2, 1]), b.f32(x), axis=1)  # (B, K-1+L, C)
    L = b.dim(x, 1)
    wt = b.op("Transpose", b.f32(w), perm=[1, 0])  # (K, C)
    zero, one = b.const(0, np.int64), b.const(1, np.int64)
    t = b.op("Range", zero, b.squeeze(L, 0), one)
    if width is not None:
        k = b.ints(*range(width))
    else:
        k = b.op("Range", zero, b.squeeze(b.dim(w, 1), 0), one)
    idx = b.op("Add", b.unsqueeze(t, 1), b.unsqueeze(k, 0))  # (L, K): windows[t, k] = xs[t + k]
    windows = b.op("Gather", xs, idx, axis=1)  # (B, L, K, C)
    y = b.op("ReduceSum", b.op("Mul", windows, wt), b.ints(2), keepdims=0)
    y = b.op("Add", y, b.f32(bias))
    tail = b.op("Transpose", b.op("Slice", xs, L, b.ints(np.iinfo(np.int64).max), b.ints(1)), perm=[0, 2, 1])
    return _conv_outputs(b, y, tail, x, state, opset)


def _conv_outputs(b: Builder, y: str, tail: str, x: str, state: str, opset: int) -> onnx.FunctionProto:
    """y (B, L, C) float32 before the activation, tail (B, C, K-1) the new state: the activation, the casts back."""
    activation = b.known("activation")
    if activation is None:
        is_silu = b.op("Equal", b.attr("activation", onnx.AttributeProto.STRING), b.const("silu", object))
        y = b.op("Where", is_silu, b.silu(y), y)
    elif activation == "silu":
        y = b.silu(y)
    y_out = b.cast_like(y, x, hint="y")
    s_out = b.cast_like(tail, state, hint="present_conv_state")
    return _function(CAUSAL_CONV1D, b.nodes, [s.name for s in CAUSAL_CONV1D.inputs], [y_out, s_out], opset)


# --------------------------------------------------------------------------------------- SelectiveScan


def selective_scan_function(opset: int, static: Static | None = None) -> onnx.FunctionProto:
    b = Builder(static=static)
    u, delta, A, Bm, Cm, D, z, delta_bias, state = (s.name for s in SELECTIVE_SCAN.inputs)
    # Channel d reads group d // (dim // ngroups): the branches work in (.., ngroups, dim/ngroups, ..) so B and
    # C broadcast, and return y (B, L, dim) and the state (B, dim, N). With one group known, the decode branch
    # works in the state's own (B, dim, N) layout instead (only free reshapes of vectors).
    L, dim = b.dim(u, 1), b.dim(u, 2)
    G, N = b.dim(Bm, 2), b.dim(Bm, 3)  # with the sizes known these are constants, their arithmetic folded
    Dg = b.op("Div", dim, G)
    zero, one = b.ints(0), b.ints(1)  # a Reshape's 0 keeps that dimension: batch is never read by a Shape
    one_group = b.static.shapes.get(Bm, (None,) * 4)[2] == 1
    dt = b.op("Add", b.f32(delta), b.f32(delta_bias))
    dt = b.flag("delta_softplus", lambda: b.softplus(dt), dt)  # (B, L, dim)
    uf = b.f32(u)
    dtu = b.op("Mul", dt, uf)
    Af = b.f32(A)  # (dim, N)
    Bf, Cf = b.f32(Bm), b.f32(Cm)  # (B, L, G, N)
    sf = b.f32(state)  # (B, dim, N)

    def grouped(sb: Builder, t):
        """(B, L, dim) -> (B, L, G, Dg)"""
        return sb.op("Reshape", t, b.concat(zero, zero, G, Dg))

    def grouped_A_state(sb: Builder):
        """A (G, Dg, N) and the state (B, 1, G, Dg, N), the time axis kept, size 1."""
        return (sb.op("Reshape", Af, b.concat(G, Dg, N)),
                sb.op("Reshape", sf, b.concat(zero, one, G, Dg, N)))

    # decode: L == 1
    tb = Builder("dec_")
    if one_group:
        # ONNX Runtime's broadcasting Mul walks the innermost axis in spans: with spans of N = 16 the outer product
        # dt u B takes 3.1x a K = 1 MatMul's time (benchmarks/cpu_ort_nodes.py), so it is that MatMul here;
        # transposing to (B, N, dim) instead cost more in the transpose back than it saved.
        col = b.concat(zero, dim, one)  # (B, 1, dim) -> (B, dim, 1): the step works in the state's (B, dim, N)
        dA = tb.op("Exp", tb.op("Mul", Af, tb.op("Reshape", dt, col)))  # (dim, N) * (B, dim, 1)
        dBu = tb.op("MatMul", tb.op("Reshape", dtu, col), tb.op("Reshape", Bf, b.concat(zero, one, N)))
        h1 = tb.op("Add", tb.op("Mul", dA, sf), dBu)  # (B, dim, N)
        y1 = tb.op("MatMul", h1, tb.op("Reshape", Cf, b.concat(zero, N, one)))  # (B, dim, 1)
        y1 = tb.op("Reshape", y1, b.concat(zero, one, dim))
    else:
        Ag, h0 = grouped_A_state(tb)
        dA = tb.op("Exp", tb.op("Mul", tb.unsqueeze(grouped(tb, dt), 4), Ag))  # (B, 1, G, Dg, N)
        dBu = tb.op("Mul", tb.unsqueeze(grouped(tb, dtu), 4), tb.unsqueeze(Bf, 3))
        h1 = tb.op("Add", tb.op("Mul", dA, h0), dBu)
        y1 = tb.op("ReduceSum", tb.op("Mul", h1, tb.unsqueeze(Cf, 3)), tb.ints(4), keepdims=0)  # (B, 1, G, Dg)
        y1 = tb.op("Reshape", y1, b.ints(0, 0, -1))
        h1 = tb.op("Reshape", h1, b.concat(zero, dim, N))
    then_graph = tb.graph("selective_scan_step", [(y1, 3), (h1, 3)])

    # prefill: pad to whole chunks (dt = 0 there: decay 1, no input), Scan over chunks
    eb = Builder("pre_")
    Ag, h0 = grouped_A_state(eb)
    T = eb.ints(SCAN_CHUNK)
    pad = eb.op("Mod", eb.op("Sub", T, eb.op("Mod", L, T)), T)
    nc = eb.op("Div", eb.op("Add", L, pad), T)

    def chunked(x, inner):
        padded = eb.op("Pad", x, eb.op("Concat", eb.ints(0, 0), eb.ints(0), pad, axis=0), "", eb.ints(0, 1))
        return eb.op("Reshape", padded, eb.concat(zero, nc, T, *inner))

    scan_in = [chunked(grouped(eb, dt), (G, Dg)), chunked(grouped(eb, dtu), (G, Dg)), chunked(Bf, (G, N)),
               chunked(Cf, (G, N))]

    # The body discretises its chunk in bulk, unrolls the recurrence with two ops per token, and reads all
    # the chunk's outputs with one batched matmul against C.
    body = Builder("body_")
    h_in = "h_in"
    ins = ["dt_c", "dtu_c", "B_c", "C_c"]  # (B, T, G, *)
    dA = body.op("Exp", body.op("Mul", body.unsqueeze(ins[0], 4), Ag))
    dBu = body.op("MatMul", body.unsqueeze(ins[1], 4), body.unsqueeze(ins[2], 3))  # (B, T, G, Dg, N), as above
    dA_t = body.op("Split", dA, axis=1, num_outputs=SCAN_CHUNK, outputs=SCAN_CHUNK)
    dBu_t = body.op("Split", dBu, axis=1, num_outputs=SCAN_CHUNK, outputs=SCAN_CHUNK)
    h, hs = h_in, []
    for j in range(SCAN_CHUNK):
        h = body.op("Add", body.op("Mul", dA_t[j], h), dBu_t[j])  # (B, 1, G, Dg, N)
        hs.append(h)
    h_out = body.op("Identity", h, hint="h_out")
    states = body.op("Concat", *hs, axis=1)  # (B, T, G, Dg, N)
    y_chunk = body.op("Squeeze", body.op("MatMul", states, body.unsqueeze("C_c", 4)), body.ints(4),
                      hint="y_chunk")  # (B, T, G, Dg, N) @ (B, T, G, N, 1) -> (B, T, G, Dg)
    body_graph = helper.make_graph(
        body.nodes,
        "selective_scan_chunk",
        [helper.make_tensor_value_info(h_in, TensorProto.FLOAT, ["b", "one", "g", "dg", "n"])]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "t", "g", f"{n}_d"]) for n in ins],
        [helper.make_tensor_value_info(h_out, TensorProto.FLOAT, ["b", "one", "g", "dg", "n"]),
         helper.make_tensor_value_info(y_chunk, TensorProto.FLOAT, ["b", "t", "g", "dg"])],
    )
    h_fin, y_chunks = eb.op("Scan", h0, *scan_in, outputs=2, body=body_graph, num_scan_inputs=4,
                            scan_input_axes=[1, 1, 1, 1], scan_output_axes=[1])
    y_all = eb.op("Reshape", y_chunks, eb.concat(zero, eb.ints(-1), dim))
    y_pre = eb.op("Slice", y_all, eb.ints(0), L, eb.ints(1), hint="y")  # (B, L, dim)
    h_pre = eb.op("Reshape", h_fin, eb.concat(zero, dim, N), hint="h")
    else_graph = eb.graph("selective_scan_prefill", [(y_pre, 3), (h_pre, 3)])

    is_step = b.op("Equal", L, b.ints(1))  # one element, shape (1,): what If needs, no Squeeze
    y, h = b.op("If", is_step, outputs=2, then_branch=then_graph, else_branch=else_graph)
    y = b.op("Add", y, b.op("Mul", uf, b.f32(D)))
    y = b.op("Mul", y, b.silu(b.f32(z)))
    y_out = b.cast_like(y, u, hint="y")
    s_out = b.cast_like(h, state, hint="present_ssm_state")
    return _function(SELECTIVE_SCAN, b.nodes, [s.name for s in SELECTIVE_SCAN.inputs], [y_out, s_out], opset)


# ------------------------------------------------------------------------------------------- SSDScan


def _segsum(b: Builder, a: str, T: str) -> str:
    """(..., T) -> (..., T, T): out[..., i, j] = sum(a[..., j+1 : i+1]) for j <= i, -inf above.

    A masked cumsum, not a difference of cumsums, which loses precision over long sequences.
    """
    rep = b.op("Expand", b.unsqueeze(a, -1), b.op("Concat", b.op("Shape", a), T, axis=0))  # [.., i, j] = a_i
    ones = b.op("ConstantOfShape", b.concat(T, T), value=numpy_helper.from_array(np.ones(1, np.float32)))
    strict_lower = b.op("Cast", b.op("Trilu", ones, b.ints(-1), upper=0), to=TensorProto.BOOL)
    lower = b.op("Cast", b.op("Trilu", ones, upper=0), to=TensorProto.BOOL)
    cs = b.op("CumSum", b.op("Where", strict_lower, rep, b.const(0.0)), b.const(-2, np.int64))
    return b.op("Where", lower, cs, b.const(-np.inf))


def ssd_scan_function(opset: int, static: Static | None = None) -> onnx.FunctionProto:
    b = Builder(static=static)
    x, dt_in, A, Bm, Cm, D, dt_bias, state = (s.name for s in SSD_SCAN.inputs)
    batch, L, H, P = (b.dim(x, i) for i in range(4))
    G, N = b.dim(Bm, 2), b.dim(Bm, 3)
    dt = b.op("Add", b.f32(dt_in), b.f32(dt_bias))
    dt = b.flag("dt_softplus", lambda: b.softplus(dt, small=True), dt)
    lo, hi = b.known("dt_min"), b.known("dt_max")
    if lo is None or hi is None or dt_limit_active((lo, hi)):  # the limit, unless known to be none
        dt = b.op("Max", b.op("Min", dt, b.attr("dt_max", onnx.AttributeProto.FLOAT)),
                  b.attr("dt_min", onnx.AttributeProto.FLOAT))  # (B, L, H)
    xf = b.f32(x)
    Af = b.f32(A)
    h0 = b.f32(state)  # (B, H, P, N)

    def heads(t):
        """(B, L, G, N) -> (B, L, H, N): head h reads group h // (H // G)."""
        t = b.unsqueeze(b.f32(t), 3)
        t = b.op("Expand", t, b.concat(batch, L, G, b.op("Div", H, G), N))
        return b.op("Reshape", t, b.concat(batch, L, H, N))

    one_group = b.static.shapes.get(Bm, (None,) * 4)[2] == 1
    if one_group:  # B and C broadcast over the heads as they are
        Bh, Ch, Hb = b.f32(Bm), b.f32(Cm), b.ints(1)
    else:
        Bh, Ch, Hb = heads(Bm), heads(Cm), H  # (B, L, Hb, N)
    X = b.op("Mul", xf, b.unsqueeze(dt, 3))  # x * dt
    a = b.op("Mul", dt, Af)  # log decay per step, (B, L, H)

    # decode: L == 1 -> h = exp(a) h + (dt x) B^T ; y = h C. With L == 1, moving the time axis is a Reshape
    # (no copy), not a Transpose.
    tb = Builder("dec_")
    keep, one = b.ints(0), b.ints(1)
    decay = tb.op("Reshape", tb.op("Exp", a), tb.ints(0, -1, 1, 1))  # (B, H, 1, 1)
    X1 = tb.op("Reshape", X, b.concat(keep, H, P, one))  # (B, H, P, 1)
    # (B, Hb, 1, N); with one group Bh is (B, 1, 1, N) already
    B1 = Bh if one_group else tb.op("Reshape", Bh, b.concat(keep, Hb, one, N))
    C1 = tb.op("Reshape", Ch, b.concat(keep, Hb, N, one))  # (B, Hb, N, 1)
    h1 = tb.op("Add", tb.op("Mul", decay, h0), tb.op("Mul", X1, B1))
    y1 = tb.op("Reshape", tb.op("MatMul", h1, C1), b.concat(keep, one, H, P))  # (B, H, P, 1) -> (B, 1, H, P)
    then_graph = tb.graph("ssd_step", [(y1, 4), (h1, 4)])

    # prefill: chunks of cs = min(SSD_CHUNK, L), the last padded with dt = 0 (decay 1, no input)
    eb = Builder("pre_")
    if one_group:  # then batch is used only here: read it in the branch, not on every call
        batch = eb.dim(x, 0)
    cs = eb.op("Min", eb.ints(SSD_CHUNK), L)
    pad = eb.op("Mod", eb.op("Sub", cs, eb.op("Mod", L, cs)), cs)
    nc = eb.op("Div", eb.op("Add", L, pad), cs)

    def chunked(t, inner):
        padded = eb.op("Pad", t, eb.op("Concat", eb.ints(0, 0), eb.ints(0), pad, axis=0), "", eb.ints(0, 1))
        return eb.op("Reshape", padded, eb.concat(batch, nc, cs, *inner))

    Xc = eb.op("Transpose", chunked(X, (H, P)), perm=[0, 1, 3, 2, 4])  # (B, c, H, l, P)
    Bc = eb.op("Transpose", chunked(Bh, (Hb, N)), perm=[0, 1, 3, 2, 4])  # (B, c, Hb, l, N)
    Cc = eb.op("Transpose", chunked(Ch, (Hb, N)), perm=[0, 1, 3, 2, 4])
    ac = eb.op("Transpose", chunked(a, (H,)), perm=[0, 1, 3, 2])  # (B, c, H, l)
    acum = eb.op("CumSum", ac, eb.const(-1, np.int64))

    # 1. within chunks: Y_diag = (C B^T o exp(acum_l - acum_s) [s <= l]) X; a difference of cumsums is exact
    #    enough over one short chunk (the kernels do the same), the masked segsum is kept for the long axis
    ones = eb.op("ConstantOfShape", eb.concat(cs, cs), value=numpy_helper.from_array(np.ones(1, np.float32)))
    causal = eb.op("Cast", eb.op("Trilu", ones, upper=0), to=TensorProto.BOOL)
    diff = eb.op("Sub", eb.unsqueeze(acum, 4), eb.unsqueeze(acum, 3))  # (B, c, H, l, s)
    Lmask = eb.op("Exp", eb.op("Where", causal, diff, eb.const(-np.inf)))
    scores = eb.op("MatMul", Cc, eb.op("Transpose", Bc, perm=[0, 1, 2, 4, 3]))
    Y_diag = eb.op("MatMul", eb.op("Mul", scores, Lmask), Xc)  # (B, c, H, l, P)

    # 2. each chunk's input to its end state: sum_l exp(acum_end - acum_l) B_l^T X_l -> (B, c, H, N, P)
    last = eb.op("Slice", acum, eb.ints(-1), eb.ints(np.iinfo(np.int64).max), eb.ints(3))  # (B, c, H, 1)
    to_end = eb.op("Exp", eb.op("Sub", last, acum))
    Bw = eb.op("Mul", eb.op("Transpose", Bc, perm=[0, 1, 2, 4, 3]), eb.unsqueeze(to_end, 3))
    chunk_states = eb.op("MatMul", Bw, Xc)  # (B, c, H, N, P)

    # 3. between chunks: states entering each chunk = exp(segsum(chunk decays)) @ [h0, chunk states]
    h0_np = eb.unsqueeze(eb.op("Transpose", h0, perm=[0, 1, 3, 2]), 1)  # (B, 1, H, N, P)
    states = eb.op("Concat", h0_np, chunk_states, axis=1)  # (B, c+1, H, N, P)
    nc1 = eb.op("Add", nc, eb.ints(1))
    states = eb.op("Reshape", eb.op("Transpose", states, perm=[0, 2, 1, 3, 4]),
                   eb.concat(batch, H, nc1, eb.op("Mul", N, P)))  # (B, H, c+1, N*P)
    chunk_a = eb.op("Pad", eb.op("Transpose", eb.squeeze(last, 3), perm=[0, 2, 1]),
                    eb.ints(0, 0, 1, 0, 0, 0))  # (B, H, c+1), a leading 0 for h0
    decay_chunk = eb.op("Exp", _segsum(eb, chunk_a, nc1))  # (B, H, c+1, c+1)
    new_states = eb.op("MatMul", decay_chunk, states)  # (B, H, c+1, N*P)
    new_states = eb.op("Reshape", new_states, eb.concat(batch, H, nc1, N, P))
    entering = eb.op("Slice", new_states, eb.ints(0), nc, eb.ints(2))  # (B, H, c, N, P)
    final = eb.op("Slice", new_states, nc, nc1, eb.ints(2))  # (B, H, 1, N, P)
    h_pre = eb.op("Transpose", eb.squeeze(final, 2), perm=[0, 1, 3, 2], hint="h")  # (B, H, P, N)

    # 4. the entering state's contribution: Y_off = exp(acum) * (C @ state)
    Y_off = eb.op("MatMul", Cc, eb.op("Transpose", entering, perm=[0, 2, 1, 3, 4]))  # (B, c, H, l, P)
    Y_off = eb.op("Mul", Y_off, eb.unsqueeze(eb.op("Exp", acum), 4))
    Y = eb.op("Transpose", eb.op("Add", Y_diag, Y_off), perm=[0, 1, 3, 2, 4])  # (B, c, l, H, P)
    Y = eb.op("Reshape", Y, eb.concat(batch, eb.op("Mul", nc, cs), H, P))
    y_pre = eb.op("Slice", Y, eb.ints(0), L, eb.ints(1), hint="y")
    else_graph = eb.graph("ssd_prefill", [(y_pre, 4), (h_pre, 4)])

    is_step = b.op("Equal", L, b.ints(1))  # one element, shape (1,): what If needs, no Squeeze
    y, h = b.op("If", is_step, outputs=2, then_branch=then_graph, else_branch=else_graph)
    # D skip: D is (H,) or (H, P); reshaped to (H, 1) or (H, P) it broadcasts over (B, L, H, P)
    Dr = b.op("Reshape", b.f32(D), b.concat(H, b.ints(-1)))
    y = b.op("Add", y, b.op("Mul", xf, Dr))
    y_out = b.cast_like(y, x, hint="y")
    s_out = b.cast_like(h, state, hint="present_ssm_state")
    return _function(SSD_SCAN, b.nodes, [s.name for s in SSD_SCAN.inputs], [y_out, s_out], opset)


def all_functions(opset: int, static: dict[str, Static] | None = None) -> list[onnx.FunctionProto]:
    """The three bodies. static: op name -> what the export saw at every node of it (shapes, dtypes, attribute
    values), which turns the bodies' shape arithmetic into constants and drops casts and tests it decides."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old for the fallback bodies; use {MIN_OPSET} or newer")
    static = static or {}
    return [
        causal_conv1d_function(opset, static.get(CAUSAL_CONV1D.name)),
        selective_scan_function(opset, static.get(SELECTIVE_SCAN.name)),
        ssd_scan_function(opset, static.get(SSD_SCAN.name)),
    ]

"""The ONNX Runtime runner's graph fusions: nodes of an exported graph computed as one native ssmrt.cpu node.

- SSDMixer: between a Mamba-2 layer's two projections an export holds ~20 nodes (two Splits, the conv, four
  Reshapes, the scan, the gate and the gated norm's Pow / ReduceMean / Add / Sqrt / Div / Mul, and in a float16
  graph the Casts around them), ~13 a layer still after ONNX Runtime's own fusions.
- AddRMSNorm: a block's residual add and RMSNorm, which in a float16 graph (its residual stream float32) come
  with four Casts: six nodes a layer after ONNX Runtime's fusions, two in a float32 graph.
- SelectiveMixer: in a float16 Mamba-1 graph's decode step (the branch route_decode_matmuls makes), the split of
  in_proj's output, the conv, x_proj and dt_proj on HalfMatMul, x_proj's split, two Reshapes and the scan: eight
  nodes a layer. Only there: its two products are HalfMatMul's kernel, written for a step's few rows.
- SSDBlock: in a float16 Mamba-2 graph's decode step, the four nodes a layer left after the others: in_proj on
  HalfMatMul, the SSDMixer, out_proj on HalfMatMul and the AddRMSNorm after them (the next block's, or the final
  norm). Only there, for the same reason.
Each of those nodes costs a decode step a few microseconds of dispatch for a few thousand values of work.

The rewrites match the graph the exporter writes, node by node, and leave anything they do not recognise as it
was: a mixer with an MLP part, a gated norm over several groups or with the norm before the gate, a float16
residual stream, a value read outside the matched nodes. Only the runner's copy of the graph is rewritten,
never the artifact.
"""

from __future__ import annotations

FUSION_DOMAIN = "ssmrt.cpu"
# the If in which route_decode_matmuls puts a float16 (or 8-bit, float32-activation) graph's decode step and its prompt
ROUTED = "ssmrt_cpu.routed"

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto's element types


class _Graph:
    """Producers, readers and constant values of one onnx GraphProto's names (readers include the nodes of
    subgraphs that read a name from the enclosing scope)."""

    def __init__(self, graph, outer=None):
        """outer: for a branch's graph, the main graph, whose initializers and Constant nodes it may read."""
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.readers: dict[str, list] = {}
        for n in graph.node:
            for name in set(_names_read(n)):
                self.readers.setdefault(name, []).append(n)
        self.outputs = {o.name for o in graph.output}
        self.inits = {t.name: t for t in graph.initializer}
        self.outer_producer = {}
        if outer is not None:
            self.inits = {**{t.name: t for t in outer.initializer}, **self.inits}
            self.outer_producer = {o: n for n in outer.node for o in n.output if o}
        self._np = numpy_helper

    def const(self, name):
        """The value of an initializer or Constant node's output, as a numpy array, or None."""
        if name in self.inits:
            return self._np.to_array(self.inits[name])
        node = self.producer.get(name) or self.outer_producer.get(name)
        if node is not None and node.op_type == "Constant" and node.domain == "":
            for a in node.attribute:
                if a.name == "value":
                    return self._np.to_array(a.t)
        return None

    def only_reader(self, name, op_type, domain=""):
        """The one node reading `name` if it is an op_type node and `name` is not a graph output, else None."""
        readers = self.readers.get(name, [])
        if len(readers) != 1 or name in self.outputs:
            return None
        node = readers[0]
        return node if node.op_type == op_type and node.domain == domain else None

    def made_by(self, name, op_type, domain=""):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and node.domain == domain else None


def _names_read(node):
    """Every name a node reads, its subgraphs' outer-scope reads included."""
    yield from (i for i in node.input if i)
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in
                                                                                           g.initializer}
            for n in g.node:
                yield from (x for x in _names_read(n) if x not in inner)
            yield from (o.name for o in g.output if o.name not in inner)  # a branch may return an outer value


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _scalar(g: _Graph, name) -> float | None:
    v = g.const(name)
    return float(v.reshape(())) if v is not None and v.size == 1 else None


def _cast_to(g: _Graph, name, to):
    """The Cast(to) that is the only reader of `name`, or None."""
    node = g.only_reader(name, "Cast")
    return node if node is not None and _attr(node, "to") == to else None


def _weight(g: _Graph, name, dim: int | None) -> bool:
    """Whether `name` is a norm's weight: a constant of shape (dim,) (any length where dim is None), or a
    Cast to float32 of one (a float16 model's weight, widened)."""
    cast = g.made_by(name, "Cast")
    if cast is not None and _attr(cast, "to") == FLOAT:
        name = cast.input[0]
    w = g.const(name)
    return w is not None and w.ndim == 1 and (dim is None or w.shape == (dim,))


def _norm_chain(g: _Graph, h, dim: int | None) -> dict | None:
    """The RMSNorm h / sqrt(mean(h^2, -1) + eps) * w the exporter writes (Pow, ReduceMean, Add, Sqrt, Div, Mul)
    over h's last dimension: {"nodes": the six, "eps", "weight": w's name}, or None. h must be read by the Pow and
    the Div; the caller decides what else may read it."""
    readers = g.readers.get(h, [])
    pow_ = next((n for n in readers if n.op_type == "Pow" and n.domain == "" and n.input[0] == h), None)
    div = next((n for n in readers if n.op_type == "Div" and n.domain == "" and n.input[0] == h), None)
    if pow_ is None or div is None or _scalar(g, pow_.input[1]) != 2.0:
        return None
    mean = g.only_reader(pow_.output[0], "ReduceMean")
    if mean is None or _attr(mean, "keepdims", 1) != 1:
        return None
    axes = g.const(mean.input[1]) if len(mean.input) > 1 else _attr(mean, "axes")
    if axes is None or [int(a) for a in axes] != [-1]:  # the exporter's form; another axis would need the rank
        return None
    add = g.only_reader(mean.output[0], "Add")
    eps_name = next((i for i in add.input if i != mean.output[0]), None) if add is not None else None
    eps = _scalar(g, eps_name) if eps_name else None
    sqrt = g.only_reader(add.output[0], "Sqrt") if add is not None else None
    if eps is None or sqrt is None or g.only_reader(sqrt.output[0], "Div") is not div or \
            div.input[1] != sqrt.output[0]:
        return None
    mul_w = g.only_reader(div.output[0], "Mul")
    weight = next((i for i in mul_w.input if i != div.output[0]), None) if mul_w is not None else None
    if weight is None or not _weight(g, weight, dim):
        return None
    return {"nodes": [pow_, mean, add, sqrt, div, mul_w], "eps": eps, "weight": weight}


def _match(g: _Graph, ssd) -> dict | None:
    """The nodes of the mixer around one SSDScan, and what SSDMixer needs of them; None if anything differs from
    the exporter's pattern (see the module docstring)."""
    if len(ssd.input) != 8 or len(ssd.output) != 2:
        return None
    x_view, b_view, c_view = (g.made_by(ssd.input[i], "Reshape") for i in (0, 3, 4))
    if not (x_view and b_view and c_view):
        return None
    split2 = g.made_by(x_view.input[0], "Split")
    if split2 is None or list(split2.output) != [x_view.input[0], b_view.input[0], c_view.input[0]]:
        return None
    conv = g.made_by(split2.input[0], "CausalConv1d", "ssmrt")
    if conv is None or _attr(conv, "activation", b"silu") != b"silu" or conv.output[0] != split2.input[0]:
        return None
    split1 = g.made_by(conv.input[0], "Split")
    if split1 is None or len(split1.output) != 5 or split1.output[3] != conv.input[0] or \
            split1.output[4] != ssd.input[1]:
        return None
    sizes1 = g.const(split1.input[1]) if len(split1.input) > 1 else None
    sizes2 = g.const(split2.input[1]) if len(split2.input) > 1 else None
    if sizes1 is None or sizes2 is None or len(sizes1) != 5 or len(sizes2) != 3:
        return None
    _, d_mlp, d_ssm, conv_dim, _ = (int(v) for v in sizes1)
    if sizes1[0] != 0 or d_mlp != 0 or any(split1.output[i] in g.readers or split1.output[i] in g.outputs
                                           for i in (0, 1)):
        return None  # an MLP part (d_mlp > 0) goes through nodes SSDMixer does not compute
    if [int(v) for v in sizes2] != [d_ssm, (conv_dim - d_ssm) // 2, (conv_dim - d_ssm) // 2]:
        return None
    if _attr(split1, "axis", 0) not in (-1, 2) or _attr(split2, "axis", 0) not in (-1, 2):
        return None
    # the single-use intermediates between them
    singles = [split1.output[3], conv.output[0], *split2.output, x_view.output[0], b_view.output[0],
               c_view.output[0], ssd.input[1]]
    if any(len(g.readers.get(n, [])) != 1 or n in g.outputs for n in singles):
        return None
    # y: Reshape to (batch, seqlen, d_ssm), in a float16 graph a Cast to float32
    y_view = g.only_reader(ssd.output[0], "Reshape")
    if y_view is None:
        return None
    cast_y = _cast_to(g, y_view.output[0], FLOAT)
    half = cast_y is not None
    y = cast_y.output[0] if half else y_view.output[0]
    z = split1.output[2]
    cast_z = None
    if half:
        cast_z = _cast_to(g, z, FLOAT)
        if cast_z is None:
            return None
        z = cast_z.output[0]
    # the gate: z * sigmoid(z), then y * gate
    z_readers = g.readers.get(z, [])
    if len(z_readers) != 2 or z in g.outputs:
        return None
    sig = next((n for n in z_readers if n.op_type == "Sigmoid" and n.domain == ""), None)
    gate = next((n for n in z_readers if n.op_type == "Mul" and n.domain == ""), None)
    if sig is None or gate is None or sorted(gate.input) != sorted([z, sig.output[0]]) or \
            g.readers.get(sig.output[0]) != [gate] or sig.output[0] in g.outputs:
        return None
    gated = g.only_reader(y, "Mul")
    if gated is None or sorted(gated.input) != sorted([y, gate.output[0]]) or \
            g.readers.get(gate.output[0]) != [gated] or gate.output[0] in g.outputs:
        return None
    # the norm: h / sqrt(mean(h^2, -1) + eps) * w, over all d_ssm channels
    h = gated.output[0]
    if len(g.readers.get(h, [])) != 2 or h in g.outputs:
        return None
    norm = _norm_chain(g, h, d_ssm)
    if norm is None:
        return None
    mul_w = norm["nodes"][-1]
    out_node = _cast_to(g, mul_w.output[0], FLOAT16) if half else mul_w
    if out_node is None:
        return None
    if len(conv.input) != 4:
        return None
    removed = [split1, conv, split2, x_view, b_view, c_view, ssd, y_view, sig, gate, gated, *norm["nodes"]] + \
        ([cast_y, cast_z, out_node] if half else [])
    # zxbcdt, conv_weight, conv_bias, conv_state, A, D, dt_bias, ssm_state, norm_weight
    inputs = [split1.input[0], *conv.input[1:4], ssd.input[2], *ssd.input[5:8], norm["weight"]]
    outputs = [out_node.output[0], conv.output[1], ssd.output[1]]
    attrs = {"dt_softplus": _attr(ssd, "dt_softplus", 0), "dt_min": _attr(ssd, "dt_min", 0.0),
             "dt_max": _attr(ssd, "dt_max", float("inf")), "eps": norm["eps"]}
    return {"op": "SSDMixer", "removed": removed, "inputs": inputs, "outputs": outputs, "attrs": attrs,
            "last": out_node}


def fuse_ssd_mixers(model) -> int:
    """Rewrites an onnx.ModelProto in place: each Mamba-2 mixer's middle (from in_proj's output to out_proj's
    input) becomes one ssmrt.cpu::SSDMixer node, for the native library to run. Returns how many; what the
    pattern does not match stays as it was. Nodes left with no reader (the Reshapes' shape arithmetic) go."""
    g = _Graph(model.graph)
    return _replace(model, [_match(g, n) for n in model.graph.node if n.op_type == "SSDScan" and n.domain == "ssmrt"])


def _half_matmul_by_weight(g: _Graph, name):
    """The HalfMatMul (B as (K, N)) that makes `name` from an activation and a 2-D weight initializer, or None."""
    node = g.made_by(name, "HalfMatMul", FUSION_DOMAIN)
    if node is None or len(node.input) != 2 or _attr(node, "trans_b", 0) != 0:
        return None
    w = g.inits.get(node.input[1])
    return node if w is not None and w.data_type == FLOAT16 and len(w.dims) == 2 else None


def _b_c_view(g: _Graph, view, dstate: int) -> bool:
    """Whether a Reshape gives B or C the (batch, seqlen, 1, dstate) shape SelectiveScan reads: its shape the
    exporter's Concat(batch, seqlen, [1], [dstate]) or a constant ending in (1, dstate). SelectiveScan itself checks
    that the leading two are the batch and the sequence, so no other layout of the same values gets through. The
    shape may be computed in the enclosing graph."""
    if len(view.input) != 2:  # allowzero either way: only the leading two could be 0, in an empty input
        return False
    shape = g.const(view.input[1])
    if shape is not None:
        return shape.shape == (4,) and [int(v) for v in shape[2:]] == [1, dstate]
    concat = g.producer.get(view.input[1]) or g.outer_producer.get(view.input[1])
    if concat is None or (concat.op_type, concat.domain) != ("Concat", "") or len(concat.input) != 4:
        return False
    tail = [g.const(i) for i in concat.input[2:]]
    return all(t is not None and t.size == 1 for t in tail) and [int(t.reshape(())) for t in tail] == [1, dstate]


def _match_selective(g: _Graph, scan) -> dict | None:
    """The nodes of a float16 Mamba-1 decode step's mixer around one SelectiveScan (in_proj's output split into x
    and z, the conv, x_proj on HalfMatMul split into dt_low / B / C, dt_proj on HalfMatMul, B and C reshaped), and
    what SelectiveMixer needs of them; None if anything differs."""
    if len(scan.input) != 9 or len(scan.output) != 2 or not scan.input[6]:
        return None
    u, delta, a, b_in, c_in, d, z, dt_bias, state = scan.input
    conv = g.made_by(u, "CausalConv1d", "ssmrt")
    if conv is None or len(conv.input) != 4 or len(conv.output) != 2 or _attr(conv, "activation", b"silu") != b"silu":
        return None
    split1 = g.made_by(conv.input[0], "Split")
    if split1 is None or list(split1.output) != [conv.input[0], z] or _attr(split1, "axis", 0) not in (-1, 2):
        return None
    if len(split1.input) > 1 and split1.input[1]:  # sizes given: they must be two halves
        sizes = g.const(split1.input[1])
        if sizes is None or sizes.shape != (2,) or sizes[0] != sizes[1]:
            return None
    elif _attr(split1, "num_outputs") != 2:
        return None
    dt_proj = _half_matmul_by_weight(g, delta)
    split2 = g.made_by(dt_proj.input[0], "Split") if dt_proj is not None else None
    x_proj = _half_matmul_by_weight(g, split2.input[0]) if split2 is not None else None
    if x_proj is None or x_proj.input[0] != u or len(split2.output) != 3 or split2.output[0] != dt_proj.input[0] or \
            _attr(split2, "axis", 0) not in (-1, 2) or len(split2.input) != 2:
        return None
    sizes = g.const(split2.input[1])
    if sizes is None or sizes.shape != (3,) or sizes[1] != sizes[2]:
        return None
    dstate = int(sizes[1])
    b_view, c_view = g.made_by(b_in, "Reshape"), g.made_by(c_in, "Reshape")
    if b_view is None or c_view is None or [b_view.input[0], c_view.input[0]] != list(split2.output[1:]) or \
            not (_b_c_view(g, b_view, dstate) and _b_c_view(g, c_view, dstate)):
        return None
    # the values between them read by these nodes alone
    singles = [conv.input[0], z, x_proj.output[0], *split2.output, delta, b_in, c_in]
    if any(len(g.readers.get(n, [])) != 1 or n in g.outputs for n in singles):
        return None
    if sorted(map(id, g.readers.get(u, []))) != sorted(map(id, (x_proj, scan))) or u in g.outputs:
        return None
    threads = {_attr(x_proj, "threads", 0), _attr(dt_proj, "threads", 0)}
    if len(threads) != 1:
        return None
    removed = [split1, conv, x_proj, split2, dt_proj, b_view, c_view, scan]
    # xz, conv_weight, conv_bias, conv_state, x_proj, dt_proj, A, D, dt_bias, ssm_state
    inputs = [split1.input[0], *conv.input[1:4], x_proj.input[1], dt_proj.input[1], a, d, dt_bias, state]
    outputs = [scan.output[0], conv.output[1], scan.output[1]]
    attrs = {"delta_softplus": _attr(scan, "delta_softplus", 0), "threads": threads.pop()}
    return {"op": "SelectiveMixer", "removed": removed, "inputs": inputs, "outputs": outputs, "attrs": attrs,
            "last": scan}


def fuse_selective_mixers(model) -> int:
    """Rewrites an onnx.ModelProto in place: in the decode step of a float16 graph that route_decode_matmuls has
    routed (the then-branch of its If), each Mamba-1 mixer's middle becomes one ssmrt.cpu::SelectiveMixer node.
    Returns how many (0 where there is no routed step). A prompt's nodes stay as they are: the fused node's
    products are HalfMatMul's, written for a decode step's few rows."""
    return _fuse_in_step(model, _match_selective, "SelectiveScan", "ssmrt")


def _fuse_in_step(model, match, op_type: str, domain: str) -> int:
    """The matches of match(g, node) for each op_type node of a routed graph's decode step (the then-branch of the
    If route_decode_matmuls makes), put in place; 0 where there is no routed step."""
    route = next((n for n in model.graph.node if n.op_type == "If" and n.name == ROUTED), None)
    if route is None:
        return 0
    (step,) = [a.g for a in route.attribute if a.name == "then_branch"]
    g = _Graph(step, outer=model.graph)
    return _replace(model, [match(g, n) for n in step.node if n.op_type == op_type and n.domain == domain],
                    graph=step)


def _match_block(g: _Graph, norm) -> dict | None:
    """A float16 Mamba-2 decode step's mixer ending at the AddRMSNorm after it (the next block's, or the final
    norm): in_proj on HalfMatMul, the SSDMixer, out_proj on HalfMatMul whose output is the norm's x, each value
    between them read by the next node alone; what SSDBlock needs of them, or None if anything differs."""
    if len(norm.input) != 3 or len(norm.output) != 2 or _attr(norm, "round_half", 0) != 1:
        return None
    out_proj = _half_matmul_by_weight(g, norm.input[0])
    mixer = g.made_by(out_proj.input[0], "SSDMixer", FUSION_DOMAIN) if out_proj is not None else None
    in_proj = _half_matmul_by_weight(g, mixer.input[0]) if mixer is not None else None
    if in_proj is None or len(mixer.input) != 9 or len(mixer.output) != 3:
        return None
    if any(g.readers.get(v) != [reader] or v in g.outputs
           for v, reader in ((in_proj.output[0], mixer), (mixer.output[0], out_proj), (out_proj.output[0], norm))):
        return None
    threads = {_attr(in_proj, "threads", 0), _attr(out_proj, "threads", 0)}
    if len(threads) != 1:
        return None
    # hidden, in_proj, conv_weight, conv_bias, conv_state, A, D, dt_bias, ssm_state, norm_weight, out_proj,
    # residual, next_norm_weight
    inputs = [*in_proj.input, *mixer.input[1:], out_proj.input[1], norm.input[1], norm.input[2]]
    outputs = [*norm.output, *mixer.output[1:]]
    # the mixer's attributes as it has them (an absent one keeps SSDBlock's default, which is SSDMixer's)
    attrs = {a.name: _attr(mixer, a.name) for a in mixer.attribute}
    attrs.update(norm_eps=_attr(norm, "eps", 1e-5), round_half=1, threads=threads.pop())
    return {"op": "SSDBlock", "removed": [in_proj, mixer, out_proj, norm], "inputs": inputs, "outputs": outputs,
            "attrs": attrs, "last": norm}


def fuse_ssd_blocks(model) -> int:
    """Rewrites an onnx.ModelProto in place: in the decode step of a float16 graph that route_decode_matmuls has
    routed (the then-branch of its If), each Mamba-2 mixer, from in_proj to out_proj, with the AddRMSNorm after it
    becomes one ssmrt.cpu::SSDBlock node (fuse_ssd_mixers and fuse_add_rmsnorms first). Returns how many (0 where
    there is no routed step). A prompt's nodes stay as they are: the fused node's products are HalfMatMul's."""
    return _fuse_in_step(model, _match_block, "AddRMSNorm", FUSION_DOMAIN)


def _match_add_norm(g: _Graph, pow_, half: bool) -> dict | None:
    """A block's entry around one Pow: residual = a + b, then its RMSNorm; in a float16 graph (half) the
    exporter's form of a float32 residual stream, r = residual + Cast(x), the norm reading Cast(Cast(r)) (rounded
    through float16) and its output cast to float16."""
    t = pow_.input[0]
    norm = _norm_chain(g, t, None)
    if norm is None:
        return None
    mul_w = norm["nodes"][-1]
    if half:
        out_node = _cast_to(g, mul_w.output[0], FLOAT16)
        widen = g.made_by(t, "Cast")
        narrow = g.made_by(widen.input[0], "Cast") if widen is not None else None
        if out_node is None or narrow is None or _attr(widen, "to") != FLOAT or _attr(narrow, "to") != FLOAT16 or \
                sorted(map(id, g.readers.get(t, []))) != sorted(map(id, (norm["nodes"][0], norm["nodes"][4]))) or \
                t in g.outputs or g.readers.get(narrow.output[0]) != [widen] or narrow.output[0] in g.outputs:
            return None
        r = narrow.input[0]
        add = g.made_by(r, "Add")
        if add is None or len(add.input) != 2:
            return None
        # x: the Add's operand that is a Cast to float32 read by the Add alone; the other is the residual
        casts = [g.made_by(i, "Cast") for i in add.input]
        own = [i for i, c in enumerate(casts) if c is not None and _attr(c, "to") == FLOAT and
               g.readers.get(add.input[i]) == [add] and add.input[i] not in g.outputs]
        if len(own) != 1 or add.input[0] == add.input[1]:
            return None
        cast_x = casts[own[0]]
        removed = [add, cast_x, narrow, widen, *norm["nodes"], out_node]
        inputs = [cast_x.input[0], add.input[1 - own[0]], norm["weight"]]
    else:
        out_node = mul_w
        add = g.made_by(t, "Add")
        # two activations of one shape; a constant operand (a bias) would broadcast, which AddRMSNorm does not
        if add is None or len(add.input) != 2 or any(g.const(i) is not None for i in add.input):
            return None
        r = t
        removed = [add, *norm["nodes"]]
        inputs = [add.input[0], add.input[1], norm["weight"]]
    return {"op": "AddRMSNorm", "removed": removed, "inputs": inputs, "outputs": [out_node.output[0], r],
            "attrs": {"eps": norm["eps"], "round_half": int(half)}, "last": out_node}


def fuse_add_rmsnorms(model, dtype: str) -> int:
    """Rewrites an onnx.ModelProto in place: each block's residual add and RMSNorm (in a float16 graph with the
    casts around them) becomes one ssmrt.cpu::AddRMSNorm node. dtype: the artifact's ("float32" or "float16":
    which form the exporter wrote). Returns how many; a norm without a residual add (the first block's) or in
    any other form stays as it was."""
    if dtype not in ("float32", "float16"):
        return 0
    g = _Graph(model.graph)
    return _replace(model, [_match_add_norm(g, n, dtype == "float16") for n in model.graph.node
                            if n.op_type == "Pow" and n.domain == ""])


def _replace(model, matches: list, graph=None) -> int:
    """Puts each match's node in place of the nodes it removes (a match overlapping an earlier one is skipped),
    drops the nodes left unread; returns how many were put in. graph: where the matches are (default the model's
    main graph; a branch's outputs stay read)."""
    from onnx import helper

    graph = model.graph if graph is None else graph
    fused: dict[int, object] = {}  # id of the node each fused one takes the place of -> the fused node
    gone: set[int] = set()
    for m in matches:
        if m is None or any(id(n) in gone for n in m["removed"]):
            continue
        gone.update(id(n) for n in m["removed"])
        fused[id(m["last"])] = helper.make_node(m["op"], m["inputs"], m["outputs"], domain=FUSION_DOMAIN,
                                                name=f"{m['outputs'][0]}.fused", **m["attrs"])
    if not fused:
        return 0
    nodes = [fused.get(id(n), n) for n in graph.node if id(n) not in gone or id(n) in fused]
    nodes = _in_order(_without_dead(nodes, {o.name for o in graph.output}))
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == FUSION_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(FUSION_DOMAIN, 1))
    return len(fused)


def _in_order(nodes) -> list:
    """nodes sorted so that each comes after the nodes whose outputs it reads (ONNX's rule), otherwise in the
    order given: a fused node takes the place of the last node it replaced, and a value it makes may be read by
    a node that sat between the ones it replaced."""
    made = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    needs = [{made[x] for x in _names_read(n) if x in made and made[x] != i} for i, n in enumerate(nodes)]
    done: set[int] = set()
    order: list[int] = []
    while len(order) < len(nodes):
        before = len(order)
        for i in range(len(nodes)):
            if i not in done and needs[i] <= done:
                done.add(i)
                order.append(i)
        if len(order) == before:
            raise ValueError("the fused graph has a cycle")  # a fused node reading its own output: a matcher bug
    return [nodes[i] for i in order]


def _without_dead(nodes, outputs: set) -> list:
    """nodes less the standard-domain ones whose outputs nothing reads (repeated until none is left)."""
    while True:
        read = {x for n in nodes for x in _names_read(n)} | outputs
        live = [n for n in nodes if n.domain != "" or any(o in read for o in n.output if o)]
        if len(live) == len(nodes):
            return live
        nodes = live

"""Weight-only quantisation: the projections and the LM head as ONNX Runtime's block-wise `MatMulNBits`.

The scheme is round-to-nearest per block of `block_size` consecutive input features (the K axis of the graph's
MatMul, whose weight is the transposed nn.Linear weight) of one output feature: a float32 scale per block, and
with an asymmetric scheme an integer zero point per block. int8 keeps 8 bits a weight, int4 4. ONNX Runtime's
own quantiser (onnxruntime.quantization.matmul_nbits_quantizer) packs the export's graph; `quantize_ref` /
`dequantize_ref` are the same arithmetic in plain torch, tested bit for bit against what it packed, so that
`ssmrt compare` can build the model the quantised weights mean (dequantize(quantize(W)) in float32) without
ONNX Runtime.

The embedding table is quantised to int8 (the scheme's blocks along d_model, whatever the projections' bits) and
read through ONNX Runtime's `GatherBlockQuantized` (a row's codes dequantised as it is gathered): a Gather reads
one row a token, so this costs a decode step nothing and keeps a float32 table (154 MB for a 50k x 768
vocabulary) out of the file. One precision for both schemes: the table's values enter the residual stream as
they are, and on the demo's trained byte model (dequantised in torch, same checkpoint) an int8 table raised int8
weights' KL by 1.2x where an int4 one raised it 42x; with int4 weights an int8 table cost nothing measurable and
an int4 one 1.06x, for a 19 MB smaller 130M file (llama.cpp keeps a tied table at 6 bits in its q4_0 files). A
tied head keeps its own packed copy, at the scheme's bits. Artifacts written before this (metadata without
`embedding`) hold a float32 table.

What stays float: the conv weights, A, D, the biases, the norms and the states.

The activations a quantised matmul reads (`activations`, recorded with the scheme):
- "int8" (the default): each block of `block_size` input features of a row is quantised to int8 inside the
  matmul, symmetric, scale max|a| / 127, rounded to nearest (MatMulNBits' accuracy level 4). Integer dot
  products then read a quarter of float32's bytes: ONNX Runtime's fast CPU kernels, and what llama.cpp's q8_0 /
  q4_0 dot products do too. `quantize_activations_ref` is that arithmetic, tested against ONNX Runtime.
- "float32": the dequantised blocks times float32 activations (accuracy level 0); the quantised weights are then
  the only approximation. ONNX Runtime's CPU kernel for 8-bit weights at that level takes many times a float32
  step; ssmrt's runner gives such an artifact's decode step its own kernel (ssmrt.ort_ops' Int8MatMul).

Loading or running a quantised artifact needs none of this module's torch code: MatMulNBits is a contrib op
ONNX Runtime's CPU provider runs natively.
"""

from __future__ import annotations

import functools

from .errors import SsmrtError

SCHEMES = {"int8": 8, "int4": 4}
DEFAULT_BLOCK_SIZE = 32
# MatMulNBits takes blocks of a power of two from 16 up; beyond a few thousand a block is a whole column of any
# model this project exports, which per-column scales (block_size >= K) already give.
MIN_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 4096
# Symmetric (a scale per block, the zero point fixed at the middle of the range) or asymmetric (a zero point per
# block too): asymmetric, because it spends the whole range on the block's [min, max] instead of [-amax, amax].
# Measured on the demo's trained model (benchmarks/RESULTS.md): lower KL for both int8 and int4.
SYMMETRIC = False
# The activations of a quantised matmul -> MatMulNBits' accuracy_level.
ACTIVATIONS = {"int8": 4, "float32": 0}
DEFAULT_ACTIVATIONS = "int8"
# What an artifact exported before the choice existed computed (accuracy level 0).
RECORDED_DEFAULT_ACTIVATIONS = "float32"
# The embedding table of a quantised export (see the module docstring), and what one exported before it held.
EMBEDDING = "int8"
EMBEDDINGS = ("int8", "float32")
RECORDED_DEFAULT_EMBEDDING = "float32"
# The per-layer projections whose weights are quantised, by architecture (module names in ssmrt.models.mamba),
# and the LM head.
LAYER_LINEARS = {"mamba1": ("in_proj", "x_proj", "dt_proj", "out_proj"), "mamba2": ("in_proj", "out_proj")}
HEAD = "lm_head"


def check_weights(weights, block_size, dtype: str = "float32", target: str = "portable",
                  activations: str | None = None) -> dict | None:
    """The metadata entry of a `--weights` / `--block-size` / `--activations` choice ({"scheme", "bits",
    "block_size", "symmetric", "activations"}), or None for float weights. SsmrtError in one line for anything
    MatMulNBits cannot take, and for quantised weights with an export dtype or target they are not made for."""
    if weights is None:
        for name, v in (("--block-size", block_size), ("--activations", activations)):
            if v is not None:
                raise SsmrtError(f"{name} applies to quantised weights; give --weights int8 or int4 with it")
        return None
    if activations is None:
        activations = DEFAULT_ACTIVATIONS
    if activations not in ACTIVATIONS:
        raise SsmrtError(f"--activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    if weights not in SCHEMES:
        raise SsmrtError(f"--weights must be one of {', '.join(SCHEMES)}, got {weights!r}")
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE
    if (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < MIN_BLOCK_SIZE
            or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1)):
        raise SsmrtError(f"--block-size must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} "
                         f"(MatMulNBits' blocks), got {block_size!r}")
    if dtype != "float32" or target != "portable":
        # MatMulNBits runs on ONNX Runtime (float32 activations here); TensorRT's parser has no such op
        raise SsmrtError(f"--weights {weights} takes --dtype float32 and --target portable; got --dtype {dtype} "
                         f"--target {target}")
    return {"scheme": weights, "bits": SCHEMES[weights], "block_size": block_size, "symmetric": SYMMETRIC,
            "activations": activations, "embedding": EMBEDDING}


def scheme_of(info: dict | None, where) -> dict | None:
    """An artifact's recorded weights entry (metadata export.weights) checked; None for float weights."""
    if info is None:
        return None
    if (not isinstance(info, dict) or info.get("scheme") not in SCHEMES or info.get("bits") != SCHEMES[info["scheme"]]
            or not isinstance(info.get("symmetric"), bool)):
        raise SsmrtError(f"{where}: metadata export.weights {info!r} is not a weight scheme ssmrt writes")
    info = {**info, "activations": info.get("activations", RECORDED_DEFAULT_ACTIVATIONS),
            "embedding": info.get("embedding", RECORDED_DEFAULT_EMBEDDING)}
    if info["embedding"] not in EMBEDDINGS:
        raise SsmrtError(f"{where}: metadata export.weights.embedding must be one of {', '.join(EMBEDDINGS)}, got "
                         f"{info['embedding']!r}")
    try:
        check_weights(info["scheme"], info.get("block_size"), activations=info["activations"])
    except SsmrtError as e:
        raise SsmrtError(f"{where}: metadata export.weights: {e}") from None
    return info


def describe_scheme(info: dict | None) -> str:
    """'int4 weights (block 32, asymmetric, int8 activations, int8 embedding)', or 'float weights'."""
    if not info:
        return "float weights"
    return (f"{info['scheme']} weights (block {info['block_size']}, "
            f"{'symmetric' if info['symmetric'] else 'asymmetric'}, {info['activations']} activations, "
            f"{info.get('embedding', RECORDED_DEFAULT_EMBEDDING)} embedding)")


# ----------------------------------------------------------------------------- the reference arithmetic


def _roundf(x):
    """C's roundf (halves away from zero) on a float32 tensor, exactly: torch.round rounds halves to even."""
    import torch

    whole = torch.trunc(x)
    frac = x - whole  # exact in float
    return whole + torch.sign(x) * (frac.abs() >= 0.5).to(x.dtype)


def quantize_ref(w, bits: int, block_size: int, symmetric: bool):
    """Block-wise RTN of a weight w [K, N] (the graph's MatMul layout: K inputs, N outputs), blocks along K per
    output column, as ONNX Runtime's quantiser computes it in float32. Returns (q [N, k_blocks, block_size]
    uint8, the integer codes, zero beyond K; scales [N, k_blocks] float32; zero_points [N, k_blocks] uint8)."""
    import torch

    w = w.detach().to(torch.float32).cpu()
    K, N = w.shape
    blocks = -(-K // block_size)
    qmax = float((1 << bits) - 1)
    # [N, blocks, block_size], padded with zeros (which neither move a block's min / max past 0 nor its amax)
    cols = torch.zeros(N, blocks * block_size, dtype=torch.float32)
    cols[:, :K] = w.t()
    cols = cols.reshape(N, blocks, block_size)
    valid = (torch.arange(blocks * block_size) < K).reshape(1, blocks, block_size)
    if symmetric:
        mid = float(1 << (bits - 1))
        hi, lo = cols.amax(-1), cols.amin(-1)
        extreme = torch.where(hi.abs() > lo.abs(), hi, lo)  # the signed value of largest magnitude; ties: the min
        scales = extreme / -mid
        zp = torch.full_like(scales, mid)
    else:
        lo = torch.clamp(torch.where(valid, cols, torch.inf).amin(-1), max=0.0)
        hi = torch.clamp(torch.where(valid, cols, -torch.inf).amax(-1), min=0.0)
        scales = (hi - lo) / qmax
        zp_fp = torch.where(scales != 0, 0.0 - lo / torch.where(scales != 0, scales, 1.0), lo)
        zp = torch.clamp(_roundf(zp_fp), 0.0, qmax)
    recip = torch.where(scales != 0, 1.0 / torch.where(scales != 0, scales, 1.0), 0.0)
    q = torch.clamp(_roundf(cols * recip[..., None] + zp[..., None]), 0.0, qmax)
    q = torch.where(valid, q, 0.0)
    return q.to(torch.uint8), scales, zp.to(torch.uint8)


def dequantize_ref(q, scales, zero_points, K: int):
    """The float32 weight [K, N] the codes stand for: scale * (q - zero_point), as MatMulNBits dequantises."""
    import torch

    w = scales[..., None] * (q.to(torch.float32) - zero_points.to(torch.float32)[..., None])
    N = w.shape[0]
    return w.reshape(N, -1)[:, :K].t().contiguous()


def fake_quantize(w, bits: int, block_size: int, symmetric: bool):
    """dequantize(quantize(w)) of a weight w [K, N], float32."""
    return dequantize_ref(*quantize_ref(w, bits, block_size, symmetric), w.shape[0])


def quantize_activations_ref(x, block_size: int):
    """What an int8-activation MatMulNBits multiplies instead of x (..., K): each block of block_size features of a
    row (the last one maybe shorter) as int8 codes, symmetric, scale max|a| / 127, rounded to nearest, and
    dequantised again, in x's dtype. A block of zeros stays zero."""
    import torch

    K = x.shape[-1]
    blocks = -(-K // block_size)
    padded = torch.nn.functional.pad(x, (0, blocks * block_size - K)).reshape(*x.shape[:-1], blocks, block_size)
    scale = padded.abs().amax(-1, keepdim=True) / 127
    codes = torch.round(padded / torch.where(scale > 0, scale, 1))
    return (codes * scale).reshape(*x.shape[:-1], blocks * block_size)[..., :K]


@functools.cache
def _quantized_input_class():
    """The module class behind _quantized_input, made once (torch is imported lazily in this module)."""
    import torch

    class QuantizedInput(torch.nn.Module):
        """A Linear whose input is first quantised as an int8-activation MatMulNBits quantises it."""

        def __init__(self, linear, block_size: int):
            super().__init__()
            self.linear, self.block_size = linear, block_size

        @property
        def weight(self):
            return self.linear.weight

        def forward(self, x):
            return self.linear(quantize_activations_ref(x, self.block_size))

    return QuantizedInput


def _quantized_input(linear, block_size: int):
    """`linear` behind a module that first quantises its input as an int8-activation MatMulNBits does."""
    return _quantized_input_class()(linear, block_size)


def dequantized_model(model, info: dict):
    """The MambaLM `model` (float32, changed in place and returned) with every weight the export quantises
    replaced by what its codes mean, and with int8 activations each quantised matmul's input quantised as
    MatMulNBits does it: the model a quantised artifact computes, to fp32 rounding. A tied head gets its own
    (dequantised) matrix; the embedding table's rows are what their int8 codes mean where the artifact quantised
    it (info["embedding"]), as they were otherwise. Cast it to float64 after for a reference."""
    import torch

    from .models.mamba import MambaLM

    if not isinstance(model, MambaLM):
        raise SsmrtError(f"dequantized_model(model) takes an ssmrt model, got {type(model).__name__}")
    if model.dtype != torch.float32:
        raise SsmrtError(f"dequantized_model: the weights are quantised from float32, the model is {model.dtype}")
    bits, block, sym = info["bits"], info["block_size"], info["symmetric"]
    int8_inputs = info.get("activations", RECORDED_DEFAULT_ACTIVATIONS) == "int8"

    def swap(owner, name):
        linear = getattr(owner, name)
        # nn.Linear weight [out, in] is the graph's B transposed: K = in
        w = fake_quantize(linear.weight.detach().t(), bits, block, sym).t().contiguous()
        linear.weight = torch.nn.Parameter(w, requires_grad=False)
        if int8_inputs and name != "dt_proj":  # applied as a bare matmul of its weight: see below
            setattr(owner, name, _quantized_input(linear, block))

    with torch.no_grad():
        for layer in model.backbone.layers:
            for name in LAYER_LINEARS[model.config.arch]:
                swap(layer.mixer, name)
            if int8_inputs and model.config.arch == "mamba1":
                # dt_proj is applied as a bare matmul (its bias goes into the scan)
                layer.mixer.dt_input = lambda dt, block=block: quantize_activations_ref(dt, block)
        swap(model, HEAD)  # a new Parameter: unties a tied head from the embedding
        if info.get("embedding", RECORDED_DEFAULT_EMBEDDING) != "float32":
            table = model.backbone.embeddings
            # a row of the table is quantised along d_model, as the head's columns are
            w = fake_quantize(table.weight.detach().t(), SCHEMES[EMBEDDING], block, sym).t().contiguous()
            table.weight = torch.nn.Parameter(w, requires_grad=False)
    return model


# ----------------------------------------------------------------------------------- the graph


def expected_matmuls(config) -> int:
    """How many weight matmuls an export of this config quantises: the layers' projections and the head."""
    return config.n_layer * len(LAYER_LINEARS[config.arch]) + 1


def quantize_graph(proto, info: dict, expected: int):
    """proto (an export's ModelProto) with every MatMul by a constant 2-D weight as MatMulNBits, packed by ONNX
    Runtime's quantiser; the fallback bodies (model-local functions) are left as they are. `expected`: how
    many such matmuls the model has (expected_matmuls); a different count is an exporter bug and raises."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    _fold_weight_transposes(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    weights = [n.name for n in proto.graph.node
               if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    if len(weights) != expected:
        raise SsmrtError(f"the exported graph has {len(weights)} weight MatMuls where the model has {expected} "
                         "projections and a head; refusing to quantise a graph of unknown shape")
    config = DefaultWeightOnlyQuantConfig(block_size=info["block_size"], is_symmetric=info["symmetric"],
                                          accuracy_level=ACTIVATIONS[info["activations"]],
                                          bits=info["bits"], op_types_to_quantize=("MatMul",))
    # the quantiser logs every node it visits at INFO on the root logger's handlers
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(proto, algo_config=config, nodes_to_include=weights)
    quantizer.process()
    out = quantizer.model.model
    packed = [n for n in out.graph.node if n.op_type == "MatMulNBits"]
    if len(packed) != expected:
        raise SsmrtError(f"ONNX Runtime's quantiser packed {len(packed)} of the graph's {expected} weight MatMuls")
    level = ACTIVATIONS[info["activations"]]
    for node in packed:  # the quantiser leaves the attribute out where it is the default (0)
        attrs = [a for a in node.attribute if a.name == "accuracy_level"]
        if [a.i for a in attrs] not in ([level], [] if level == 0 else None):
            raise SsmrtError(f"ONNX Runtime's quantiser set accuracy_level {[a.i for a in attrs]} on {node.name}, "
                             f"not {level}")
    if info.get("embedding", RECORDED_DEFAULT_EMBEDDING) != "float32":
        _quantize_embedding(out, info)
    # the initializers the MatMuls read are gone; the quantiser keeps any still named by another node
    used = {i for n in out.graph.node for i in n.input}
    keep = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return out


def _quantize_embedding(proto, info: dict) -> None:
    """The embedding's Gather (the float 2-D table indexed by input_ids) becomes GatherBlockQuantized over the
    table quantised to EMBEDDING with the scheme's blocks and symmetry (quantize_ref, blocks along d_model).
    Raises if the graph has no such Gather, or more than one."""
    import numpy as np
    import torch
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    gathers = [i for i, n in enumerate(proto.graph.node) if n.op_type == "Gather" and n.input[0] in inits
               and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].data_type == TensorProto.FLOAT
               and n.input[1] == "input_ids"]
    if len(gathers) != 1:
        raise SsmrtError(f"the exported graph has {len(gathers)} float embedding Gathers of input_ids where the "
                         "model has one; refusing to quantise a graph of unknown shape")
    (index,) = gathers
    node = proto.graph.node[index]
    table = numpy_helper.to_array(inits[node.input[0]])
    bits, block = SCHEMES[EMBEDDING], info["block_size"]
    V, d = table.shape
    q, scales, zp = quantize_ref(torch.from_numpy(table.copy()).t(), bits, block, info["symmetric"])
    codes = q.numpy().reshape(V, -1)[:, :d]  # one code a byte
    zp = zp.numpy()
    name = node.input[0] + ".q"
    proto.graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(codes), name),
                                    numpy_helper.from_array(scales.numpy(), name + ".scales"),
                                    numpy_helper.from_array(np.ascontiguousarray(zp), name + ".zero_points")])
    quantized = helper.make_node("GatherBlockQuantized", [name, node.input[1], name + ".scales", name + ".zero_points"],
                                 list(node.output), name=f"{node.name or node.output[0]}.quantized",
                                 domain="com.microsoft", bits=bits, block_size=block, gather_axis=0,
                                 quantize_axis=1)
    proto.graph.node[index].CopyFrom(quantized)


def _fold_weight_transposes(proto) -> None:
    """Each MatMul that reads a Transpose of an initializer (the exporter leaves a tied head as Transpose(embedding)
    where it does not fold it) reads a transposed initializer of its own instead, so the quantiser sees a constant
    weight; the embedding's Gather keeps the original table. A Transpose nothing else reads is dropped."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    producers = {n.output[0]: n for n in proto.graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    folded = set()
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in producers:
            continue
        tr = producers[node.input[1]]
        perm = [a.ints for a in tr.attribute if a.name == "perm"]
        w = numpy_helper.to_array(inits[tr.input[0]])
        if w.ndim != 2 or (perm and list(perm[0]) != [1, 0]):
            continue
        name = tr.output[0] + ".folded"
        if name not in inits:
            inits[name] = numpy_helper.from_array(w.T.copy(), name)
            proto.graph.initializer.append(inits[name])
        node.input[1] = name
        folded.add(tr.output[0])
    readers = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    for tr in [producers[o] for o in folded if o not in readers]:
        proto.graph.node.remove(tr)


def unpack_matmul_nbits(node, initializers: dict):
    """The codes, scales and zero points a MatMulNBits node holds, in quantize_ref's layout (q [N, k_blocks,
    block_size], scales [N, k_blocks], zero points [N, k_blocks]; the symmetric scheme's fixed middle where
    the node has none), as numpy arrays, the codes beyond K (padding MatMulNBits never reads) as zero: what the
    tests hold quantize_ref to."""
    import numpy as np
    from onnx import numpy_helper

    attrs = {a.name: a.i for a in node.attribute}
    bits, block, N, K = attrs["bits"], attrs["block_size"], attrs["N"], attrs["K"]
    blocks = -(-K // block)
    packed = numpy_helper.to_array(initializers[node.input[1]]).reshape(N, blocks, -1)
    scales = numpy_helper.to_array(initializers[node.input[2]]).reshape(N, blocks).astype(np.float32)
    if bits == 8:
        q = packed
    else:  # two codes a byte, the first in the low nibble
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, blocks, -1)
    q = np.where((np.arange(blocks * block) < K).reshape(1, blocks, block), q, 0)
    if len(node.input) > 3 and node.input[3]:
        zp = numpy_helper.to_array(initializers[node.input[3]]).reshape(N, -1)
        if bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(N, -1)
        zp = zp[:, :blocks]
    else:
        zp = np.full((N, blocks), 1 << (bits - 1), dtype=np.uint8)
    return q.astype(np.uint8), scales, zp.astype(np.uint8)

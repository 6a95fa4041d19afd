"""Weight-only quantisation: the projections and the LM head as ONNX Runtime's block-wise `MatMulNBits`.

The scheme is block-wise: per block of `block_size` consecutive input features (the K axis of the graph's
MatMul, whose weight is the transposed nn.Linear weight) of one output feature: a float32 scale per block, and
with an asymmetric scheme an integer zero point per block. int8 keeps 8 bits a weight, int4 4. ONNX Runtime's
own quantiser (onnxruntime.quantization.matmul_nbits_quantizer) packs the export's graph; `quantize_ref` /
`dequantize_ref` are the same arithmetic in plain torch, tested bit for bit against what it packed, so that
`ssmrt compare` can build the model the quantised weights mean (dequantize(quantize(W)) in float32) without
ONNX Runtime. With a calibration text (export --calibration) GPTQ chooses the codes instead, each block's scale
and zero point taken the same way from its weights as GPTQ has updated them (`gptq_quantize_ref`, ROUNDINGS
below), and they are written into the initializers ONNX Runtime's quantiser laid out (`pack_matmul_nbits`, held to
its packing byte for byte).

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
# The embedding table of a quantised export (see the module docstring; export --embedding float32 keeps it
# float, for the closest model at a larger file), and what one exported before the choice held.
EMBEDDING = "int8"
EMBEDDINGS = ("int8", "float32")
RECORDED_DEFAULT_EMBEDDING = "float32"
# The per-layer projections whose weights are quantised, by architecture (module names in ssmrt.models.mamba),
# and the LM head.
LAYER_LINEARS = {"mamba1": ("in_proj", "x_proj", "dt_proj", "out_proj"), "mamba2": ("in_proj", "out_proj")}
HEAD = "lm_head"
# How each weight's code is chosen (recorded with the scheme as `rounding`):
# - "rtn": the nearest code of its block (ONNX Runtime's quantiser; quantize_ref).
# - "gptq" (export --calibration): the codes of a matrix are chosen along K one input feature at a time, and each
#   rounding's error is spread over the features not yet rounded in the proportions the calibration text's
#   activations say cancel it best (Frantar et al., "GPTQ", 2023): the matmul's outputs on activations like the
#   calibration text's move less, though each weight may move more. The matrices are rounded in the model's order,
#   each against the inputs it gets once the ones before it hold their codes, and its weight first moved by least
#   squares to give the float model's outputs on those inputs (calibrated_codes): every matrix's rounding error is
#   the same at every position, so what the earlier ones leave in a later one's inputs adds up in the long-memory
#   states unless the later ones make up for it. The codes cannot be computed again without the calibration text,
#   so an artifact records which MatMulNBits node holds each matrix (`calibrated_nodes`) and `ssmrt compare` reads
#   them from it.
ROUNDINGS = ("rtn", "gptq")
RECORDED_DEFAULT_ROUNDING = "rtn"
# Added to H's diagonal, as a fraction of its mean: keeps H invertible where features move together in the
# calibration text or the text has fewer positions than K (features that are always 0 get a diagonal of 1).
GPTQ_DAMP = 0.01
# The columns GPTQ rounds one at a time before it updates the rest of the matrix in one product (its "lazy
# batch"): the same updates as one at a time throughout, summed in another order (so now and then a code rounds
# the other way), in far fewer passes over a large matrix.
GPTQ_COLUMNS = 128
# The calibration text is run through the model in pieces of this many tokens, each from an empty state.
CALIBRATION_CHUNK = 512


def check_weights(weights, block_size, dtype: str = "float32", target: str = "portable",
                  activations: str | None = None, embedding: str | None = None) -> dict | None:
    """The metadata entry of a `--weights` / `--block-size` / `--activations` / `--embedding` choice ({"scheme",
    "bits", "block_size", "symmetric", "activations", "embedding"}), or None for float weights. SsmrtError in one
    line for anything MatMulNBits cannot take, and for quantised weights with an export dtype or target they are
    not made for."""
    if weights is None:
        for name, v in (("--block-size", block_size), ("--activations", activations), ("--embedding", embedding)):
            if v is not None:
                raise SsmrtError(f"{name} applies to quantised weights; give --weights int8 or int4 with it")
        return None
    if activations is None:
        activations = DEFAULT_ACTIVATIONS
    if activations not in ACTIVATIONS:
        raise SsmrtError(f"--activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    if embedding is None:
        embedding = EMBEDDING
    if embedding not in EMBEDDINGS:
        raise SsmrtError(f"--embedding must be one of {', '.join(EMBEDDINGS)}, got {embedding!r}")
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
            "activations": activations, "embedding": embedding}


def scheme_of(info: dict | None, where) -> dict | None:
    """An artifact's recorded weights entry (metadata export.weights) checked; None for float weights."""
    if info is None:
        return None
    if (not isinstance(info, dict) or info.get("scheme") not in SCHEMES or info.get("bits") != SCHEMES[info["scheme"]]
            or not isinstance(info.get("symmetric"), bool)):
        raise SsmrtError(f"{where}: metadata export.weights {info!r} is not a weight scheme ssmrt writes")
    info = {**info, "activations": info.get("activations", RECORDED_DEFAULT_ACTIVATIONS),
            "embedding": info.get("embedding", RECORDED_DEFAULT_EMBEDDING),
            "rounding": info.get("rounding", RECORDED_DEFAULT_ROUNDING)}
    if info["embedding"] not in EMBEDDINGS:
        raise SsmrtError(f"{where}: metadata export.weights.embedding must be one of {', '.join(EMBEDDINGS)}, got "
                         f"{info['embedding']!r}")
    if info["rounding"] not in ROUNDINGS:
        raise SsmrtError(f"{where}: metadata export.weights.rounding must be one of {', '.join(ROUNDINGS)}, got "
                         f"{info['rounding']!r}")
    nodes = info.get("calibrated_nodes")
    if info["rounding"] == "gptq" and not (isinstance(nodes, dict) and nodes
                                           and all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in nodes.items())):
        raise SsmrtError(f"{where}: metadata export.weights: GPTQ-rounded weights without the map of their "
                         "MatMulNBits nodes (calibrated_nodes)")
    try:
        check_weights(info["scheme"], info.get("block_size"), activations=info["activations"])
    except SsmrtError as e:
        raise SsmrtError(f"{where}: metadata export.weights: {e}") from None
    return info


def describe_scheme(info: dict | None) -> str:
    """'int4 weights (block 32, asymmetric, int8 activations, int8 embedding)', or 'float weights'; GPTQ-rounded
    ones say so, with their calibration text's length."""
    if not info:
        return "float weights"
    rounding = ""
    if info.get("rounding", RECORDED_DEFAULT_ROUNDING) == "gptq":
        rounding = f", GPTQ rounding on {info.get('calibration_tokens', '?')} calibration tokens"
    return (f"{info['scheme']} weights (block {info['block_size']}, "
            f"{'symmetric' if info['symmetric'] else 'asymmetric'}, {info['activations']} activations, "
            f"{info.get('embedding', RECORDED_DEFAULT_EMBEDDING)} embedding{rounding})")


# ----------------------------------------------------------------------------- the reference arithmetic


def _roundf(x):
    """C's roundf (halves away from zero) on a float32 tensor, exactly: torch.round rounds halves to even."""
    import torch

    whole = torch.trunc(x)
    frac = x - whole  # exact in float
    return whole + torch.sign(x) * (frac.abs() >= 0.5).to(x.dtype)


def _block_grid(cols, valid, bits: int, symmetric: bool):
    """Each block's scale, zero point (as float32) and the scale's reciprocal, from cols [N, blocks, block_size]
    float32 (zeros where `valid` is False), as ONNX Runtime's quantiser computes them."""
    import torch

    qmax = float((1 << bits) - 1)
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
    return scales, zp, recip


def _code(x, recip, zp, bits: int):
    """The code of x on a block's grid (float32, broadcast): round-half-away(x / scale + zp), clamped."""
    import torch

    return torch.clamp(_roundf(x * recip + zp), 0.0, float((1 << bits) - 1))


def quantize_ref(w, bits: int, block_size: int, symmetric: bool):
    """Block-wise RTN of a weight w [K, N] (the graph's MatMul layout: K inputs, N outputs), blocks along K per
    output column, as ONNX Runtime's quantiser computes it in float32. Returns (q [N, k_blocks, block_size]
    uint8, the integer codes, zero beyond K; scales [N, k_blocks] float32; zero_points [N, k_blocks] uint8)."""
    import torch

    w = w.detach().to(torch.float32).cpu()
    K, N = w.shape
    blocks = -(-K // block_size)
    # [N, blocks, block_size], padded with zeros (which neither move a block's min / max past 0 nor its amax)
    cols = torch.zeros(N, blocks * block_size, dtype=torch.float32)
    cols[:, :K] = w.t()
    cols = cols.reshape(N, blocks, block_size)
    valid = (torch.arange(blocks * block_size) < K).reshape(1, blocks, block_size)
    scales, zp, recip = _block_grid(cols, valid, bits, symmetric)
    q = torch.where(valid, _code(cols, recip[..., None], zp[..., None], bits), 0.0)
    return q.to(torch.uint8), scales, zp.to(torch.uint8)


def gptq_quantize_ref(w, H, bits: int, block_size: int, symmetric: bool, damp: float = GPTQ_DAMP):
    """GPTQ's codes for a weight w [K, N] (quantize_ref's layout and scheme, and its return values): H [K, K]
    is the sum over the calibration text's positions of x x^T of the matmul's input x. The input features are
    rounded in order; feature i's rounding error, divided by the i-th pivot of the Cholesky factor U of H^-1
    (H + damp * mean(diag H) * I), is subtracted from the features after it in proportion to U's row i, which
    minimises the growth of |X (W - W')|^2 that the remaining features can still cancel. A block's scale and zero
    point are taken from its weights as they stand when its first feature is reached. Where H is a multiple of
    the identity nothing is spread, and the codes are quantize_ref's."""
    import torch

    w = w.detach().to(torch.float32).cpu()
    K, N = w.shape
    if tuple(H.shape) != (K, K):
        raise SsmrtError(f"gptq_quantize_ref: H must be [{K}, {K}] for a weight of {K} inputs, got {tuple(H.shape)}")
    H = H.detach().to(torch.float64).cpu().clone()
    diag = H.diagonal()
    diag[diag <= 0] = 1.0  # a feature that was always 0: nothing to spread its rounding by, its own only
    H += damp * float(diag.mean()) * torch.eye(K, dtype=torch.float64)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).to(torch.float32)
    except torch.linalg.LinAlgError as e:  # NaN or infinite activations in the calibration text's pass
        raise SsmrtError(f"GPTQ: the calibration activations' products cannot be inverted ({str(e).splitlines()[0]})"
                         ) from None
    blocks = -(-K // block_size)
    W = w.t().clone(memory_format=torch.contiguous_format)  # [N, K]: a feature is a column; updated in place
    q = torch.zeros(N, blocks * block_size, dtype=torch.uint8)  # the codes are whole numbers in [0, 2^bits)
    scales = torch.zeros(N, blocks, dtype=torch.float32)
    zps = torch.zeros(N, blocks, dtype=torch.float32)
    # Both powers of two: a block smaller than a batch lies inside one, a larger one starts where a batch does.
    # Either way, at a block's start every weight of the block holds every update so far: those in this batch in
    # `part`, those past it (a larger block, at its batch's start) in W.
    step = GPTQ_COLUMNS
    for c0 in range(0, K, step):
        c1 = min(c0 + step, K)
        part, err = W[:, c0:c1].clone(), torch.zeros(N, c1 - c0, dtype=torch.float32)
        for j in range(c1 - c0):
            i = c0 + j
            if i % block_size == 0:
                b, width = i // block_size, min(block_size, K - i)
                cols = torch.zeros(N, 1, block_size, dtype=torch.float32)
                cols[:, 0, :width] = torch.cat([part[:, j:], W[:, c1:i + width]], 1)[:, :width]
                valid = (torch.arange(block_size) < width).reshape(1, 1, block_size)
                s, z, r = (t[:, 0] for t in _block_grid(cols, valid, bits, symmetric))
                scales[:, b], zps[:, b] = s, z
            code = _code(part[:, j], r, z, bits)
            q[:, i] = code
            e = (part[:, j] - s * (code - z)) / U[i, i]
            part[:, j:] -= e[:, None] * U[i, i:c1][None, :]
            err[:, j] = e
        W[:, c1:] -= err @ U[c0:c1, c1:]
    return q.reshape(N, blocks, block_size), scales, zps.to(torch.uint8)


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


def quantised_linears(model) -> list[tuple[str, object, str]]:
    """(name, owner module, attribute) of each matrix an export quantises, in the model's order: every layer's
    projections (LAYER_LINEARS), then the head. The names are the modules' in model.named_modules()."""
    arch = model.config.arch
    out = [(f"backbone.layers.{i}.mixer.{name}", layer.mixer, name)
           for i, layer in enumerate(model.backbone.layers) for name in LAYER_LINEARS[arch]]
    return out + [(HEAD, model, HEAD)]


class _Capture:
    """While open, hands add(name, x) the input x of each listed matrix (quantised_linears' names) every time the
    model multiplies by it, and leaves the model as it came when closed (hooks removed, Mamba-1's dt_input put
    back), also after an error. Mamba-1's dt_proj is applied as a bare matmul of its weight, so its input is taken
    where the mixer hands it over (dt_input, after any function already there)."""

    def __init__(self, model, names, add):
        self.model, self.names, self.add = model, set(names), add
        self.hooks, self.mixers = [], []

    def __enter__(self):
        try:
            for name, owner, attr in quantised_linears(self.model):
                if name not in self.names:
                    continue
                if attr == "dt_proj":
                    self.mixers.append((owner, owner.dt_input))

                    def capture(dt, name=name, before=owner.dt_input):  # what the matmul multiplies: after `before`
                        dt = dt if before is None else before(dt)
                        self.add(name, dt)
                        return dt

                    owner.dt_input = capture
                else:
                    self.hooks.append(getattr(owner, attr).register_forward_hook(
                        lambda mod, args, out, name=name: self.add(name, args[0])))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        for m, before in self.mixers:
            m.dt_input = before
        self.hooks, self.mixers = [], []
        return False


def _pieces(ids):
    import torch

    ids = torch.as_tensor(list(ids), dtype=torch.long)
    return [ids[c0:c0 + CALIBRATION_CHUNK][None] for c0 in range(0, len(ids), CALIBRATION_CHUNK)]


def _inputs(into: dict):
    """add(name, x) for _Capture: appends x as [positions, K] float32 to into[name]."""
    import torch

    return lambda name, x: into.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]).to(torch.float32))


def compensated_target(w, X, Xq, damp: float = GPTQ_DAMP):
    """The weight [K, N] (float32) that a matrix whose inputs arrive as Xq should have for its outputs to be the
    float model's, w [K, N] on X, and the H [K, K] (float64) to round it against: X and Xq lists of [positions, K]
    float32 pieces, the matrix's inputs in the float model and in the model whose earlier matrices (and embedding
    table) already hold their codes. The least-squares solution of Xq W' = X w: W' = w + (H + damp I)^-1 Xq^T
    (X - Xq) w, H = Xq^T Xq, damped as gptq_quantize_ref damps it; products and sums in float64. Rounding W'
    against H (GPTQ) then keeps the outputs close to the float model's on inputs like the text's, where rounding
    w against the float model's H would leave every earlier matrix's error in them: that error is the same at
    every position, and adds up in the long-memory states."""
    import torch

    H = D = 0
    for x, xq in zip(X, Xq, strict=True):
        # float64 throughout: the two models' inputs differ by little, and float32 products of that difference
        # summed over a piece moved a trained model's worst state 1.3x further from the float model
        xq64 = xq.to(torch.float64)
        H = H + xq64.t() @ xq64
        D = D + xq64.t() @ (x.to(torch.float64) - xq64)
    Hd = H.clone()
    diag = Hd.diagonal()
    diag[diag <= 0] = 1.0
    Hd += damp * float(diag.mean()) * torch.eye(Hd.shape[0], dtype=torch.float64)
    w64 = w.detach().to(torch.float64)
    try:
        target = w64 + torch.linalg.solve(Hd, D @ w64)
    except torch.linalg.LinAlgError as e:  # NaN or infinite activations in the calibration text's pass
        raise SsmrtError(f"GPTQ: the calibration activations' products cannot be inverted ({str(e).splitlines()[0]})"
                         ) from None
    return target.to(torch.float32), H


def _use_codes(owner, attr: str, codes, info: dict):
    """Makes owner.attr (an nn.Linear) compute as its codes say, as the artifact computes it: the weight the codes
    mean, and with int8 activations its input quantised first (dequantized_model's arithmetic). Returns the
    function that puts it back as it was."""
    import torch

    linear = getattr(owner, attr)
    weight, before = linear.weight, getattr(owner, "dt_input", None)
    linear.weight = torch.nn.Parameter(dequantize_ref(*codes, weight.shape[1]).t().contiguous(), requires_grad=False)
    int8_inputs = info.get("activations", RECORDED_DEFAULT_ACTIVATIONS) == "int8"
    if int8_inputs and attr == "dt_proj":  # applied as a bare matmul of its weight: its input is dt_input's output
        owner.dt_input = lambda dt, block=info["block_size"]: quantize_activations_ref(
            dt if before is None else before(dt), block)
    elif int8_inputs:
        setattr(owner, attr, _quantized_input(linear, info["block_size"]))

    def undo():
        setattr(owner, attr, linear)
        linear.weight = weight
        if attr == "dt_proj":
            owner.dt_input = before

    return undo


def _table_rows(rows, info: dict):
    """Embedding rows [..., d_model] as the artifact's table holds them (quantised along d_model, as
    dequantized_model quantises the table), or as they are where the table stays float."""
    if info.get("embedding", RECORDED_DEFAULT_EMBEDDING) == "float32":
        return rows
    flat = rows.reshape(-1, rows.shape[-1])
    return fake_quantize(flat.t(), SCHEMES[EMBEDDING], info["block_size"], info["symmetric"]).t().reshape(rows.shape)


def calibrated_codes(model, ids, info: dict) -> dict:
    """{name: (key, packed)} for every quantised matrix, in quantised_linears' order: GPTQ's codes
    (gptq_quantize_ref) for the scheme `info`, each matrix rounded against the inputs it gets once every matrix
    before it holds its codes, its weight first moved to make up for what they changed (compensated_target),
    packed as MatMulNBits holds them (pack_matmul_nbits), with the key (shape, digest of its float32 bytes) that
    finds the matrix's weight [K, N] in an export's graph (quantize_graph).

    The calibration ids go through the model a layer at a time in pieces of CALIBRATION_CHUNK tokens, each from
    an empty state, along two streams: the float model's and the quantised one's (the embedding table as the
    artifact holds it, the layers so far computing with their codes). A layer runs once on the float stream
    (every matrix's float inputs) and once on the quantised stream for each of its matrices (that matrix's
    inputs, the ones before it on their codes); the last, out_proj, carries the stream on from the inputs it
    took. Held at once: both streams' hidden states and residuals (4 x tokens x d_model values), one layer's
    float inputs, one matrix's products, and the packed codes so far. The model is left as it came, also after an error.
    calibrated_codes_ref computes the same codes through the whole model, one matrix at a time."""
    import torch

    from .ops import dispatch

    linears = {name: (owner, attr) for name, owner, attr in quantised_linears(model)}
    out: dict = {}
    undo: list = []

    def round_one(name, X, Xq):
        owner, attr = linears[name]
        w = getattr(owner, attr).weight.detach().t()
        key = (tuple(w.shape), _digest(w.numpy()))
        target, H = compensated_target(w, X, Xq)
        codes = gptq_quantize_ref(target, H, info["bits"], info["block_size"], info["symmetric"])
        out[name] = (key, pack_matmul_nbits(*codes, info["bits"]))
        return codes

    try:
        with torch.no_grad():
            pieces = _pieces(ids)
            float_stream = [(model.backbone.embeddings(piece), None) for piece in pieces]
            # the table as the artifact holds it, then its rows (as calibrated_codes_ref and dequantized_model
            # have them): the same arithmetic on the gathered rows instead gave some scales another last bit
            table = _table_rows(model.backbone.embeddings.weight.detach(), info)
            quant_stream = [(torch.nn.functional.embedding(piece, table), None) for piece in pieces]
            del table
        for i, layer in enumerate(model.backbone.layers):
            names = [n for n in linears if n.startswith(f"backbone.layers.{i}.")]
            X: dict = {}
            with _Capture(model, names, _inputs(X)), torch.no_grad():
                float_stream = [layer(h, r, None, None)[:2] for h, r in float_stream]
            carried = False
            for name in names:
                Xq: dict = {}
                with _Capture(model, [name], _inputs(Xq)), torch.no_grad():
                    residuals = [layer(h, r, None, None)[1] for h, r in quant_stream]
                rows = Xq.pop(name)
                codes = round_one(name, X.pop(name), rows)
                owner, attr = linears[name]
                undo.append(_use_codes(owner, attr, codes, info))
                if attr == "out_proj":
                    # the mixer's last op: on the inputs just taken, the rounded layer's output, without another pass
                    with torch.no_grad():
                        quant_stream = [(getattr(owner, attr)(x.reshape(*h.shape[:-1], x.shape[-1])), res)
                                        for x, (h, _), res in zip(rows, quant_stream, residuals, strict=True)]
                    carried = True
                del Xq, rows, residuals
            if not carried:
                with torch.no_grad():
                    quant_stream = [layer(h, r, None, None)[:2] for h, r in quant_stream]
            while undo:
                undo.pop()()
        # the head's input is the final norm's output, taken as it is made: the logits (a piece's 512 x vocab
        # floats, 100 MB at a 50k vocabulary) are not needed for it
        norm_f = model.backbone.norm_f
        with torch.no_grad():
            X, Xq = ([dispatch.add_rmsnorm(h, r, norm_f.weight, norm_f.eps, False)[0].reshape(-1, h.shape[-1])
                      .to(torch.float32) for h, r in stream] for stream in (float_stream, quant_stream))
        round_one(HEAD, X, Xq)
    finally:
        while undo:
            undo.pop()()
    return out


def calibrated_codes_ref(model, ids, info: dict) -> dict:
    """calibrated_codes' codes ({name: (q, scales, zero points)}, unpacked) the plain way: for each matrix in
    turn, the whole float model and the whole quantised one (a copy, the embedding table as the artifact holds
    it and every matrix so far on its codes) run the calibration ids with a hook on that matrix."""
    import copy

    import torch

    quantised = copy.deepcopy(model)
    if info.get("embedding", RECORDED_DEFAULT_EMBEDDING) != "float32":
        table = quantised.backbone.embeddings
        head = quantised.lm_head.weight
        table.weight = torch.nn.Parameter(_table_rows(table.weight.detach(), info), requires_grad=False)
        quantised.lm_head.weight = torch.nn.Parameter(head.detach().clone(), requires_grad=False)  # unties it
    owners = {name: (owner, attr) for name, owner, attr in quantised_linears(quantised)}
    out = {}
    for name, owner, attr in quantised_linears(model):
        inputs = []  # the float model's, then the quantised one's
        for m in (model, quantised):
            into: dict = {}
            with _Capture(m, [name], _inputs(into)), torch.no_grad():
                for piece in _pieces(ids):
                    m(piece)
            inputs.append(into[name])
        target, H = compensated_target(getattr(owner, attr).weight.detach().t(), *inputs)
        out[name] = gptq_quantize_ref(target, H, info["bits"], info["block_size"], info["symmetric"])
        _use_codes(*owners[name], out[name], info)
    return out


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


def dequantized_model(model, info: dict, codes: dict | None = None):
    """The MambaLM `model` (float32, changed in place and returned) with every weight the export quantises
    replaced by what its codes mean, and with int8 activations each quantised matmul's input quantised as
    MatMulNBits does it: the model a quantised artifact computes, to fp32 rounding. A tied head gets its own
    (dequantised) matrix; the embedding table's rows are what their int8 codes mean where the artifact quantised
    it (info["embedding"]), as they were otherwise. Cast it to float64 after for a reference.
    codes: {name: (q, scales, zero_points)} (artifact_codes) for GPTQ-rounded weights, which cannot be rounded
    again from the model's own weights; round-to-nearest ones are computed from them (quantize_ref)."""
    import torch

    from .models.mamba import MambaLM

    if not isinstance(model, MambaLM):
        raise SsmrtError(f"dequantized_model(model) takes an ssmrt model, got {type(model).__name__}")
    if model.dtype != torch.float32:
        raise SsmrtError(f"dequantized_model: the weights are quantised from float32, the model is {model.dtype}")
    bits, block, sym = info["bits"], info["block_size"], info["symmetric"]
    if info.get("rounding", RECORDED_DEFAULT_ROUNDING) == "gptq" and codes is None:
        raise SsmrtError("dequantized_model: GPTQ-rounded weights need their codes from the artifact "
                         "(artifact_codes); the model's own weights do not give them again")

    with torch.no_grad():
        # _use_codes gives each matrix a new Parameter: a tied head is untied from the embedding
        for full_name, owner, name in quantised_linears(model):
            weight = getattr(owner, name).weight  # nn.Linear's [out, in] is the graph's B transposed: K = in
            if codes is None:
                matrix = quantize_ref(weight.detach().t(), bits, block, sym)
            elif full_name not in codes:
                raise SsmrtError(f"dequantized_model: the artifact holds no codes for {full_name}")
            else:
                matrix = tuple(torch.as_tensor(t) for t in codes[full_name])
                K, N = matrix[0].shape[1] * matrix[0].shape[2], matrix[0].shape[0]
                if N != weight.shape[0] or not weight.shape[1] <= K < weight.shape[1] + block:
                    raise SsmrtError(f"dequantized_model: the artifact's codes for {full_name} are a [{K}, {N}] "
                                     f"matrix (padded to whole blocks); the model's is [{weight.shape[1]}, "
                                     f"{weight.shape[0]}]")
            _use_codes(owner, name, matrix, info)
        table = model.backbone.embeddings
        table.weight = torch.nn.Parameter(_table_rows(table.weight.detach(), info), requires_grad=False)
    return model


# ----------------------------------------------------------------------------------- the graph


def expected_matmuls(config) -> int:
    """How many weight matmuls an export of this config quantises: the layers' projections and the head."""
    return config.n_layer * len(LAYER_LINEARS[config.arch]) + 1


def quantize_graph(proto, info: dict, expected: int, calibration: dict | None = None):
    """proto (an export's ModelProto) with every MatMul by a constant 2-D weight as MatMulNBits, packed by ONNX
    Runtime's quantiser; the fallback bodies (model-local functions) are left as they are. `expected`: how
    many such matmuls the model has (expected_matmuls); a different count is an exporter bug and raises.
    calibration: calibrated_codes' {name: (key, packed codes)} for GPTQ rounding, a graph weight found by its
    key (its shape and bytes: the exporter copies each matrix as it is): every packed node then holds GPTQ's
    codes, and `info` (the metadata entry) gets rounding "gptq" and calibrated_nodes {name: MatMulNBits node
    name}."""
    import logging

    import onnx
    from onnx import numpy_helper

    # importing ONNX Runtime's quantiser calls logging.basicConfig(level=INFO): the caller's root logger, left as
    # it was, or every INFO line of every library in the process would print from then on
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers

    _fold_weight_transposes(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    matmuls = [n for n in proto.graph.node
               if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    weights = [n.name for n in matmuls]
    if len(weights) != expected:
        raise SsmrtError(f"the exported graph has {len(weights)} weight MatMuls where the model has {expected} "
                         "projections and a head; refusing to quantise a graph of unknown shape")
    by_output = {}  # a calibrated MatMul's output -> the name of its matrix
    if calibration is not None:
        by_bytes: dict = {}
        for name, (key, _) in calibration.items():
            if key in by_bytes:
                raise SsmrtError(f"cannot calibrate {by_bytes[key]} and {name}: their weights are identical, so "
                                 "the graph does not say which matmul is which")
            by_bytes[key] = name
        for n in matmuls:
            w = numpy_helper.to_array(inits[n.input[1]])
            name = by_bytes.get((tuple(w.shape), _digest(w)))
            if name is None:
                raise SsmrtError(f"the graph's weight {n.input[1]} matches none of the model's projections; "
                                 "refusing to calibrate a graph of unknown shape")
            by_output[n.output[0]] = name
        if sorted(by_output.values()) != sorted(calibration):
            raise SsmrtError("the graph's weight MatMuls are not the model's projections one to one; refusing to "
                             "calibrate a graph of unknown shape")
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
    if calibration is not None:
        nodes = {}
        names_used = {n.name for n in out.graph.node if n.op_type != "MatMulNBits"}
        out_inits = {t.name: t for t in out.graph.initializer}
        for node in packed:
            name = by_output[node.output[0]]
            _store_codes(node, out_inits, calibration[name][1], info["symmetric"])
            if not node.name or node.name in names_used:  # the metadata finds each matrix's node by its name
                node.name = f"ssmrt.calibrated.{name}"
            names_used.add(node.name)
            nodes[name] = node.name
        info["rounding"], info["calibrated_nodes"] = "gptq", nodes
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


def _digest(a) -> str:
    import hashlib

    import numpy as np

    # row by row: the digest of the whole array's bytes without a contiguous float32 copy of all of it (a
    # transposed view of a 50k-vocabulary head would be one)
    h = hashlib.sha256()
    a = np.asarray(a)
    rows = a.reshape(1, -1) if a.ndim < 2 else a.reshape(-1, a.shape[-1])
    for r0 in range(0, len(rows), 64):
        h.update(np.ascontiguousarray(rows[r0:r0 + 64], dtype=np.float32))
    return h.hexdigest()


def pack_matmul_nbits(q, scales, zero_points, bits: int):
    """MatMulNBits' initializers for codes in quantize_ref's layout (q [N, k_blocks, block_size], scales
    [N, k_blocks], zero points [N, k_blocks]; torch or numpy): (B [N, k_blocks, block_size * bits / 8] uint8,
    two 4-bit codes a byte, the first in the low nibble; scales [N, k_blocks] float32; zero points [N,
    k_blocks * bits / 8 rounded up] uint8, two 4-bit ones a byte likewise). The padding the kernels never read
    as ONNX Runtime's quantiser writes it: the codes past K as given (quantize_ref's zeros), beside a row's odd
    last 4-bit zero point an 8. unpack_matmul_nbits reads them back."""
    import numpy as np

    q, scales, zp = (np.asarray(t) for t in (q, scales, zero_points))
    q, zp = q.astype(np.uint8), zp.astype(np.uint8)
    N, blocks, block = q.shape
    if bits == 8:
        return np.ascontiguousarray(q), scales.astype(np.float32), np.ascontiguousarray(zp)
    packed = (q[..., 0::2] & 0x0F) | ((q[..., 1::2] & 0x0F) << 4)
    zp = np.concatenate([zp, np.full((N, blocks % 2), 1 << (bits - 1), np.uint8)], axis=1)
    zp_packed = (zp[:, 0::2] & 0x0F) | ((zp[:, 1::2] & 0x0F) << 4)
    return (np.ascontiguousarray(packed, dtype=np.uint8), scales.astype(np.float32),
            np.ascontiguousarray(zp_packed, dtype=np.uint8))


def _store_codes(node, initializers: dict, arrays, symmetric: bool) -> None:
    """Writes packed codes (pack_matmul_nbits' arrays) into the initializers a MatMulNBits node reads, in the
    shapes ONNX Runtime's quantiser gave them; any other size raises (a layout this code does not know)."""
    import numpy as np
    from onnx import numpy_helper

    inputs = [node.input[1], node.input[2]] + ([node.input[3]] if len(node.input) > 3 and node.input[3] else [])
    if len(inputs) < 3 and not symmetric:  # the kernels would take the middle code for every zero point
        raise SsmrtError(f"{node.name}: ONNX Runtime's quantiser left out the zero points of an asymmetric scheme")
    for name, a in zip(inputs, arrays[:len(inputs)], strict=True):
        old = initializers[name]
        if int(np.prod(old.dims)) != a.size or old.data_type != numpy_helper.from_array(a[:0]).data_type:
            raise SsmrtError(f"{node.name}: {name} holds {list(old.dims)} values of type {old.data_type}; GPTQ's "
                             f"codes pack to {list(a.shape)} of {a.dtype}")
        old.CopyFrom(numpy_helper.from_array(a.reshape(tuple(old.dims)), name))


def artifact_codes(onnx_path, info: dict) -> dict:
    """{name: (q, scales, zero points)} of a GPTQ-rounded artifact's quantised matrices, read from the
    MatMulNBits nodes its metadata names (info["calibrated_nodes"]), in quantize_ref's layout."""
    import onnx

    nodes = info.get("calibrated_nodes") or {}
    try:
        model = onnx.load(str(onnx_path))
    except Exception as e:  # noqa: BLE001  (a file onnx cannot parse: one line, naming it)
        raise SsmrtError(f"{onnx_path}: cannot read its weights ({str(e).splitlines()[0]})") from None
    inits = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    missing = [node for node in nodes.values() if node not in by_name]
    if missing:
        raise SsmrtError(f"{onnx_path}: its metadata names MatMulNBits node {missing[0]}, which the graph lacks")
    return {name: unpack_matmul_nbits(by_name[node], inits) for name, node in nodes.items()}


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

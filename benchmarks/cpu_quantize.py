"""CPU benchmark: int8 / int4 weight-only artifacts (export --weights) against the float32 one of the same model.

    python benchmarks/cpu_quantize.py [--layers 24] [--blocks 6] [--block-steps 8] [--block-sizes 32 ...]
                                      [--train-seconds 90] [--json OUT]

- decode ms/token: the 130M-class random Mamba-2 of benchmarks/cpu_precision.py, exported float32, float16, int8
  and int4 (block 32; int8 and float32 activations), batch 1, ONNX Runtime's CPU provider with the native ops, in
  alternating blocks of --block-steps steps in one process; the figure is the median of the per-block ratios to
  float32. Each --block-sizes size other than the default adds int8 and int4 artifacts at that block size.
- quality: the demo's byte-level Mamba-2 trained for --train-seconds (random weights say nothing about what
  quantisation costs a model that has learnt something), exported float32, float16, int8 and int4 (block 32,
  asymmetric; int8 and float32 activations); `ssmrt compare`'s figures against the unquantised float64 model over
  a 64-byte prompt from the corpus and 64 teacher-forced steps (KL mean and max, top-1, top-5), the free-running
  first difference over 64 bytes, the verdict of the float16 band (compare --band float16: as close to the model
  as float16 is?) and the artifact's own verdict (compare's default judges). The int8 and int4 artifacts again
  with GPTQ rounding (export --calibration): the calibration text CALIBRATION_WINDOWS windows of
  CALIBRATION_BYTES bytes spread over the corpus's first half, which the prompt (its middle) is not in; and int8
  with GPTQ, float32 activations and the embedding table kept float32 (export --embedding float32).
- formats: the same trained model's layer projections in each block format, ssmrt's (at each --block-sizes size)
  and llama.cpp's q8_0 / q4_0 at the same bits, each with the activations its matmuls quantise (int8 blocks of
  the weights' size for ssmrt's MatMulNBits, q8_0 for ggml's q8_0 / q4_0 dot products), the embedding and head
  float in all of them: KL / top-1 / top-5 against the float64 model over teacher-forced windows of the corpus.
  ggml's arithmetic is llama.cpp's own reference (the `gguf` package's quants, bit-exact with ggml's C); a
  matrix whose input width is not a multiple of 32 is float16 there, as llama.cpp's quantiser falls back to.
  Every format computed in float32 on plain torch, so the table compares formats, not kernels.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ssmrt.quantize import DEFAULT_BLOCK_SIZE, SYMMETRIC


def decode_ratios(layers: int, blocks: int, block_steps: int, block_sizes: list[int], tmp: Path) -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from cpu_precision import make_model

    from ssmrt.exporter import export_model
    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact

    model = make_model("mamba2", layers)
    arts = {w or "float32": export_model(model, tmp / f"dec-{w or 'f32'}", weights=w) for w in (None, "int8", "int4")}
    arts["float16"] = export_model(model, tmp / "dec-f16", dtype="float16")
    for w in ("int8", "int4"):
        arts[f"{w}, float32 activations"] = export_model(model, tmp / f"dec-{w}-f32a", weights=w, activations="float32")
        for b in block_sizes:
            if b != DEFAULT_BLOCK_SIZE:
                arts[f"{w}, block {b}"] = export_model(model, tmp / f"dec-{w}-b{b}", weights=w, block_size=b)
    sizes = {k: sum(p.stat().st_size for p in v.iterdir()) for k, v in arts.items()}
    runners = {k: OnnxRuntimeRunnerFromArtifact(v, provider="cpu", native_ops="on") for k, v in arts.items()}
    states = {}
    for k, r in runners.items():
        states[k] = r.forward(np.asarray([[1, 2, 3, 4]], dtype=np.int64), r.zero_state(1))[1]
    times = {k: [] for k in runners}
    tok = np.asarray([[7]], dtype=np.int64)
    for b in range(blocks + 1):  # the first round warms up
        for k, r in runners.items():
            t0 = time.perf_counter()
            st = states[k]
            for _ in range(block_steps):
                _, st = r.forward(tok, st)
            if b:
                times[k].append((time.perf_counter() - t0) / block_steps * 1e3)
    return {"layers": layers, "block_sizes": block_sizes, "file_MB": {k: v / 1e6 for k, v in sizes.items()},
            "ms_per_token_median": {k: statistics.median(v) for k, v in times.items()},
            "ratio_to_float32": {k: statistics.median([a / b for a, b in zip(v, times["float32"], strict=True)])
                                 for k, v in times.items()}}


CALIBRATION_WINDOWS = 32
CALIBRATION_BYTES = 256


def calibration_text(text: bytes) -> str:
    """CALIBRATION_WINDOWS windows of CALIBRATION_BYTES bytes spread evenly over the first half of `text` (ending
    well before its middle), one a line, as text (the corpus is Python source: ASCII but for a few bytes)."""
    end = len(text) // 2 - 1024
    step = (end - CALIBRATION_BYTES) // CALIBRATION_WINDOWS
    windows = [text[i * step: i * step + CALIBRATION_BYTES] for i in range(CALIBRATION_WINDOWS)]
    return "\n".join(w.decode("utf-8", errors="ignore") for w in windows)


def quality(ckpt: Path, tmp: Path) -> list[dict]:
    from ssmrt.compare import compare_runners, judges
    from ssmrt.demo import stdlib_corpus
    from ssmrt.exporter import export
    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact

    text = stdlib_corpus()
    prompt = list(text[len(text) // 2: len(text) // 2 + 64])  # the corpus's middle; a sample, not held out
    calibration = tmp / "calibration.txt"
    calibration.write_text(calibration_text(text), encoding="utf-8")
    variants = [("float32", {}), ("float16", {"dtype": "float16"})]
    for w in ("int8", "int4"):
        variants += [(w, {"weights": w}), (f"{w}, float32 activations", {"weights": w, "activations": "float32"})]
        variants += [(f"{w}, GPTQ", {"weights": w, "calibration": calibration}),
                     (f"{w}, float32 activations, GPTQ", {"weights": w, "activations": "float32",
                                                          "calibration": calibration})]
    # the closest an 8-bit artifact comes: GPTQ's codes, float32 activations, the embedding table kept float
    variants += [("int8, float32 activations, GPTQ, float32 embedding",
                  {"weights": "int8", "activations": "float32", "calibration": calibration, "embedding": "float32"})]
    rows = []
    for i, (name, kw) in enumerate(variants):
        art = export(ckpt, tmp / f"char-{i}", **kw)
        cand = OnnxRuntimeRunnerFromArtifact(art, provider="cpu")
        # the cost: against the unquantised model, judged by the float16 band
        rep = compare_runners(candidate=cand, prompt_ids=prompt, steps=64, free_steps=64,
                              **judges(ckpt, cand, band="float16"))
        own = compare_runners(candidate=cand, prompt_ids=prompt, steps=64, **judges(ckpt, cand))
        steps = [s.candidate for s in rep.steps]
        rows.append({"artifact": name, "kl_mean": float(np.mean([s.kl_mean for s in steps])),
                     "kl_max": float(np.max([s.kl_max for s in steps])),
                     "top1": float(np.mean([s.top1 for s in steps])), "top5": float(np.mean([s.top5 for s in steps])),
                     "free_first_difference": rep.free_run.first_difference,
                     "float16_band": rep.verdict.line, "float16_band_passed": rep.passed,
                     "own_verdict": own.verdict.line})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------- block formats side by side

# llama.cpp's formats at ssmrt's two widths: 32 weights a block, symmetric, a float16 scale (q4_0: the block's
# signed extreme / -8); their dot products quantise the activations to q8_0 (ggml's vec_dot_type for both).
PEER_FORMATS = {8: "Q8_0", 4: "Q4_0"}
GGML_BLOCK = 32
GGML_BYTES_PER_BLOCK = {"Q8_0": 34, "Q4_0": 18}


def ggml_round_trip(x, qtype: str):
    """x (..., K) float32 torch tensor through a ggml block format and back (gguf's quants: llama.cpp's reference
    arithmetic); K a multiple of 32."""
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    t = GGMLQuantizationType[qtype]
    flat = x.detach().to(torch.float32).reshape(-1, x.shape[-1]).cpu().numpy()
    return torch.from_numpy(dequantize(quantize(flat, t), t).reshape(x.shape)).to(x.dtype)


def format_model(base, arch: str, fmt: tuple):
    """A float32 copy of `base` whose layer projections compute as `fmt` says: ("ssmrt", bits, block_size) or
    ("ggml", bits): the weights quantised and dequantised, and a pre-hook that quantises each input as the
    format's matmul does."""
    import copy

    import torch

    from ssmrt.quantize import LAYER_LINEARS, dequantize_ref, quantize_activations_ref, quantize_ref

    m = copy.deepcopy(base).float()
    for layer in m.backbone.layers:
        for name in LAYER_LINEARS[arch]:
            lin = getattr(layer.mixer, name)
            w = lin.weight.data  # [N, K]
            K = w.shape[1]
            if fmt[0] == "ssmrt":
                _, bits, block = fmt
                w_q = dequantize_ref(*quantize_ref(w.t(), bits, block, SYMMETRIC), K).t()
                act = functools.partial(quantize_activations_ref, block_size=block)
            elif K % GGML_BLOCK:  # llama.cpp's quantiser keeps this one float16 (a float16 dot product)
                w_q = w.half().float()
                act = lambda x: x.half().float()  # noqa: E731
            else:
                qtype = PEER_FORMATS[fmt[1]]
                w_q = ggml_round_trip(w, qtype)
                act = functools.partial(ggml_round_trip, qtype="Q8_0")
            lin.weight.data = w_q.contiguous().to(torch.float32)
            lin.register_forward_pre_hook(lambda mod, args, act=act: (act(args[0]),))
    return m


def formats(ckpt: Path, block_sizes: list[int], windows: int = 4, length: int = 256) -> dict:
    import copy

    import torch

    from ssmrt.demo import stdlib_corpus
    from ssmrt.models.checkpoints import load_model

    base = load_model(ckpt).eval()
    arch = base.config.arch
    text = stdlib_corpus()
    starts = [len(text) * (i + 1) // (windows + 1) for i in range(windows)]  # spread over the corpus, not held out
    ids = torch.tensor([list(text[s:s + length]) for s in starts], dtype=torch.long)
    rows = []
    with torch.no_grad():
        ref = torch.log_softmax(copy.deepcopy(base).double()(ids)[0], -1)
        top5 = ref.topk(5, -1).indices
        for bits in (8, 4):
            cases = [(f"ssmrt int{bits}, block {b}", ("ssmrt", bits, b),
                      (b * bits / 8 + 4 + (0 if SYMMETRIC else bits / 8)) / b) for b in block_sizes]
            qtype = PEER_FORMATS[bits]
            cases.append((f"llama.cpp {qtype.lower()}", ("ggml", bits), GGML_BYTES_PER_BLOCK[qtype] / GGML_BLOCK))
            for name, fmt, bytes_per_weight in cases:
                out = torch.log_softmax(format_model(base, arch, fmt)(ids)[0].double(), -1)
                kl = (ref.exp() * (ref - out)).sum(-1)
                rows.append({"format": name, "bits": bits, "bytes_per_weight": bytes_per_weight,
                             "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
                             "top1": (out.argmax(-1) == ref.argmax(-1)).double().mean().item(),
                             # as compare's: the mean overlap of the five most likely tokens
                             "top5": (out.topk(5, -1).indices[..., :, None] == top5[..., None, :]).any(-1)
                             .double().mean().item()})
                print(json.dumps(rows[-1]), flush=True)
    return {"arch": arch, "positions": windows * length, "rows": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--block-steps", type=int, default=8)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[DEFAULT_BLOCK_SIZE],
                    help="block sizes for the decode timings and the formats table")
    ap.add_argument("--train-seconds", type=float, default=90.0)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-formats", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from ssmrt.errors import SsmrtError
    from ssmrt.quantize import check_weights

    for b in a.block_sizes:
        try:
            check_weights("int8", b)
        except SsmrtError as e:
            ap.error(str(e).replace("--block-size", "--block-sizes"))
    out = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not (a.skip_quality and a.skip_formats):
            from ssmrt.demo import train_char_model

            ckpt = tmp / "char"
            train_char_model(ckpt, seconds=a.train_seconds, log=lambda *a: None)
            if not a.skip_quality:
                out["quality"] = quality(ckpt, tmp)
            if not a.skip_formats:
                out["formats"] = formats(ckpt, a.block_sizes)
        if not a.skip_decode:
            out["decode"] = decode_ratios(a.layers, a.blocks, a.block_steps, a.block_sizes, tmp)
            print(json.dumps(out["decode"]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

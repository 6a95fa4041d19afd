"""CPU benchmark: int8 / int4 weight-only artifacts (export --weights) against the float32 one of the same model.

    python benchmarks/cpu_quantize.py [--layers 24] [--blocks 6] [--block-steps 8] [--train-seconds 90] [--json OUT]

- decode ms/token: the 130M-class random Mamba-2 of benchmarks/cpu_precision.py, exported float32, float16, int8
  and int4 (block 32; int8 and float32 activations), batch 1, ONNX Runtime's CPU provider with the native ops, in
  alternating blocks of --block-steps steps in one process; the figure is the median of the per-block ratios to
  float32.
- quality: the demo's byte-level Mamba-2 trained for --train-seconds (random weights say nothing about what
  quantisation costs a model that has learnt something), exported float32, float16, int8 and int4 (block 32,
  asymmetric; int8 and float32 activations); `ssmrt compare`'s figures against the unquantised float64 model over
  a 64-byte prompt from the corpus and 64 teacher-forced steps (KL mean and max, top-1, top-5), the free-running
  first difference over 64 bytes, the verdict of the float16 band (compare --band float16: as close to the model
  as float16 is?) and the artifact's own verdict (compare's default judges).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def decode_ratios(layers: int, blocks: int, block_steps: int, tmp: Path) -> dict:
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
    return {"layers": layers, "file_MB": {k: v / 1e6 for k, v in sizes.items()},
            "ms_per_token_median": {k: statistics.median(v) for k, v in times.items()},
            "ratio_to_float32": {k: statistics.median([a / b for a, b in zip(v, times["float32"], strict=True)])
                                 for k, v in times.items()}}


def quality(train_seconds: float, tmp: Path) -> list[dict]:
    from ssmrt.compare import compare_runners, judges
    from ssmrt.demo import stdlib_corpus, train_char_model
    from ssmrt.exporter import export
    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact

    ckpt = tmp / "char"
    train_char_model(ckpt, seconds=train_seconds, log=lambda *a: None)
    text = stdlib_corpus()
    prompt = list(text[len(text) // 2: len(text) // 2 + 64])  # the corpus's middle; a sample, not held out
    variants = [("float32", {}), ("float16", {"dtype": "float16"})]
    for w in ("int8", "int4"):
        variants += [(w, {"weights": w}), (f"{w}, float32 activations", {"weights": w, "activations": "float32"})]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--block-steps", type=int, default=8)
    ap.add_argument("--train-seconds", type=float, default=90.0)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not a.skip_quality:
            out["quality"] = quality(a.train_seconds, tmp)
        if not a.skip_decode:
            out["decode"] = decode_ratios(a.layers, a.blocks, a.block_steps, tmp)
            print(json.dumps(out["decode"]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

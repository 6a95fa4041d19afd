"""The main job through the Python API: checkpoint -> ONNX export -> stateful decoding on ONNX Runtime ->
parity report against the PyTorch reference.

    python samples/python_api.py [--model CHECKPOINT_DIR] [--workdir DIR]

Without --model it writes a small random Mamba-2 checkpoint first (HF layout).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ssmrt
from ssmrt.compare import compare_runners
from ssmrt.exporter import export
from ssmrt.models import MambaLM, SSMConfig, save_model
from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact, Session, TorchRunnerFromCheckpoint


def small_checkpoint(path: Path) -> Path:
    config = SSMConfig(arch="mamba2", d_model=64, n_layer=2, vocab_size=128, d_state=32, headdim=16, ngroups=2,
                       chunk_size=16)
    return save_model(MambaLM(config), path, overwrite=True)  # this sample's own directory, rewritten each run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=Path("samples_out"))
    args = ap.parse_args(argv)
    model_dir = args.model or small_checkpoint(args.workdir / "checkpoint")

    # 1. The reference: a torch.nn.Module whose forward(input_ids, state) returns (logits, new_state).
    model = ssmrt.load_model(model_dir)
    print(f"loaded {model_dir}: {model.config.arch}, {model.config.n_layer} layers")

    # 2. Export: one graph for prefill and decode, the scans as ssmrt::* nodes with fallback bodies.
    artifact = export(model_dir, args.workdir / "artifact", overwrite=True)  # replaces only an earlier export
    print(f"exported to {artifact}")

    # 3. Decode on ONNX Runtime: prefill, then one token at a time, the state kept between calls.
    runner = OnnxRuntimeRunnerFromArtifact(artifact)
    session = Session(runner)
    prompt = [1, 2, 3, 4, 5]
    print("greedy:", session.generate(prompt, max_new_tokens=12))
    print("batch of mixed lengths:", session.generate([prompt, [7], [9, 10, 11]], max_new_tokens=6))

    # A shared prefix, prefilled once, then continued three ways with sampling.
    session.prefill(prompt)
    shared = session.snapshot()
    session.restore(shared, fork=3)
    print("forked:", session.generate(None, max_new_tokens=6, temperature=0.9, top_k=40, seed=0))

    # 4. Parity: the same prompt through the reference and the artifact, then teacher-forced steps.
    report = compare_runners(TorchRunnerFromCheckpoint(model_dir), runner, prompt, steps=8)
    print(report.format())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

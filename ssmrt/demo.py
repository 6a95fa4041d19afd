"""The main job on any machine: a small model (trained here in about a minute, or one you name) -> generate.

The trained model is a byte-level Mamba-2 over the Python standard library's source, so what it writes
looks like Python. It is saved as an HF checkpoint directory (config.json + model.safetensors).
"""

from __future__ import annotations

import random
import sysconfig
import time
from pathlib import Path

from .errors import SsmrtError

BYTE_VOCAB = 256


def stdlib_corpus(max_bytes: int = 2_000_000) -> bytes:
    """Source of the running Python's standard library, in a fixed order, up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for p in sorted(root.glob("*.py")):
        data = p.read_bytes()
        parts.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"\n".join(parts)


def char_model_config(arch: str = "mamba2"):
    from .models.config import SSMConfig

    return SSMConfig(
        arch=arch,
        d_model=128,
        n_layer=3,
        vocab_size=BYTE_VOCAB,
        d_state=32,
        headdim=32,
        chunk_size=64,
        tie_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        source="ssmrt-demo",
    )


def _init_ssm_params(model, seed: int):
    """mamba_ssm's initialisation of the SSM parameters (A in [1, 16], dt in [1e-3, 1e-1])."""
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    for layer in model.backbone.layers:
        mixer = layer.mixer
        with torch.no_grad():
            n = mixer.A_log.shape[0]
            mixer.A_log.copy_(torch.log(torch.empty(mixer.A_log.shape).uniform_(1, 16, generator=g)))
            dt = torch.exp(torch.rand(n, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            inv_dt = dt + torch.log(-torch.expm1(-dt))
            bias = mixer.dt_bias if hasattr(mixer, "dt_bias") else mixer.dt_proj.bias
            bias.copy_(inv_dt)


def train_char_model(out_dir, seconds: float = 60.0, arch: str = "mamba2", seed: int = 0, log=print):
    """Train a byte-level model on the standard library's source for `seconds`, save it to out_dir."""
    import torch

    from .models.checkpoints import save_model
    from .models.mamba import MambaLM

    torch.manual_seed(seed)
    data = torch.frombuffer(bytearray(stdlib_corpus()), dtype=torch.uint8).long()
    model = MambaLM(char_model_config(arch))
    _init_ssm_params(model, seed)
    torch.nn.init.normal_(model.backbone.embeddings.weight, std=0.02)  # tied: also the output projection
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    seqlen, batch = 128, 16
    start, step, loss_avg = time.monotonic(), 0, None
    while time.monotonic() - start < seconds:
        idx = torch.tensor([rng.randrange(len(data) - seqlen - 1) for _ in range(batch)])
        chunk = torch.stack([data[i : i + seqlen + 1] for i in idx])
        logits, _ = model(chunk[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, BYTE_VOCAB), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        step += 1
        if step % 50 == 0:
            log(f"  step {step:4d}  loss {loss_avg:.3f} nats/byte  ({time.monotonic() - start:.0f}s)")
    loss = "no step taken" if loss_avg is None else f"final loss {loss_avg:.3f} nats/byte"
    log(f"  trained {step} steps in {time.monotonic() - start:.0f}s, {loss}")
    model.eval()
    from .runtime.tokenizer import TOKENIZER_FILE, byte_level_tokenizer_json

    return save_model(model, out_dir, layout="hf", extra_files={TOKENIZER_FILE: byte_level_tokenizer_json()})


# A day: a longer run of this small model learns nothing more, and a typo (an extra digit or three) would hold
# the machine for weeks before the demo said anything.
MAX_TRAIN_SECONDS = 86_400


def check_demo_args(train_seconds, prompt, max_new_tokens, temperature, top_k, seed, cli: bool = False) -> None:
    """Every argument of the demo, before any training; `cli` names the options as the command line spells
    them."""
    import math

    from .runtime.sampling import check_generation

    name = "--train-seconds" if cli else "train_seconds (--train-seconds)"
    if (isinstance(train_seconds, bool) or not isinstance(train_seconds, (int, float))
            or not math.isfinite(train_seconds) or not 0 < train_seconds <= MAX_TRAIN_SECONDS):
        raise SsmrtError(f"{name} must be a number of seconds in (0, {MAX_TRAIN_SECONDS:_}], got {train_seconds!r}")
    if not isinstance(prompt, str) or not prompt:
        raise SsmrtError(f"{'--prompt' if cli else 'prompt (--prompt)'} must be some text, got {prompt!r}")
    check_generation(max_new_tokens, temperature, top_k, 1.0, seed, (), cli=cli)


def run_demo(model_dir, workdir, train_seconds=60.0, prompt="class Parser:\n    def ", max_new_tokens=160,
             temperature=0.8, top_k=20, seed=0, log=print) -> bool:
    """Model -> export -> generate on ONNX Runtime -> compare with the reference. Returns the parity verdict.

    Every argument and both output directories (the trained model's, the artifact's) are checked first, so a
    mistake is refused before the training, not after it."""
    from .artifact import check_output
    from .compare import baseline_runner, compare_runners, reference_runner
    from .exporter import export
    from .fsutil import user_path
    from .models.checkpoints import check_save
    from .runtime import OnnxRuntimeRunnerFromArtifact, Session
    from .runtime.tokenizer import TOKENIZER_FILE, load_tokenizer

    check_demo_args(train_seconds, prompt, max_new_tokens, temperature, top_k, seed)
    workdir = user_path(workdir, "workdir (--workdir)")
    if model_dir is not None:
        model_dir = user_path(model_dir, "model_dir (--model)")
    artifact = workdir / "artifact"
    train = model_dir is None and not (workdir / "char-mamba2" / "config.json").is_file()
    if train:
        check_save(workdir / "char-mamba2", "hf", {TOKENIZER_FILE: ""})
    check_output(artifact, overwrite=True)  # the demo's own directory, rewritten on every run
    if model_dir is None:
        model_dir = workdir / "char-mamba2"
        if train:
            log(f"[1/4] training a byte-level Mamba-2 on the standard library's source for {train_seconds:.0f}s")
            train_char_model(model_dir, seconds=train_seconds, log=log)
        else:
            log(f"[1/4] reusing {model_dir}")
    else:
        log(f"[1/4] model: {model_dir}")
    log(f"[2/4] exporting to {artifact}")
    export(model_dir, artifact, overwrite=True)  # the demo's own directory, rewritten on every run
    runner = OnnxRuntimeRunnerFromArtifact(artifact)
    cfg = runner.config
    tok = load_tokenizer(artifact)
    ids = tok.encode(prompt) if tok is not None else [cfg.bos_token_id or 0]
    how = "greedy" if temperature <= 0 else f"temperature {temperature}, top-k {top_k}, seed {seed}"
    log(f"[3/4] generating on {runner.describe()}: {cfg.arch}, {cfg.n_layer} layers, d_model {cfg.d_model}; {how}")
    new = Session(runner).generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    log("-" * 72)
    log(tok.decode(ids + new) if tok is not None else " ".join(map(str, ids + new)))
    log("-" * 72)
    log("[4/4] parity of the artifact against the PyTorch reference (prefill, then teacher-forced steps)")
    report = compare_runners(reference_runner(model_dir), runner, ids, steps=16,
                             baseline=baseline_runner(model_dir, runner))
    log(report.format())
    return report.passed

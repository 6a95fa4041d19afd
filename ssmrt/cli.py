"""The `ssmrt` command line. Heavy imports (torch, onnx, onnxruntime) happen inside the commands."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

from .artifact import DEFAULT_OPSET, DTYPES, LOGITS_MODES, TARGETS
from .engine import ENGINE_KINDS, PLUGIN_MODES
from .errors import SsmrtError
from .quantize import ACTIVATIONS as WEIGHT_ACTIVATIONS
from .quantize import DEFAULT_ACTIVATIONS
from .quantize import EMBEDDINGS as WEIGHT_EMBEDDINGS
from .quantize import SCHEMES as WEIGHT_SCHEMES
from .runtime.backends import BACKENDS, NATIVE_OPS_MODES, OPT_LEVELS, PROVIDERS
from .runtime.decode_graph import MODES as DECODE_MODES

EXIT_USER_ERROR = 2
EXIT_MISMATCH = 1


class _Path(click.Path):
    """click.Path that refuses an empty string: click would hand on Path(""), which is the current directory, so
    `-o "$UNSET"` would write into wherever the command was run."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value == "":
            self.fail("is empty; give a path ('.' for the current directory)", param, ctx)
        return super().convert(value, param, ctx)


PATH = _Path(path_type=Path)


class _Group(click.Group):
    """Turns SsmrtError, and click's own refusals of a command's arguments (a value of the wrong type, an unknown
    option), into one line on stderr and exit 2; -v shows the traceback (or click's usage text)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SsmrtError as e:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            click.echo(f"ssmrt: error: {e}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except click.UsageError as e:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            message = " ".join(e.format_message().split())
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"ssmrt: error: {message}{hint}", err=True)
            sys.exit(EXIT_USER_ERROR)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Show full tracebacks and details.")
@click.version_option(package_name="ssmrt")
@click.pass_context
def main(ctx, verbose):
    """Export, run and check Mamba-style state space models."""
    ctx.obj = {"verbose": verbose}


def _parse_ids(text: str, option: str = "--prompt-ids") -> list[int]:
    """Comma-separated token ids; a float, a word or a negative number is refused naming `option`."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise SsmrtError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise SsmrtError(f"{option} is empty")
    if any(i < 0 for i in ids):
        raise SsmrtError(f"{option} must be token ids >= 0, got {text!r}")
    return ids


def _prompt(path, prompt, prompt_ids):
    """(token ids, tokenizer or None) from --prompt TEXT or --prompt-ids."""
    from .runtime.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    if prompt is not None and prompt_ids is not None:
        raise SsmrtError("give --prompt or --prompt-ids, not both")
    if prompt_ids is not None:
        return _parse_ids(prompt_ids), tok
    if prompt is None:
        raise SsmrtError("give --prompt TEXT or --prompt-ids 1,2,3")
    if tok is None:
        raise SsmrtError(f"{path}: has no tokenizer.json, so --prompt TEXT cannot be encoded; use --prompt-ids")
    ids = tok.encode(prompt)
    if not ids:
        raise SsmrtError("--prompt encodes to no tokens")
    return ids, tok


def _runner(path, backend, threads=0, provider="auto", opt_level="all", native_ops="auto", device=None,
            decode=None, dtype=None, kernels=None):
    """A runner for PATH: the ONNX Runtime options apply to an artifact, device / decode / dtype to a
    checkpoint directory on the torch backend."""
    from .engine import is_engine_dir
    from .runtime import is_artifact, runner_from_path
    from .runtime.limits import check_threads

    if not Path(path).exists():
        raise SsmrtError(f"{path}: no such file or directory")
    check_threads(threads, "--threads")
    # ONNX Runtime's options, given their non-default values: silently ignored, they would answer another
    # question than the one asked (--provider cuda, and the model ran on the CPU)
    ort_given = [name for name, value, default in (("--threads", threads, 0), ("--provider", provider, "auto"),
                                                   ("--opt-level", opt_level, "all"),
                                                   ("--native-ops", native_ops, "auto")) if value != default]
    if is_engine_dir(path) or backend == "tensorrt":
        for name, value in (("--device", device), ("--kernels", kernels), ("--dtype", dtype)):
            if value is not None:
                raise SsmrtError(f"{name} applies to the torch backend; {path} runs on TensorRT as it was built")
        if ort_given:
            raise SsmrtError(f"{ort_given[0]} applies to an artifact on ONNX Runtime; {path} runs on TensorRT")
        if decode not in (None, "eager", "cuda_graph"):
            raise SsmrtError(f"--decode {decode}: the TensorRT backend decodes eager or cuda_graph")
        return runner_from_path(path, "tensorrt", decode=decode or "cuda_graph")
    if is_artifact(path):
        for name, value in (("--device", device), ("--decode", decode), ("--kernels", kernels)):
            if value is not None:
                raise SsmrtError(f"{name} applies to the torch backend (a checkpoint directory); "
                                 f"{path} is an artifact: choose its device with --provider")
        runner = runner_from_path(path, backend, threads=threads, provider=provider, opt_level=opt_level,
                                  native_ops=native_ops)
        ctx = click.get_current_context(silent=True)
        if not runner.native_ops and native_ops == "auto" and ctx is not None and (ctx.find_root().obj or {}).get(
                "verbose"):
            click.echo(f"ssmrt: the ssmrt ops run on their fallback bodies: {runner.native_ops_note}", err=True)
        return runner
    ort_given = [name for name in ort_given if name != "--threads"]  # the torch backend takes --threads too
    if ort_given:
        raise SsmrtError(f"{ort_given[0]} applies to an artifact on ONNX Runtime; {path} is not one")
    if threads:
        import torch

        torch.set_num_threads(threads)
    return runner_from_path(path, backend, device=device or "cpu", decode=decode, dtype=dtype,
                            kernels={None: None, "triton": True, "aot": "aot"}[kernels])


def _runner_options(f):
    """The options of every command that runs a model: ONNX Runtime's and the torch backend's."""
    options = [
        click.option("--threads", type=int, default=0,
                     help="Intra-op threads of ONNX Runtime or torch (0: its default; at most the machine's CPUs)."),
        click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True,
                     help="ONNX Runtime execution provider."),
        click.option("--opt-level", type=click.Choice(OPT_LEVELS), default="all",
                     show_default=True, help="ONNX Runtime graph optimisation level."),
        click.option("--native-ops", type=click.Choice(NATIVE_OPS_MODES), default="auto", show_default=True,
                     help="ONNX Runtime on the CPU, float32: run the ssmrt ops as native kernels (built on first "
                          "use with the C++ compiler) instead of their fallback bodies; auto falls back to the "
                          "bodies where they cannot be built."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
                     help="Torch backend: where the model runs (cuda: the Triton kernels). [default: cpu]"),
        click.option("--kernels", type=click.Choice(["triton", "aot"]), default=None,
                     help="Torch backend on cuda: the Triton kernels as Triton launches them, or their AOT PTX "
                          "launched through the CUDA driver as a TensorRT plugin would. [default: triton]"),
        click.option("--decode", type=click.Choice(DECODE_MODES), default=None,
                     help="Torch and TensorRT backends: a one-token step eager, from static buffers (torch), or "
                          "as a replayed CUDA graph. [default: cuda_graph on a GPU, else eager]"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


# -------------------------------------------------------------------------------------------- export


@main.command()
@click.argument("model_dir", type=PATH)
@click.option("-o", "--output", "out_dir", type=PATH, required=True,
              help="Directory for model.onnx (+ external data) and the tokenizer files.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32",
              show_default=True, help="Weights and activations (A, D, dt biases stay float32).")
@click.option("--state-dtype", type=click.Choice(DTYPES), default="float32",
              show_default=True, help="The SSM state's dtype.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True)
@click.option("--logits", type=click.Choice(LOGITS_MODES), default="all", show_default=True,
              help="Logits for every position, or only the last (smaller prefill output).")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier ssmrt export in the output directory (a directory holding anything "
                   "else is refused all the same).")
@click.option("--target", type=click.Choice(TARGETS), default="portable", show_default=True,
              help="portable: one node per op, for any runtime. tensorrt: also prefill.onnx, each scan as a chain "
                   "of one-kernel nodes for TensorRT's AOT plugins (long prompts); the weights in one shared file.")
@click.option("--weights", type=click.Choice(tuple(WEIGHT_SCHEMES)), default=None,
              help="Quantise the projections and the LM head to int8 or int4 (ONNX Runtime's block-wise "
                   "MatMulNBits; ONNX Runtime only). [default: float weights]")
@click.option("--block-size", type=int, default=None,
              help="With --weights: input features per quantisation block, a power of two >= 16. [default: 32]")
@click.option("--activations", type=click.Choice(tuple(WEIGHT_ACTIVATIONS)), default=None,
              help="With --weights: what the quantised matmuls multiply. int8: each block of a row's inputs "
                   "quantised to int8 in the matmul (integer dot products, ONNX Runtime's fast kernels); float32: "
                   f"float activations, the weights the only approximation (slower). [default: {DEFAULT_ACTIVATIONS}]")
@click.option("--embedding", type=click.Choice(WEIGHT_EMBEDDINGS), default=None,
              help="With --weights: the token embedding table as int8 codes (a row dequantised as it is gathered) "
                   "or float32 (a larger file, one approximation less; a decode step reads one row either way). "
                   "[default: int8]")
@click.option("--calibration", type=PATH, default=None,
              help="With --weights: a UTF-8 text file (tokenised with MODEL_DIR's tokenizer) whose activations the "
                   "weights are rounded against (GPTQ) instead of to nearest: closer to the model on text like it. "
                   "[default: round to nearest]")
def export(model_dir, out_dir, dtype, state_dtype, opset, logits, overwrite, target, weights, block_size,
           activations, embedding, calibration):
    """Export MODEL_DIR (HF or mamba_ssm checkpoint) to ONNX with ssmrt::* ops.

    The output directory must be new, empty, or (with --overwrite) an earlier ssmrt export with nothing else
    in it; the new export is written beside it and swapped in, so an interrupted export leaves the old one."""
    from .exporter import export as do_export

    out = do_export(model_dir, out_dir, dtype=dtype, state_dtype=state_dtype, opset=opset, logits=logits,
                    overwrite=overwrite, target=target, weights=weights, block_size=block_size,
                    activations=activations, embedding=embedding, calibration=calibration)
    size = sum(p.stat().st_size for p in out.iterdir())
    click.echo(f"wrote {out} ({size / 1e6:.1f} MB): {', '.join(sorted(p.name for p in out.iterdir()))}")


# ------------------------------------------------------------------------------------------ generate


@main.command()
@click.argument("path", type=PATH)
@click.option("--prompt", default=None, help="Text, encoded with the model's tokenizer.json.")
@click.option("--prompt-ids", default=None, help="Comma-separated token ids.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Default: onnxruntime for an artifact, torch for a checkpoint directory.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 is off.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop-ids", default=None, help="Comma-separated ids that end generation (default: eos).")
@click.option("--stream", is_flag=True, help="Print tokens as they come.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Torch backend: the model's dtype. [default: float32]")
@_runner_options
def generate(path, prompt, prompt_ids, max_new_tokens, backend, temperature, top_k, top_p, seed, stop_ids, stream,
             as_json, dtype, **runner_opts):
    """Generate from an artifact (ssmrt export) or a checkpoint directory."""
    from .runtime import Session
    from .runtime.sampling import check_generation

    # every argument before the model loads: a typo costs no load, and names its option
    check_generation(max_new_tokens, temperature, top_k, top_p, seed, (), cli=True)
    stops = _parse_ids(stop_ids, "--stop-ids") if stop_ids else None
    ids, tok = _prompt(path, prompt, prompt_ids)
    runner = _runner(path, backend, dtype=dtype, **runner_opts)
    if stops is None:
        stops = [runner.config.eos_token_id] if runner.config.eos_token_id is not None else []
    session = Session(runner)
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_ids=stops)
    new: list[int] = []
    if stream and not as_json:
        shown = ""
        if tok is not None:
            click.echo(tok.decode(ids), nl=False)
        for t in session.stream(ids, max_new_tokens, **kwargs):
            new.append(t)
            if tok is None:
                click.echo(f"{t} ", nl=False)
                continue
            text = tok.decode(new)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                click.echo(text[len(shown):], nl=False)
                shown = text
        click.echo()
        return
    new = session.generate(ids, max_new_tokens, **kwargs)
    if as_json:
        out = {"backend": runner.describe(), "prompt_ids": ids, "generated_ids": new}
        if tok is not None:
            out["text"] = tok.decode(new)
            out["prompt"] = tok.decode(ids)
        click.echo(json.dumps(out))
    elif tok is not None:
        click.echo(tok.decode(ids) + tok.decode(new))
    else:
        click.echo(" ".join(map(str, new)))


# ------------------------------------------------------------------------------------------- compare


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="How to run ARTIFACT (default: onnxruntime for model.onnx).")
@click.option("--steps", type=int, default=16, show_default=True, help="Teacher-forced decode steps.")
@click.option("--free-steps", type=int, default=0, show_default=True,
              help="Then this many greedy tokens generated by each side on its own; reports where they first differ.")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Torch backend (ARTIFACT a checkpoint directory): the candidate model's dtype. [default: float32]")
@click.option("--reference-dtype", type=click.Choice(("float64", "float32")), default="float64", show_default=True,
              help="The PyTorch reference's precision (on the CPU).")
@click.option("--tolerance-dtype", type=click.Choice(DTYPES), default=None,
              help="Judge by this row of the tolerance table instead of the calibrated baseline.")
@click.option("--band", type=click.Choice(("float32", "float16", "bfloat16")), default=None,
              help="Judge against the unquantised model within the calibrated band of this precision (the baseline "
                   "the model in it on plain PyTorch): e.g. is an int8 artifact as close as float16 would be?")
@click.option("--atol", type=float, default=None, help="Judge by this absolute tolerance instead (with --rtol).")
@click.option("--rtol", type=float, default=None)
@click.option("--prompt", default=None)
@click.option("--prompt-ids", default=None)
@click.option("--prompt-len", type=int, default=16, show_default=True,
              help="Length of a random prompt (seed 0) when none is given.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="Draw error vs step (logits, conv and SSM states, the baseline's band) to this .png/.pdf/.svg.")
@click.option("--json", "as_json", is_flag=True)
@_runner_options
def compare(model_dir, artifact, backend, steps, free_steps, dtype, reference_dtype, tolerance_dtype, band, atol,
            rtol, prompt, prompt_ids, prompt_len, plot_path, as_json, **runner_opts):
    """Parity of ARTIFACT against the PyTorch reference of MODEL_DIR; exit 1 when it fails.

    Judged calibrated by default: ARTIFACT's error may be a stated factor of the error of the same model in
    ARTIFACT's precision on plain PyTorch ops (the baseline), at every step, for the logits and every layer's
    states. A quantised artifact is judged against its dequantised model, or with int8 activations by what its
    scheme costs (README). --band judges against another precision's band; --atol / --rtol / --tolerance-dtype
    by a fixed tolerance instead.
    ARTIFACT may be MODEL_DIR itself, to check the torch backend (e.g. --device cuda --dtype float16)."""
    import numpy as np

    from .compare import MAX_STEPS, check_plot_path, compare_runners, judges, plot_drift

    for name, v in (("--steps", steps), ("--free-steps", free_steps)):
        if not 0 <= v <= MAX_STEPS:
            raise SsmrtError(f"{name} must be between 0 and {MAX_STEPS}, got {v}")
    for name, v in (("--atol", atol), ("--rtol", rtol)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise SsmrtError(f"{name} must be a finite number >= 0, got {v}")
    if prompt is None and prompt_ids is None and prompt_len < 1:
        raise SsmrtError(f"--prompt-len must be >= 1, got {prompt_len}")
    calibrated = atol is None and rtol is None and tolerance_dtype is None
    if band is not None and not calibrated:
        raise SsmrtError("--band judges calibrated; it cannot be given with --atol, --rtol or --tolerance-dtype")
    if plot_path is not None:
        check_plot_path(plot_path)
    candidate = _runner(artifact, backend, dtype=dtype, **runner_opts)
    judged = judges(model_dir, candidate, reference_dtype, band)
    reference, original = judged["reference"], judged["original"]
    if candidate.config.to_dict() | {"source": ""} != reference.config.to_dict() | {"source": ""}:
        raise SsmrtError(f"{artifact}: its config differs from {model_dir}'s; compare an artifact with its own model")
    baseline = judged["baseline"] if calibrated else None
    if prompt is None and prompt_ids is None:
        ids = np.random.default_rng(0).integers(0, reference.config.vocab_size, prompt_len).tolist()
    else:
        ids, _ = _prompt(model_dir, prompt, prompt_ids)
    total = steps + 1 + free_steps
    if total >= 64:  # long runs show where they are (on stderr: the report on stdout stays clean)
        with click.progressbar(length=total, label="compare", file=sys.stderr) as bar:
            done = [0]

            def progress(n, _total):
                bar.update(n - done[0])
                done[0] = n

            report = compare_runners(reference, candidate, ids, steps, atol, rtol, tolerance_dtype,
                                     baseline=baseline, free_steps=free_steps, progress=progress,
                                     original=original, band=judged["band"])
    else:
        report = compare_runners(reference, candidate, ids, steps, atol, rtol, tolerance_dtype, baseline=baseline,
                                 free_steps=free_steps, original=original, band=judged["band"])
    if plot_path is not None:
        plot_drift(report, plot_path)
    click.echo(json.dumps(report.to_dict()) if as_json else report.format())
    sys.exit(0 if report.passed else EXIT_MISMATCH)


# ------------------------------------------------------------------------------------------- inspect


@main.command()
@click.argument("artifact", type=PATH)
@click.option("--json", "as_json", is_flag=True)
def inspect(artifact, as_json):
    """Ops, inputs/outputs, state sizes and config of an exported artifact (or what an engine directory from
    `ssmrt build` was built for)."""
    from .artifact import describe
    from .engine import is_engine_dir, read_sidecar
    from .quantize import describe_scheme

    if is_engine_dir(artifact):
        doc = read_sidecar(artifact)
        doc["engines"] = {name: [vars(p) for p in ps] for name, ps in doc["engines"].items()}
        if as_json:
            click.echo(json.dumps(doc))
            return
        cfg = doc["config"]
        click.echo(f"{artifact}: {cfg['arch']}, {cfg['n_layer']} layers, d_model {cfg['d_model']} "
                   f"({doc['export']['dtype']}); {doc['engine']} {doc['tensorrt']} for {doc.get('gpu')} "
                   f"({doc.get('sm')}), plugins {doc['plugins']}")
        for name, ps in doc["engines"].items():
            click.echo(f"  {name}: " + "; ".join(f"{p['name']} batch {p['batch'][0]}..{p['batch'][2]}, tokens "
                                                 f"{p['seqlen'][0]}..{p['seqlen'][2]}" for p in ps))
        return
    info = describe(artifact)
    if as_json:
        click.echo(json.dumps(info))
        return
    cfg = info["config"]
    click.echo(f"{info['path']}: {cfg['arch']}, {cfg['n_layer']} layers, d_model {cfg['d_model']}, "
               f"vocab {cfg['vocab_size']} ({info['export']['dtype']}, state {info['export']['state_dtype']}, "
               f"logits {info['export']['logits']}, opset {info['export']['opset']})")
    click.echo(f"weights: {describe_scheme(info['weights'])}")
    click.echo(f"parameters: {info['parameters']:,}  nodes: {info['nodes']}")
    click.echo("ops: " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()))
    click.echo(f"fallback functions: {', '.join(info['functions'])}")
    click.echo("inputs:")
    for t in info["inputs"][:3]:
        click.echo(f"  {t['name']}: {t['dtype']} {t['shape']}")
    click.echo("  ..." if len(info["inputs"]) > 3 else "", nl=len(info["inputs"]) > 3)
    click.echo("outputs:")
    for t in info["outputs"][:3]:
        click.echo(f"  {t['name']}: {t['dtype']} {t['shape']}")
    click.echo("  ..." if len(info["outputs"]) > 3 else "", nl=len(info["outputs"]) > 3)
    click.echo(f"state per sequence: {info['state_bytes_per_sequence'] / 1024:.1f} KiB "
               f"({info['state_layers']} layers x conv {info['conv_state_shape']} + ssm {info['ssm_state_shape']})")


# --------------------------------------------------------------------------------------------- build


@main.command()
@click.argument("artifact", type=PATH)
@click.option("-o", "--output", "out_dir", type=PATH, required=True,
              help="Engine directory: model.engine (+ prefill.engine), engine.json, the tokenizer files.")
@click.option("--max-batch", type=int, default=8, show_default=True, help="Largest batch the engines take.")
@click.option("--max-seq", type=int, default=2048, show_default=True, help="Longest prompt (tokens) in one call.")
@click.option("--opt-batch", type=int, default=None, help="Batch TensorRT tunes for. [default: 1]")
@click.option("--opt-seq", type=int, default=None, help="Prompt length TensorRT tunes for. [default: min(512, max)]")
@click.option("--plugins", type=click.Choice(PLUGIN_MODES), default="aot", show_default=True,
              help="aot: the ssmrt plugins' kernels embedded (no Python at run time; TensorRT >= 10.9); jit: "
                   "their Python on TensorRT's stream; none: the ops' fallback bodies (any TensorRT, e.g. "
                   "JetPack 6's 10.3).")
@click.option("--engine", "engine_kind", type=click.Choice(ENGINE_KINDS), default="tensorrt", show_default=True,
              help="tensorrt, or tensorrt-rtx (--plugins none only).")
@click.option("--timing-cache", type=PATH, default=None,
              help="Read TensorRT's timing cache from this file if it exists, and write it back updated.")
@click.option("--workspace", type=int, default=None, help="Workspace memory limit in MiB. [default: TensorRT's]")
@click.option("--overwrite", is_flag=True, help="Replace an earlier engine directory (nothing else).")
@click.option("--verbose", "build_verbose", is_flag=True, help="TensorRT's own messages.")
def build(artifact, out_dir, max_batch, max_seq, opt_batch, opt_seq, plugins, engine_kind, timing_cache, workspace,
          overwrite, build_verbose):
    """Build TensorRT engines from an ARTIFACT (ssmrt export) into a directory that appears whole or not at all.

    Profiles: decode (1 token) and prefill (2..--max-seq tokens), batch 1..--max-batch. An artifact exported
    with --target tensorrt gets a second engine for prompts, its scans as chains of one-kernel plugins."""
    from .engine.build import build as do_build

    if workspace is not None and workspace < 1:  # in MiB here; build() sees bytes
        raise SsmrtError(f"--workspace must be positive, got {workspace} (MiB)")
    out = do_build(artifact, out_dir, max_batch=max_batch, max_seq=max_seq, opt_batch=opt_batch, opt_seq=opt_seq,
                   plugins=plugins, timing_cache=timing_cache,
                   workspace=workspace * (1 << 20) if workspace is not None else None, verbose=build_verbose,
                   overwrite=overwrite, engine=engine_kind, echo=click.echo)
    click.echo(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--workdir", type=PATH, default=None,
              help="Where the tiny models, artifacts and engines go. [default: a temporary directory]")
def selftest(as_json, workdir):
    """What this machine can run, proved: for each family a tiny random model through export, every backend and
    build this machine has, 32 decode steps each, against the PyTorch reference. Exit 0 only if all it could
    run passed."""
    from .selftest import format_table, run_selftest

    report = run_selftest(workdir)
    click.echo(json.dumps(report) if as_json else format_table(report))
    if not report["passed"]:
        sys.exit(1)


# --------------------------------------------------------------------------------------------- bench


@main.command()
@click.argument("path", type=PATH)
@click.option("--backend", type=click.Choice(BACKENDS), default=None)
@click.option("--prompt-len", type=int, default=512, show_default=True)
@click.option("--decode-steps", type=int, default=64, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--repeat", type=int, default=3, show_default=True, help="Prefill runs; the median counts.")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Torch backend: the model's dtype. [default: float32]")
@click.option("--floors/--no-floors", default=True, show_default=True,
              help="Also time the device's copy bandwidth and GEMM rate (a few seconds) and report the decode "
                   "and prefill times against the floors they set.")
@click.option("--logits", type=click.Choice(["last", "all"]), default="last", show_default=True,
              help="The positions whose logits the prefill returns: the last only, as generation asks, or all.")
@_runner_options
@click.option("--json", "as_json", is_flag=True)
def bench(path, backend, prompt_len, decode_steps, batch, repeat, dtype, floors, logits, as_json, **runner_opts):
    """Prefill tokens/s and decode ms/token of an artifact or checkpoint, against the device's floors."""
    from .bench import bench_runner, check_bench_args
    from .runtime.limits import check_prefill_fits

    check_bench_args(prompt_len, decode_steps, batch, repeat, cli=True)
    runner = _runner(path, backend, dtype=dtype, **runner_opts)
    check_prefill_fits(runner, batch, prompt_len, "--batch x --prompt-len")
    res = bench_runner(runner, prompt_len, decode_steps, batch, repeat, progress=not as_json, floors=floors,
                       logits=logits)
    if as_json:
        click.echo(json.dumps(res))
        return
    prefill = f"{res['prefill_tokens_per_s']:.1f} tokens/s"
    decode = f"{res['decode_ms_per_token']:.2f} ms/token (median of {decode_steps} steps)"
    f = res.get("floors")
    if f is not None:
        prefill += (f" = {res['prefill_vs_floor']:.2f}x the time of the floor, {f['prefill_floor_tokens_per_s']:.0f} "
                    f"tokens/s (matmul FLOPs at {f['gemm_GFLOPps']:.0f} GFLOP/s)")
        decode += (f" = {res['decode_vs_floor']:.2f}x the floor, {f['decode_floor_ms']:.3g} ms "
                   f"({f['step_read_bytes'] / 1e6:.1f} MB of weights and state at {f['copy_bandwidth_GBps']:.1f} GB/s)")
    click.echo(f"{res['backend']}: prefill {prompt_len} tokens x batch {batch}: {prefill}")
    click.echo(f"  decode: {decode}")
    if floors and f is None:
        click.echo(f"  (no floors: this process cannot time the {runner.device_kind} device)")


# ---------------------------------------------------------------------------------------------- demo


@main.command()
@click.option("--model", "model_dir", type=PATH, default=None,
              help="A checkpoint directory to use instead of training the demo model.")
@click.option("--workdir", type=PATH, default=Path("demo_out"), show_default=True,
              help="Where the trained model and the artifact go.")
@click.option("--train-seconds", type=float, default=60.0, show_default=True,
              help="How long to train the byte-level demo model (reused if already trained); at most a day.")
@click.option("--prompt", default="class Parser:\n    def ", show_default=True)
@click.option("--max-new-tokens", type=int, default=160, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(model_dir, workdir, train_seconds, prompt, max_new_tokens, temperature, top_k, seed):
    """The whole pipeline on CPU: model -> export -> generate on ONNX Runtime -> compare report."""
    from .demo import check_demo_args, run_demo

    check_demo_args(train_seconds, prompt, max_new_tokens, temperature, top_k, seed, cli=True)  # before training
    ok = run_demo(model_dir, workdir, train_seconds, prompt, max_new_tokens, temperature, top_k, seed,
                  log=click.echo)
    sys.exit(0 if ok else EXIT_MISMATCH)


if __name__ == "__main__":
    main()

"""The `ssmrt` command line. Heavy imports (torch, onnx, tensorrt) happen inside the commands."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import SsmrtError


class _Group(click.Group):
    """Turns SsmrtError into one line on stderr and exit 2; -v shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SsmrtError as e:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            click.echo(f"ssmrt: error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Show full tracebacks and details.")
@click.version_option(package_name="ssmrt")
@click.pass_context
def main(ctx, verbose):
    """Export, run and check Mamba-style state space models."""
    ctx.obj = {"verbose": verbose}


@main.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="A checkpoint directory to use instead of training the demo model.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True,
              help="Where the trained model and artifacts go.")
@click.option("--train-seconds", type=float, default=60.0, show_default=True,
              help="How long to train the byte-level demo model (reused if already trained).")
@click.option("--prompt", default="class Parser:\n    def ", show_default=True)
@click.option("--max-new-tokens", type=int, default=160, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(model_dir, workdir, train_seconds, prompt, max_new_tokens, temperature, top_k, seed):
    """Train (or load) a small model and generate from it with the reference model."""
    from . import load_model
    from .demo import decode_bytes, encode_bytes, generate, train_char_model

    if model_dir is None:
        model_dir = workdir / "char-mamba2"
        if not (model_dir / "config.json").is_file():
            click.echo(f"Training a byte-level Mamba-2 on the standard library's source for {train_seconds:.0f}s")
            train_char_model(model_dir, seconds=train_seconds, log=click.echo)
    click.echo(f"Loading {model_dir}")
    model = load_model(model_dir)
    cfg = model.config
    byte_level = cfg.vocab_size == 256
    ids = encode_bytes(prompt) if byte_level else [cfg.bos_token_id or 0]
    new = generate(model, ids, max_new_tokens, temperature, top_k, seed)
    how = "greedy" if temperature <= 0 else f"temperature {temperature}, top-k {top_k}, seed {seed}"
    click.echo(f"{cfg.arch}, {cfg.n_layer} layers, d_model {cfg.d_model}; {how}, {max_new_tokens} new tokens:")
    click.echo("-" * 60)
    click.echo(prompt + decode_bytes(new) if byte_level else " ".join(map(str, ids + new)))
    click.echo("-" * 60)


if __name__ == "__main__":
    main()

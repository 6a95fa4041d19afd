"""The CLI and the README's commands, end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hf_models import HF_CONFIGS, hf_model, save_hf

from ssmrt.cli import main

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    """The commands in the README's quick start block."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```(?:sh|bash)?\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_exactly_the_two_commands():
    assert readme_commands() == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_help_is_light():
    """`ssmrt --help` must not import torch (it would take seconds)."""
    code = "import sys; from ssmrt.cli import main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "demo" in res.output


def test_demo_with_a_given_model(tmp_path):
    d = save_hf(hf_model("mamba2", **HF_CONFIGS[4][2]), tmp_path / "m")
    res = CliRunner().invoke(main, ["demo", "--model", str(d), "--max-new-tokens", "5", "--temperature", "0"])
    print(res.output)
    assert res.exit_code == 0, res.output
    generated = res.output.split("-" * 60)[1].split()
    assert len(generated) == 1 + 5 and all(t.isdigit() for t in generated)


def test_user_error_is_one_line_exit_2(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--model", str(tmp_path / "missing")])
    print(res.output)
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("ssmrt: error: ") and "missing" in lines[-1] and "no such directory" in lines[-1]
    assert "Traceback" not in res.output


def test_readme_demo_command(tmp_path):
    """The README's first command, with a short training run so the suite stays quick."""
    if not (ROOT / ".venv" / "bin" / "ssmrt").exists():
        pytest.skip("needs the .venv that `make test` creates")
    args = f"--train-seconds 4 --workdir {tmp_path} --max-new-tokens 40"
    res = subprocess.run(["make", "-s", "demo", f"DEMO_ARGS={args}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    print(res.stdout, res.stderr)
    assert res.returncode == 0
    assert "trained" in res.stdout and "class Parser:" in res.stdout
    assert (tmp_path / "char-mamba2" / "model.safetensors").is_file()
    # nothing half-written beside the checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["char-mamba2"]

"""The CLI and the README's commands, end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hf_models import hf_classes, hf_config, hf_model, save_hf

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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Mamba-2 checkpoint with a byte-level tokenizer, and its artifact (via the CLI)."""
    from ssmrt.runtime.tokenizer import byte_level_tokenizer_json

    family, kw = hf_config("mamba2-g1")
    config_cls, model_cls = hf_classes(family)  # skips the tests on this fixture without transformers
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)  # the same weights whichever tests ran before: greedy runs compared below stay comparable
    hf = model_cls(config_cls(vocab_size=256, **kw)).eval()
    ckpt = save_hf(hf, root / "ckpt")
    (ckpt / "tokenizer.json").write_text(byte_level_tokenizer_json())
    res = run(["export", str(ckpt), "-o", str(root / "art")])
    assert res.exit_code == 0, res.output
    assert "model.onnx" in res.output and "tokenizer.json" in res.output
    return ckpt, root / "art"


def run(args):
    res = CliRunner().invoke(main, args)
    print(res.output)
    return res


def test_generate_text_json_and_ids(tiny):
    ckpt, art = tiny
    res = run(["generate", str(art), "--prompt", "def f(", "--max-new-tokens", "8", "--json"])
    assert res.exit_code == 0
    out = json.loads(res.output)
    assert len(out["generated_ids"]) == 8 and all(isinstance(t, int) for t in out["generated_ids"])
    assert out["text"] == bytes(out["generated_ids"]).decode("utf-8", errors="replace")
    assert out["prompt_ids"] == list(b"def f(")
    # the checkpoint on torch gives the same tokens
    res_t = run(["generate", str(ckpt), "--prompt-ids", ",".join(map(str, b"def f(")), "--max-new-tokens", "8",
                 "--json"])
    assert json.loads(res_t.output)["generated_ids"] == out["generated_ids"]
    res_s = run(["generate", str(art), "--prompt", "def f(", "--max-new-tokens", "8", "--stream"])
    assert res_s.exit_code == 0 and res_s.output.startswith("def f(")
    res_p = run(["generate", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--temperature", "0.8",
                 "--top-k", "10", "--top-p", "0.9", "--seed", "3", "--json"])
    assert len(json.loads(res_p.output)["generated_ids"]) == 4


def test_native_ops_option(tiny):
    """--native-ops on / off: the same tokens, the backend says which ran; a checkpoint refuses the option."""
    from test_ort_ops import native_library

    native_library()
    ckpt, art = tiny
    outs = {}
    for mode in ("on", "off"):
        res = run(["generate", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--native-ops", mode,
                   "--json"])
        assert res.exit_code == 0
        outs[mode] = json.loads(res.output)
    assert outs["on"]["generated_ids"] == outs["off"]["generated_ids"]
    assert "native CausalConv1d/SSDScan" in outs["on"]["backend"] and "native" not in outs["off"]["backend"]
    res = run(["generate", str(ckpt), "--prompt-ids", "1,2", "--native-ops", "on"])
    assert res.exit_code == 2 and "--native-ops applies to an artifact" in res.output


def test_compare_passes_and_fails(tiny):
    ckpt, art = tiny
    res = run(["compare", str(ckpt), str(art), "--steps", "4", "--json"])
    assert res.exit_code == 0
    rep = json.loads(res.output)
    assert rep["passed"] and len(rep["steps"]) == 5 and rep["atol_needed"] < 1e-4
    res = run(["compare", str(ckpt), str(art), "--steps", "2", "--atol", "1e-12", "--rtol", "0"])
    assert res.exit_code == 1
    assert "FAILED" in res.output and "would have passed" in res.output


def test_compare_torch_backend_on_static_decode(tiny):
    """compare MODEL_DIR MODEL_DIR checks the torch backend itself (on a GPU: --device cuda, the CUDA graph)."""
    ckpt, _ = tiny
    res = run(["compare", str(ckpt), str(ckpt), "--decode", "static", "--steps", "3", "--json"])
    assert res.exit_code == 0
    rep = json.loads(res.output)
    assert rep["passed"] and "decode static" in rep["candidate"], rep
    # --dtype sets the candidate model's precision, --tolerance-dtype the row it is judged by
    res = run(["compare", str(ckpt), str(ckpt), "--dtype", "bfloat16", "--tolerance-dtype", "float32", "--steps",
               "2", "--json"])
    rep = json.loads(res.output)
    assert res.exit_code == 1 and rep["dtype"] == "float32" and "bfloat16" in rep["candidate"], rep
    res = run(["compare", str(ckpt), str(ckpt), "--dtype", "bfloat16", "--steps", "2", "--json"])
    rep = json.loads(res.output)
    assert rep["dtype"] == "bfloat16" and "bfloat16" in rep["candidate"], rep
    res = run(["bench", str(ckpt), "--dtype", "bfloat16", "--prompt-len", "8", "--decode-steps", "2",
               "--repeat", "1", "--json"])
    assert json.loads(res.output)["backend"] == "torch (bfloat16, cpu)"


@pytest.mark.gpu
def test_compare_torch_backend_on_cuda_graph(tiny):
    ckpt, _ = tiny
    res = run(["compare", str(ckpt), str(ckpt), "--device", "cuda", "--dtype", "float16", "--steps", "8"])
    assert res.exit_code == 0 and "decode cuda_graph" in res.output


def test_inspect_and_bench(tiny):
    _, art = tiny
    res = run(["inspect", str(art), "--json"])
    info = json.loads(res.output)
    assert info["ops"]["ssmrt::SSDScan"] == 2 and info["ops"]["ssmrt::CausalConv1d"] == 2
    assert info["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seqlen"]}
    assert run(["inspect", str(art)]).exit_code == 0
    res = run(["bench", str(art), "--prompt-len", "16", "--decode-steps", "4", "--repeat", "1", "--json",
               "--threads", "1", "--opt-level", "basic", "--logits", "all"])
    b, exact = json.loads(res.output), dict(rel=1e-9, abs=0)
    # the options reach the benchmark, and its figures agree with each other
    assert (b["batch"], b["prefill_tokens"], b["decode_steps"]) == (1, 16, 4)
    assert b["prefill_tokens_per_s"] == pytest.approx(16 / b["prefill_s"], **exact)
    assert b["decode_vs_floor"] == pytest.approx(b["decode_ms_per_token"] / b["floors"]["decode_floor_ms"], **exact)
    assert b["prefill_vs_floor"] == pytest.approx(b["floors"]["prefill_floor_tokens_per_s"] / b["prefill_tokens_per_s"],
                                                  **exact)
    # the floors are those of the tiny Mamba-2 counted by hand (d_model 64, d_inner 128, 8 heads of 16, 1 group,
    # d_state 16, conv width 4, 2 layers, vocab 256 tied), float32: matmul weights 2 layers x (in_proj
    # 64 x (2*128 + 2*16 + 8) + out_proj 128 x 64) + lm_head 64 x 256 = 70656; state a layer conv (128 + 2*16) x 3 +
    # ssm 8 x 16 x 16 = 2528 floats, 2 layers, read and written; a 16-token prefill with logits for every token
    f = b["floors"]
    step_bytes, prefill_flops = 4 * 70656 + 2 * 4 * 2 * 2528, 2 * 16 * 70656
    assert f["step_read_bytes"] == step_bytes == 323072
    assert f["decode_floor_ms"] == pytest.approx(1e3 * step_bytes / (f["copy_bandwidth_GBps"] * 1e9), **exact)
    assert f["prefill_floor_tokens_per_s"] == pytest.approx(16 * f["gemm_GFLOPps"] * 1e9 / prefill_flops, **exact)
    res = run(["bench", str(art), "--prompt-len", "8", "--decode-steps", "2", "--repeat", "1"])
    assert res.exit_code == 0 and "x the floor," in res.output and "GB/s" in res.output
    res = run(["bench", str(art), "--prompt-len", "8", "--decode-steps", "2", "--repeat", "1", "--no-floors"])
    assert res.exit_code == 0 and "floor" not in res.output


@pytest.mark.parametrize("args,fragment", [
    (["generate", "{tmp}/missing", "--prompt-ids", "1"], "no such file or directory"),
    (["generate", "{art}", "--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
    (["generate", "{art}", "--prompt-ids", "1", "--prompt", "a"], "not both"),
    (["generate", "{art}", "--prompt-ids", "999"], "outside the vocabulary"),
    (["generate", "{art}", "--prompt-ids", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "{art}", "--prompt-ids", "1", "--backend", "torch"], "is an ONNX artifact"),
    (["generate", "{ckpt}", "--prompt-ids", "1", "--backend", "onnxruntime"], "export it first"),
    (["export", "{ckpt}", "-o", "{ckpt}"], "holds 'config.json', which ssmrt did not write"),
    (["export", "{tmp}/missing", "-o", "{tmp}/out"], "no such directory"),
    (["inspect", "{ckpt}"], "model.onnx: not found"),
    (["compare", "{ckpt}", "{tmp}/missing"], "no such file or directory"),
    (["bench", "{art}", "--decode-steps", "0"], "--decode-steps must be an integer from 1 to"),
    (["compare", "{ckpt}", "{art}", "--device", "cuda"], "--device applies to the torch backend"),
    (["generate", "{ckpt}", "--prompt-ids", "1", "--decode", "cuda_graph"], "needs the model on a CUDA device"),
    (["generate", "{art}", "--prompt-ids", "1", "--kernels", "aot"], "--kernels applies to the torch backend"),
] + ([] if torch.cuda.is_available() else [
    (["bench", "{ckpt}", "--device", "cuda"], "sees no CUDA device"),
    (["generate", "{ckpt}", "--prompt-ids", "1", "--kernels", "aot"], "kernels 'aot' launches PTX on a CUDA GPU"),
]))
def test_user_errors(tiny, tmp_path, args, fragment):
    ckpt, art = tiny
    args = [a.format(tmp=tmp_path, art=art, ckpt=ckpt) for a in args]
    res = run(args)
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssmrt: error: ") and fragment in lines[0], lines
    assert "Traceback" not in res.output


def test_export_never_touches_what_ssmrt_did_not_write(tiny, tmp_path):
    """The careless user's cases: a stray model.onnx beside their files, an earlier export with a file added,
    an earlier export without --overwrite, outputs under a file or through a link. Each is one line, exit 2,
    and the tree (names and contents) is as it was; the output is checked before the checkpoint is loaded."""
    from test_fsutil import snapshot

    ckpt, art = tiny
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "model.onnx").write_text("not onnx")
    (proj / "notes.txt").write_text("important")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "link").symlink_to(proj)
    again = tmp_path / "again"
    assert run(["export", str(ckpt), "-o", str(again)]).exit_code == 0
    cases = [
        (["export", str(ckpt), "-o", str(proj)], "proj: holds 'data', which ssmrt did not write"),
        (["export", str(ckpt), "-o", str(proj), "--overwrite"], "proj: holds 'data', which ssmrt did not write"),
        (["export", str(ckpt), "-o", str(again)], "again: holds an earlier ssmrt export; pass --overwrite"),
        (["export", str(tmp_path / "no-ckpt"), "-o", str(tmp_path / "file.txt" / "out")], "file.txt is a file"),
        (["export", str(tmp_path / "no-ckpt"), "-o", str(tmp_path / "link")], "link: is a symbolic link"),
    ]
    for args, fragment in cases:
        before = snapshot(tmp_path)
        res = run(args)
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and fragment in lines[0], (args, lines)
        assert snapshot(tmp_path) == before, args
    (again / "my-eval.csv").write_text("1,2")
    before = snapshot(tmp_path)
    res = run(["export", str(ckpt), "-o", str(again), "--overwrite"])
    assert res.exit_code == 2 and "holds 'my-eval.csv', which ssmrt did not write" in res.output
    assert snapshot(tmp_path) == before
    (again / "my-eval.csv").unlink()
    res = run(["export", str(ckpt), "-o", str(again), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert snapshot(again) == snapshot(art)  # the same checkpoint exports to the same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "file.txt", "link", "proj"]


def test_verbose_shows_the_traceback(tmp_path):
    """-v lets the error through with its traceback instead of the one-line message."""
    from ssmrt import SsmrtError

    res = CliRunner().invoke(main, ["-v", "generate", str(tmp_path / "missing"), "--prompt-ids", "1"])
    assert res.exit_code != 0 and isinstance(res.exception, SsmrtError)
    assert "no such file or directory" in str(res.exception)
    assert "ssmrt: error:" not in res.output


def test_generate_text_without_tokenizer(tmp_path):
    d = save_hf(hf_model("mamba2-g1"), tmp_path / "m")
    res = run(["generate", str(d), "--prompt", "hello"])
    assert res.exit_code == 2 and "has no tokenizer.json" in res.output


def test_user_error_is_one_line_exit_2(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--model", str(tmp_path / "missing")])
    print(res.output)
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("ssmrt: error: ") and "missing" in lines[-1] and "no such directory" in lines[-1]
    assert "Traceback" not in res.output


@pytest.mark.slow
def test_readme_demo_command(tmp_path):
    """The README's first command, with a short training run so the suite stays quick."""
    if not (ROOT / ".venv" / "bin" / "ssmrt").exists():
        pytest.skip("needs the .venv that `make test` creates")
    args = f"--train-seconds 4 --workdir {tmp_path} --max-new-tokens 40"
    res = subprocess.run(["make", "-s", "demo", f"DEMO_ARGS={args}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    print(res.stdout, res.stderr)
    assert res.returncode == 0
    for fragment in ("trained", "exporting", "onnxruntime", "class Parser:", "PASSED"):
        assert fragment in res.stdout
    assert (tmp_path / "char-mamba2" / "model.safetensors").is_file()
    assert (tmp_path / "artifact" / "model.onnx").is_file() and (tmp_path / "artifact" / "tokenizer.json").is_file()
    # nothing half-written beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "char-mamba2"]

"""`ssmrt selftest`: what this machine can run, and the proof that it runs it.

First the environment: Python, torch and whether it sees a GPU (name, SM), Triton, cuda-python, ONNX Runtime
and its providers, TensorRT (version, plugin module, AOT plugins possible), TensorRT-RTX. Then, for each
family, a tiny random model goes through every path this machine has: export (portable and TensorRT target),
ONNX Runtime on the fallback bodies and on the native ops, the torch backend on the Triton kernels and on
their AOT PTX (GPU), and TensorRT engines in each plugin mode TensorRT here allows, each compared with the
PyTorch reference over a prompt and 32 decode steps. A path this machine lacks is skipped with the reason;
the report passes only if every path it could run passed.
"""

from __future__ import annotations

import importlib.util
import platform
import tempfile
import time
import traceback
from pathlib import Path

FAMILIES = {
    "mamba1": dict(arch="mamba1", d_model=32, n_layer=2, vocab_size=97, d_state=8),
    "mamba2": dict(arch="mamba2", d_model=48, n_layer=2, vocab_size=97, d_state=16, headdim=16, ngroups=2,
                   chunk_size=16),
}
STEPS = 32
PROMPT_LEN = 40  # long enough for the chunked prefill kernels and two SSD chain chunks


def tiny_model(arch_kw: dict, seed: int = 0):
    """A random MambaLM whose A, D, dt biases and norms are perturbed away from their initial values (so a
    mistake in any of them shows in the logits)."""
    import torch

    from .models import MambaLM, SSMConfig

    torch.manual_seed(seed)
    model = MambaLM(SSMConfig(**arch_kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "D", "norm.weight", "dt_bias")):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as e:  # installed but broken (a TensorRT wheel without its libraries)
        return f"broken ({str(e).splitlines()[0]})"


def environment() -> dict:
    env = {"python": platform.python_version(), "machine": platform.machine()}
    env["torch"] = _version("torch")
    env["gpu"] = env["sm"] = None
    if env["torch"]:
        import torch

        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            major, minor = torch.cuda.get_device_capability(0)
            env["sm"] = f"sm_{major}{minor}"
    env["triton"] = _version("triton")
    env["cuda_python"] = _version("cuda.bindings") if importlib.util.find_spec("cuda") else None
    env["onnxruntime"] = _version("onnxruntime")
    if env["onnxruntime"]:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    env["tensorrt"] = _version("tensorrt")
    env["tensorrt_plugin"] = bool(env["tensorrt"]) and not env["tensorrt"].startswith("broken") and \
        importlib.util.find_spec("tensorrt.plugin") is not None
    env["tensorrt_rtx"] = _version("tensorrt_rtx")
    return env


def _usable(version: str | None) -> bool:
    return bool(version) and not version.startswith("broken")


def _trt_modes(env: dict) -> dict[str, str | None]:
    """Plugin mode -> None if this machine can build and run it, else why not."""
    from .engine.build import MIN_TENSORRT_PLUGINS, version_tuple

    if not _usable(env["tensorrt"]):
        why = "TensorRT is not installed" if not env["tensorrt"] else f"TensorRT is {env['tensorrt']}"
        return dict.fromkeys(("aot", "jit", "none"), why)
    if env["gpu"] is None:
        return dict.fromkeys(("aot", "jit", "none"), "no CUDA GPU")
    out = {"none": None}
    plugin_why = None
    if version_tuple(env["tensorrt"]) < MIN_TENSORRT_PLUGINS:
        plugin_why = f"TensorRT {env['tensorrt']} < {'.'.join(map(str, MIN_TENSORRT_PLUGINS))} (no AOT plugins)"
    elif not env["tensorrt_plugin"]:
        plugin_why = "TensorRT has no tensorrt.plugin module"
    elif not _usable(env["triton"]):
        plugin_why = "Triton is not installed (the plugins' kernels are Triton's)"
    elif not _usable(env["cuda_python"]):
        plugin_why = "cuda-python is not installed (pip install 'ssmrt[gpu]')"
    out["aot"] = out["jit"] = plugin_why
    return out


def run_selftest(workdir=None) -> dict:
    """Runs every check this machine can run; returns {"environment", "checks": [...], "passed"}."""
    from .fsutil import make_work_dir

    root = make_work_dir(workdir, "--workdir") if workdir is not None else None  # before any check runs
    env = environment()
    checks = []
    with tempfile.TemporaryDirectory(prefix="ssmrt-selftest-") as tmp:
        root = root if root is not None else Path(tmp)
        for family, kw in FAMILIES.items():
            checks += _family_checks(family, kw, root / family, env)
    ran = [c for c in checks if c["status"] != "skip"]
    return {"environment": env, "checks": checks, "passed": bool(ran) and all(c["status"] == "pass" for c in ran)}


def _family_checks(family: str, kw: dict, root: Path, env: dict) -> list[dict]:
    import numpy as np

    from .compare import compare_runners
    from .exporter import export_model
    from .runtime import OnnxRuntimeRunner, TorchRunner

    model = tiny_model(kw)
    reference = TorchRunner(model)
    prompt = np.random.default_rng(0).integers(0, kw["vocab_size"], PROMPT_LEN).tolist()
    checks = []

    def check(name: str, why_not: str | None, fn):
        row = {"family": family, "check": name, "status": "skip", "detail": why_not or "", "seconds": 0.0}
        if why_not is None:
            t0 = time.monotonic()
            try:
                ok, detail = fn()
                row.update(status="pass" if ok else "fail", detail=detail)
            except Exception as e:  # a check that breaks is a failed check, reported with its cause
                row.update(status="fail", detail=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                row["traceback"] = traceback.format_exc(limit=3)
            row["seconds"] = round(time.monotonic() - t0, 2)
        checks.append(row)
        return row["status"] == "pass"

    def compared(candidate):
        report = compare_runners(reference, candidate, prompt, steps=STEPS)
        worst = max(s.candidate.max_abs for s in report.steps)
        return report.passed, f"{candidate.describe()}: max |dlogit| {worst:.2e}, tolerance {report.atol:g}"

    art, art_trt = root / "artifact", root / "artifact-tensorrt"
    exported = check("export (portable)", None, lambda: (export_model(model, art, overwrite=True).is_dir(), str(art)))
    exported_trt = check("export --target tensorrt", None,
                         lambda: (export_model(model, art_trt, target="tensorrt", overwrite=True).is_dir(),
                                  str(art_trt)))
    ort_why = None if _usable(env["onnxruntime"]) else "onnxruntime is not installed"
    check("onnxruntime, fallback bodies", ort_why or (None if exported else "the export failed"),
          lambda: compared(OnnxRuntimeRunner(art / "model.onnx", native_ops="off")))
    check("onnxruntime, prefill graph (chains' bodies)", ort_why or (None if exported_trt else "the export failed"),
          lambda: compared(OnnxRuntimeRunner(art_trt / "prefill.onnx", native_ops="off")))

    def native():
        from . import ort_ops

        try:
            ort_ops.library_path()
        except ort_ops.NativeOpsUnavailable as e:
            return True, f"skipped inside: {e}"
        return compared(OnnxRuntimeRunner(art / "model.onnx", native_ops="on"))

    check("onnxruntime, native ops", ort_why or (None if exported else "the export failed"), native)
    gpu_why = None if env["gpu"] else "no CUDA GPU"
    triton_why = gpu_why or (None if _usable(env["triton"]) else "Triton is not installed")
    check("torch, Triton kernels (CUDA graph decode)", triton_why,
          lambda: compared(TorchRunner(tiny_model(kw).cuda(), kernels=True)))
    aot_why = triton_why or (None if _usable(env["cuda_python"]) else "cuda-python is not installed")
    check("torch, AOT PTX through the CUDA driver", aot_why,
          lambda: compared(TorchRunner(tiny_model(kw).cuda(), kernels="aot")))
    for mode, why in _trt_modes(env).items():
        source = art_trt if mode != "none" else art
        why = why or (None if (exported_trt if mode != "none" else exported) else "the export failed")
        check(f"tensorrt, plugins {mode}", why, lambda source=source, mode=mode: _trt_check(source, root, mode,
                                                                                             compared))
    rtx_why = None if _usable(env["tensorrt_rtx"]) else "tensorrt-rtx is not installed"
    check("tensorrt-rtx build, plugins none", rtx_why or (None if exported else "the export failed"),
          lambda: _rtx_build(art, root))
    return checks


def _trt_check(artifact_dir: Path, root: Path, mode: str, compared):
    from .engine.build import build
    from .engine.runner import TensorRTRunner

    out = build(artifact_dir, root / f"engine-{mode}", max_batch=2, max_seq=64, plugins=mode, overwrite=True,
                echo=lambda line: None)
    ok_graph, detail_graph = compared(TensorRTRunner(out, decode="cuda_graph"))
    ok_eager, detail_eager = compared(TensorRTRunner(out, decode="eager"))
    return ok_graph and ok_eager, f"{detail_graph}; eager: {detail_eager.split(': ', 1)[-1]}"


def _rtx_build(artifact_dir: Path, root: Path):
    from .engine.build import build

    out = build(artifact_dir, root / "engine-rtx", max_batch=2, max_seq=64, plugins="none", engine="tensorrt-rtx",
                overwrite=True, echo=lambda line: None)
    size = sum(p.stat().st_size for p in out.iterdir())
    return True, f"built {out.name} ({size / 1e6:.1f} MB; running it needs an RTX GPU)"


def format_table(report: dict) -> str:
    env = report["environment"]
    lines = ["environment:"]
    for key in ("python", "machine", "torch", "gpu", "sm", "triton", "cuda_python", "onnxruntime", "tensorrt",
                "tensorrt_plugin", "tensorrt_rtx"):
        lines.append(f"  {key:16} {env.get(key) if env.get(key) not in (None, False) else '-'}")
    width = max(len(c["check"]) for c in report["checks"]) + 2
    lines.append("")
    lines.append(f"{'family':8} {'check':{width}} {'result':6} {'s':>6}  detail")
    for c in report["checks"]:
        lines.append(f"{c['family']:8} {c['check']:{width}} {c['status']:6} {c['seconds']:6.1f}  {c['detail']}")
    ran = [c for c in report["checks"] if c["status"] != "skip"]
    passed = sum(c["status"] == "pass" for c in ran)
    lines.append("")
    lines.append(f"{passed} of {len(ran)} checks that this machine can run passed; "
                 f"{len(report['checks']) - len(ran)} skipped" + ("" if report["passed"] else " -- FAILED"))
    return "\n".join(lines)

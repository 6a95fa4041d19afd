"""Device check of the TensorRT AOT path, in one command on a machine with a CUDA GPU: the `gpu` tests of the
driver-API launcher (each op's AOT PTX against its reference, whole models on kernels="aot"), then the decode
step and a prefill through the driver launcher timed against Triton's own launcher in the same run.

    python benchmarks/gpu_plugins.py [--json PATH]     # on a GPU; finishes within a few minutes
    python benchmarks/gpu_plugins.py --smoke           # no GPU: compiles one LaunchSpec and says what is left

Each timing is a ratio measured in this run: driver launcher / Triton launcher for the same kernel and
inputs, median of CUDA-event timings after a warm-up; eagerly (Python launch overhead included) and replayed
from a CUDA graph (the kernels alone: the driver JIT-compiles the PTX a plugin embeds, Triton loads its own
cubin, so this ratio is the code's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def environment() -> dict:
    import torch
    import triton

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "python": platform.python_version(),
           "torch": torch.__version__, "triton": triton.__version__}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        env["capability"] = f"sm_{major}{minor}"
    try:
        from cuda.bindings import driver

        env["cuda_driver"] = driver.cuDriverGetVersion()[1]
    except ImportError:
        env["cuda_driver"] = None
    return env


def run_gpu_tests(limit_s: int, select: str = "") -> dict:
    """The driver launcher's tests (each op, whole models) and the chain kernels' (each node against its reference,
    through Triton's launcher and the driver's), in a subprocess with a time limit."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_launcher.py",
           "tests/test_chains.py", "-m", "gpu or triton", "--no-header", *(["-k", select] if select else [])]
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return {"passed": False, "summary": f"timed out after {limit_s} s"}
    tail = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-500:]
    print(res.stdout[-4000:], res.stderr[-2000:])
    return {"passed": res.returncode == 0, "summary": tail}


def time_cuda(fn, repeat: int = 50) -> float:
    """Median milliseconds of fn() by CUDA events, after a warm-up."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_launchers() -> list[dict]:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from test_ops import selective_inputs, ssd_inputs

    from ssmrt.kernels.selective_scan import selective_scan
    from ssmrt.kernels.ssd_scan import ssd_scan
    from ssmrt.plugins.launch import use_launcher
    from ssmrt.plugins.launcher import DriverLauncher

    driver = DriverLauncher()
    cases = [
        ("ssd_scan decode, 80 heads x 64 x 128, batch 1, fp16", ssd_scan,
         ssd_inputs(1, 1, 80, 64, 128, dtype=torch.float16)),
        ("ssd_scan prefill L 2048 (chunked chain), 24 heads x 64 x 128, fp16", ssd_scan,
         ssd_inputs(1, 2048, 24, 64, 128, dtype=torch.float16, chunk_size=256)),
        ("selective_scan decode, 1536 x 16, batch 1, fp16", selective_scan,
         selective_inputs(1, 1, 1536, 16, dtype=torch.float16)),
        ("selective_scan prefill L 2048 (chain), 1536 x 16, fp16", selective_scan,
         selective_inputs(1, 2048, 1536, 16, dtype=torch.float16)),
    ]
    rows = []
    for name, fn, kw in cases:
        kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}

        def triton_launch(fn=fn, kw=kw):
            fn(**kw)

        def aot(fn=fn, kw=kw):
            with use_launcher(driver):
                fn(**kw)

        row = {"case": name}
        for how, run in (("triton", triton_launch), ("driver", aot)):
            row[f"{how}_launcher_ms"] = time_cuda(run)
            row[f"{how}_graph_ms"] = time_cuda(graphed(run))
        # eager: what a Python caller sees (launch overhead included); graph: the kernels alone, replayed as a
        # TensorRT engine's C++ runtime would enqueue them, so the ratio is the PTX's code against Triton's cubin
        row["driver_over_triton"] = row["driver_launcher_ms"] / row["triton_launcher_ms"]
        row["driver_over_triton_graph"] = row["driver_graph_ms"] / row["triton_graph_ms"]
        rows.append(row)
        print(json.dumps(row))
    return rows


def graphed(fn):
    """fn captured once in a CUDA graph (after a warm-up that compiles and loads its kernels); returns replay."""
    import torch

    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def smoke() -> int:
    """Without a GPU: the launch specs compile (what a TensorRT aot_impl would return) and the script says what
    it could not do here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from ssmrt.kernels import ssd_scan; from ssmrt.plugins.launcher import launch_spec; "
            "s = launch_spec('ssd_scan', 90, 'fp16', 'fp32', ssd_scan.constexprs(64, 128)); "
            "print(s.entry, s.block, s.shared, len(s.ptx))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(res.stdout.strip())
    if res.returncode:
        print(res.stderr[-2000:], file=sys.stderr)
    print("no GPU here: the driver-launcher tests and the timings need one (run this script without --smoke there)")
    return res.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="no GPU: compile one launch spec, time nothing")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--test-limit", type=int, default=300, help="seconds for the gpu tests")
    ap.add_argument("--tests", default="", help="only the tests pytest's -k selects (default: all of them)")
    args = ap.parse_args()
    if args.smoke:
        return smoke()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check here (--smoke checks this script)")
        return 2
    env = environment()
    print(json.dumps(env))
    tests = run_gpu_tests(args.test_limit, args.tests)
    rows = time_launchers()
    if args.json:
        args.json.write_text(json.dumps({"env": env, "tests": tests, "timings": rows}, indent=2))
    print(json.dumps({"tests": tests}))
    return 0 if tests["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

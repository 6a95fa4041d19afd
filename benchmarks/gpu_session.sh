#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run that writes what it found under OUT:
#
#   benchmarks/gpu_session.sh OUT [PEER_SRC]
#
#   OUT/env.txt            when, where and what: date, commit, GPU and driver, Python / torch / CUDA / Triton /
#                          ONNX Runtime / mamba_ssm versions, and the command
#   OUT/tests.log          the tests that run on the GPU (markers gpu and triton: the Triton kernels natively,
#                          the torch backend, the driver-API launcher, the chain nodes); TensorRT's skip here
#   OUT/tests.xml          the same as JUnit XML (each test's outcome and time)
#   OUT/gpu_kernels.log    benchmarks/gpu_kernels.py's report, and OUT/gpu_kernels.json its figures
#   OUT/summary.txt        one line per part: its exit status and seconds
#
# PEER_SRC: mamba_ssm's source tree (its sdist unpacked), the peer gpu_kernels.py measures against, put on the
# path without building anything: machines lent for a session often have no package index and no time to build
# its CUDA extensions. Its Triton kernels are all the benchmark calls. Where no built selective_scan_cuda is
# importable, its one unconditional import of that compiled extension is satisfied by a stand-in that raises when
# used, so the families that need the extension report "why not" instead of failing the import of the package.
#
# Each part runs under its own time limit (TESTS_S, BENCH_S seconds; defaults sized so that the whole run ends
# within eight minutes). A part that runs out is interrupted as Ctrl-C would (pytest then still writes its summary
# and the XML) and leaves its log: a machine lent for minutes returns what finished. The exit status is the first
# failing part's (124: a time limit; 137: a part that had to be killed 20 s after it).
set -uo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: benchmarks/gpu_session.sh OUT [PEER_SRC]" >&2
  exit 2
fi
out=$1
peer=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd) || exit 2
py=${PYTHON:-python3}
tests_s=${TESTS_S:-210}
bench_s=${BENCH_S:-240}

for var in TESTS_S BENCH_S; do
  v=${!var-}
  [ -z "${!var+set}" ] && continue
  case $v in '' | *[!0-9]* | 0*)
    echo "gpu_session.sh: $var must be a whole number of seconds from 1, got '$v'" >&2
    exit 2 ;;
  esac
done
if [ -n "$peer" ]; then
  if [ ! -f "$peer/mamba_ssm/__init__.py" ]; then
    echo "gpu_session.sh: PEER_SRC $peer is not mamba_ssm's source tree (no mamba_ssm/__init__.py in it)" >&2
    exit 2
  fi
  peer=$(cd "$peer" && pwd) || exit 2
fi
if [ -e "$out" ] && { [ ! -d "$out" ] || [ -n "$(ls -A "$out" 2>/dev/null)" ]; }; then
  echo "gpu_session.sh: OUT $out exists and is not an empty directory; give a new or empty one" >&2
  exit 2
fi
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd) || exit 2
cd "$root" || exit 2

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -n "$peer" ]; then
  PYTHONPATH="$PYTHONPATH:$peer"
  # The stand-in only where no built extension can be imported, and last on the path: it never hides a real one.
  if ! timeout 60 "$py" -c "import selective_scan_cuda" >/dev/null 2>&1; then
    stub=$(mktemp -d) || exit 2
    trap 'rm -rf "$stub"' EXIT
    cat >"$stub/selective_scan_cuda.py" <<'EOF'
"""Stand-in for mamba_ssm's compiled selective-scan extension, which this run did not build."""


def __getattr__(name):
    if name.startswith("__"):  # introspection (pickle, getattr with a default) gets a plain "no such attribute"
        raise AttributeError(name)
    raise ImportError(f"selective_scan_cuda.{name}: mamba_ssm's CUDA extension is not built on this machine")
EOF
    PYTHONPATH="$PYTHONPATH:$stub"
  fi
fi

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "command: benchmarks/gpu_session.sh $*"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(
    [ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || echo ' (with uncommitted changes)')"
  if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  else
    echo "gpu: no nvidia-smi on this machine"
  fi
  timeout 120 "$py" - <<'EOF' 2>&1
import importlib
import platform

print("python:", platform.python_version())


def first_line(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


for name in ("torch", "triton", "onnxruntime", "onnx", "mamba_ssm"):
    try:
        m = importlib.import_module(name)
    except Exception as e:  # the report says what is missing instead of stopping
        print(f"{name}: not importable ({first_line(e)})")
        continue
    extra = ""
    if name == "torch":
        try:
            cap = "".join(map(str, m.cuda.get_device_capability())) if m.cuda.is_available() else ""
            device = f"{m.cuda.get_device_name()}, sm_{cap}" if cap else "no CUDA device"
        except Exception as e:  # a device that fails to start is worth its own line
            device = f"the device fails: {first_line(e)}"
        extra = f" (CUDA {m.version.cuda}, {device})"
    print(f"{name}: {getattr(m, '__version__', '?')}{extra}")
EOF
} >"$out/env.txt"
cat "$out/env.txt"

status=0
part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output into OUT/NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit} s)"
  timeout --signal=INT --kill-after=20 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc, $(($(date +%s) - start)) s" | tee -a "$out/summary.txt"
  tail -n 3 "$out/$name.log"
  if [ "$status" -eq 0 ] && [ "$rc" -ne 0 ]; then status=$rc; fi
}

part tests "$tests_s" "$py" -m pytest -q -p no:cacheprovider -m "gpu or triton" --junitxml="$out/tests.xml" tests
part gpu_kernels "$bench_s" "$py" benchmarks/gpu_kernels.py --json "$out/gpu_kernels.json"
exit "$status"

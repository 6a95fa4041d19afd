"""Native ONNX Runtime CPU kernels for the ssmrt ops (float32 and float16): CausalConv1d, SelectiveScan, SSDScan.

An exported model runs on stock ONNX Runtime through its ops' fallback bodies (model-local functions in
standard ops). A session that registers this library runs each of those ops as one native node instead: a
Mamba-1 decode step goes from ~1,090 nodes to ~290, the step's work outside the matmuls from ~45 small nodes a
layer to a handful (benchmarks/RESULTS.md).

The library is C++ compiled on first use with the machine's compiler (`$CXX`, else `c++`) for this CPU
(-march=native) and cached under `$SSMRT_CACHE_DIR` (default ~/.cache/ssmrt), keyed by the sources, the flags,
the compiler and the CPU. The kernels (kernels.cc, no ONNX Runtime in it) split their work over the session's
intra-op thread pool; ops.cc validates every input and attribute and reports errors through ONNX Runtime;
each op is registered twice, for float32 and for float16 activations (the inputs and outputs the contract keeps
float32, A, D, the dt biases and the SSM state, stay float32 in both), and a float16 node's activations are
widened to float32 on the way in and rounded back on the way out (half.h), so both compute alike;
ort_abi.h declares the part of ONNX Runtime's C ABI they use. This module does not import ONNX Runtime:
`library_path()` gives the file that `SessionOptions.register_custom_ops_library` takes.

The library also holds ops no artifact contains, in the ssmrt.cpu domain, which the ONNX Runtime runner puts in
its own copy of a graph: HalfMatMul, Int8MatMul and IntDotMatMul (the weight matmuls of a float16 decode step,
of an 8-bit float32-activation one and of a 4- or 8-bit int8-activation one: route_decode_matmuls below) and the
fused SSDMixer, AddRMSNorm, SelectiveMixer and SSDBlock (fusion.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import SsmrtError

# the runner's graph fusions, and how a node's reads are found
from .fusion import (  # noqa: F401
    FUSION_DOMAIN,
    ROUTED,
    _names_read,
    fuse_add_rmsnorms,
    fuse_selective_mixers,
    fuse_ssd_blocks,
    fuse_ssd_mixers,
)

log = logging.getLogger(__name__)

SOURCES = ("ops.cc", "kernels.cc", "kernels.h", "ort_abi.h", "half.h")
LIBRARY = "libssmrt_ort_ops.so"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-pthread", "-fvisibility=hidden")
# Only the kernels' loops are compiled with -ffast-math (vector exp / log); the glue that reads attributes such as
# an infinite dt_max is not, since -ffast-math lets the compiler assume no infinity ever appears.
FAST_MATH = {"kernels.cc": ("-ffast-math",), "ops.cc": ()}
# The ssmrt ops the library implements.
OPS = ("CausalConv1d", "SelectiveScan", "SSDScan")
DIGEST_SUFFIX = ".digest"  # beside the library: its size and sha256, recorded when it was built


class NativeOpsUnavailable(SsmrtError):
    """The library cannot be built or used here; the message says why."""


def _cpu_model() -> str:
    """The CPU's name and instruction-set flags: -march=native code built on one CPU may not run on another
    (a cache directory shared between machines gets one library per kind of CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(dict.fromkeys(line for line in lines if line.startswith(("model name", "flags"))))


def _compiler() -> str:
    """$CXX if set, else the first of c++, g++, clang++ on PATH."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in names:
        if path := shutil.which(name):
            return path
    raise NativeOpsUnavailable(f"no C++ compiler ({' / '.join(repr(n) for n in names)} not on PATH; set CXX)")


def cache_dir() -> Path:
    """$SSMRT_CACHE_DIR/ort_ops (default ~/.cache/ssmrt/ort_ops), absolute. An empty SSMRT_CACHE_DIR is refused
    rather than read as the current directory."""
    value = os.environ.get("SSMRT_CACHE_DIR")
    if value is not None and not value.strip():
        raise NativeOpsUnavailable("SSMRT_CACHE_DIR is set but empty; unset it or name a directory")
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # ONNX Runtime takes the library's path as UTF-8 only: found after the build
            raise NativeOpsUnavailable(f"SSMRT_CACHE_DIR {value!r} is not valid UTF-8; name another directory"
                                       ) from None
    return Path(os.path.abspath(value or Path.home() / ".cache" / "ssmrt")) / "ort_ops"


def _digest(path: Path) -> str:
    """size:sha256 of a file: what a cached library must still be before ONNX Runtime maps it (a truncated
    shared library kills the loading process with SIGBUS, with no message)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return f"{size}:{h.hexdigest()}"


def _verified(out: Path) -> bool:
    """Whether the cached library is the one its build recorded (DIGEST beside it); False for a missing,
    truncated or altered one, which is then built again."""
    record = out.with_name(out.name + DIGEST_SUFFIX)
    try:
        return out.is_file() and record.read_text().strip() == _digest(out)
    except OSError:
        return False


def contract_header() -> str:
    """contract.h, generated from ssmrt.ops.spec at build time: the ops' names, input and output counts, which
    inputs are optional, which inputs and outputs stay float32 in a float16 model, and the softplus threshold.
    The C++ glue registers the ops from it, so the library cannot disagree with the contract."""
    from ..ops.spec import OPS, SOFTPLUS_THRESHOLD

    lines = ["// Generated from ssmrt/ops/spec.py when the library is built; do not edit.", "#pragma once",
             "#include <cstddef>", "", "namespace ssmrt_contract {", "",
             "struct OpContract {", "  const char* name;", "  size_t inputs;", "  size_t outputs;",
             "  const bool* optional;  // per input",
             "  const bool* fp32_inputs;  // per input: float32 whatever the activations' dtype",
             "  const bool* fp32_outputs;  // per output: the same", "};", "",
             f"constexpr float kSoftplusThreshold = {SOFTPLUS_THRESHOLD!r}f;", ""]
    def flags(values):
        return ", ".join("true" if v else "false" for v in values)

    for name in OPS:
        spec = OPS[name]
        counts = f"{len(spec.inputs)}, {len(spec.outputs)}"
        lines += [f"constexpr bool k{name}Optional[] = {{{flags(t.optional for t in spec.inputs)}}};",
                  f"constexpr bool k{name}Fp32Inputs[] = {{{flags(t.fp32 for t in spec.inputs)}}};",
                  f"constexpr bool k{name}Fp32Outputs[] = {{{flags(t.fp32 for t in spec.outputs)}}};",
                  f'constexpr OpContract k{name}{{"{name}", {counts}, k{name}Optional, k{name}Fp32Inputs, '
                  f"k{name}Fp32Outputs}};"]
    lines += ["", "}  // namespace ssmrt_contract", ""]
    return "\n".join(lines)


def library_path() -> Path:
    """The compiled library, built now if this machine has not built these sources yet.

    Raises NativeOpsUnavailable, saying why, where it cannot be built: not Linux, no compiler, a compile error
    (its first error lines), or a cache directory that cannot be written."""
    if platform.system() != "Linux":
        raise NativeOpsUnavailable(f"built for Linux only, this is {platform.system()}")
    cxx = _compiler()
    here = Path(__file__).parent
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    header = contract_header()
    key = hashlib.sha256(header.encode())
    for part in [*(here / s for s in SOURCES)]:
        key.update(part.read_bytes())
    for part in (*FLAGS, *(f for v in FAST_MATH.values() for f in v), *version, _cpu_model(), platform.machine()):
        key.update(part.encode())
    out = cache_dir() / key.hexdigest()[:16] / LIBRARY
    if _verified(out):
        return out
    if out.exists():
        log.warning("the cached native ops library %s does not match its build record (truncated, altered, or "
                    "from an older ssmrt); building it again", out)
    log.info("building the native ONNX Runtime ops with %s into %s (once per machine)", cxx, out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Build in a temporary directory beside the target, then rename: a concurrent or interrupted build never
        # leaves a half-written library where a session would load it.
        with tempfile.TemporaryDirectory(prefix=".build.", dir=out.parent) as tmp:
            (Path(tmp) / "contract.h").write_text(header)
            objects = []
            for source, extra in FAST_MATH.items():
                objects.append(str(Path(tmp) / f"{source}.o"))
                _run([cxx, *FLAGS, *extra, f"-I{tmp}", "-c", str(here / source), "-o", objects[-1]], here / source)
            _run([cxx, "-shared", "-pthread", "-o", str(Path(tmp) / LIBRARY), *objects], here / "ops.cc")
            # the digest first, then the library: a library in place always has its record
            (Path(tmp) / "digest").write_text(_digest(Path(tmp) / LIBRARY))
            os.replace(Path(tmp) / "digest", out.with_name(out.name + DIGEST_SUFFIX))
            os.replace(Path(tmp) / LIBRARY, out)
    except OSError as e:
        raise NativeOpsUnavailable(f"cannot build into {out.parent} ({e.strerror or e}); set SSMRT_CACHE_DIR") from None
    return out


def int_dot_path(library: Path | None = None) -> str:
    """The code the library's IntDotMatMul was compiled with for this CPU: "avx512-vnni", "avx-vnni", "avx2" or
    "scalar" (plain integer loops). `library`: another build's file (tests), else this machine's."""
    import ctypes

    lib = ctypes.CDLL(str(library or library_path()))
    lib.SsmrtIntDotPath.restype = ctypes.c_char_p
    return lib.SsmrtIntDotPath().decode()


def int_dot_vectorised(library: Path | None = None) -> bool:
    """Whether IntDotMatMul runs on vector instructions here: where it does not, ONNX Runtime's own kernel is faster
    and the runner leaves MatMulNBits alone. `library`: the file already found (library_path() hashes the sources
    and asks the compiler its version), else found now."""
    return int_dot_path(library) != "scalar"


def _run(cmd: list[str], source: Path) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        why = (" / ".join(line for line in res.stderr.splitlines() if "error" in line)[:500]
               or " ".join(res.stderr.split())[:500] or f"exit status {res.returncode}, no message")
        raise NativeOpsUnavailable(f"{cmd[0]} could not build {source}: {why}")


# ONNX Runtime's CPU float16 MatMul reads its weights at float32 cost (it computes through float32), so a float16
# artifact's decode step would stream as many bytes as a float32 one. The library's ssmrt.cpu::HalfMatMul reads
# them as stored; it is written for the few rows of a decode step, so the graph asks for it only there.
#
# One graph choosing per call, not a second session holding the decode step's graph: ONNX Runtime folds a float16
# MatMul's weights into float32 copies where it can see them (the file as it is), which speeds a prompt ~8% at three
# times the weights' memory; inside an If's branches they stay float16, held once. The choice is made once a call:
# everything downstream of the first weight matmul is one If whose then-branch (a decode step) has the HalfMatMuls
# and whose else-branch (a prompt) has the graph as it was. An If around each matmul costs as much again as the
# node it wraps would, ~5% of a 130M model's float16 decode step.
#
# An artifact with 8-bit weights and float32 activations (export --weights int8 --activations float32) holds
# com.microsoft::MatMulNBits nodes at accuracy level 0, for which ONNX Runtime's CPU kernel takes many times a
# float32 step (no fast 8-bit kernel with float32 sums). Its decode step goes the same way, to ssmrt.cpu::Int8MatMul
# on the same initializers; a prompt keeps MatMulNBits, whose many rows amortise what it spends on the weights.
# With int8 activations (accuracy level 4, the default) ONNX Runtime's kernel is fast, but its single-row sweep stays
# short of the memory bus; ssmrt.cpu::IntDotMatMul computes the same scheme (its activation codes and integer sums,
# to float32 rounding) closer to the rate of a plain read of the weights' bytes (benchmarks/RESULTS.md), so the
# decode step goes to it where the library has its vector code.
CPU_DOMAIN = "ssmrt.cpu"  # the ops no artifact holds: HalfMatMul, Int8MatMul, IntDotMatMul and the fused ones
DECODE_FLAG = "ssmrt_cpu.decode_step"  # the graph's bool: input_ids has one position


def route_decode_matmuls(model, threads: int = 0, last_only: bool = False, int_dot: bool = False) -> int:
    """Rewrites an onnx.ModelProto in place: every main-graph MatMul of an activation by a float16 (K, N) initializer
    runs on HalfMatMul, every 8-bit MatMulNBits with float32 activations (accuracy level 0, its weight, scales and
    zero points initializers, no bias) on Int8MatMul and, with int_dot, every 4- or 8-bit one with int8 activations
    (accuracy level 4, blocks of 32 or more, the same initializers) on IntDotMatMul, where input_ids has one
    position (a decode step), and as it was otherwise. The nodes downstream of those matmuls move into one If on
    that flag: its then-branch holds them with the matmuls on the native ops, its else-branch as they were; the rest
    (the embedding, the first norm, what is computed from initializers alone) stays in the main graph, which ONNX
    Runtime can fold. Returns how many matmuls. threads: the session's intra-op threads where known (0: not), given
    to each HalfMatMul, which sweeps one run of the weight's rows a thread.

    A tied lm_head multiplies by Transpose(embedding): both branches read the embedding itself (HalfMatMul and Gemm
    with trans_b over the activation's rows), and the Transpose, left with no reader, goes; ONNX Runtime would have
    folded it into a second, transposed copy of the embedding. last_only: the graph's logits are the last position's
    (an export with logits "last"), so its head multiplies one row a sequence in a prompt too, and the prompt branch
    runs the head on HalfMatMul (Int8MatMul, IntDotMatMul) as well (ONNX Runtime's float16 MatMul would widen the
    whole weight to float32 on every call for that one row; HalfMatMul streams the weight once per few rows, as a
    decode step of the same batch does). The artifact on disk is not touched; a runner that loads the native library
    hands ONNX Runtime the result."""
    from onnx import NodeProto, TensorProto, helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer if t.data_type == TensorProto.FLOAT16 and len(t.dims) == 2}
    transposed = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights
                  and [a.ints for a in n.attribute if a.name == "perm"] in ([], [[1, 0]])}
    inits = {t.name: t.data_type for t in graph.initializer}
    u8, f32 = TensorProto.UINT8, TensorProto.FLOAT

    def plain_nbits(n, attrs: dict) -> bool:
        """A MatMulNBits whose weight is uint8 codes, scales float32 (so its activations are too), zero points
        absent or uint8, all initializers, no g_idx or bias: what the native ops read."""
        return (n.op_type == "MatMulNBits" and n.domain == "com.microsoft" and {"K", "N", "block_size"} <= set(attrs)
                and len(n.input) in (3, 4) and [inits.get(x) for x in n.input[1:]] == [u8, f32, u8][:len(n.input) - 1])

    def int8_matmul(n) -> bool:
        """An 8-bit MatMulNBits at accuracy level 0, which Int8MatMul computes."""
        attrs = {a.name: a.i for a in n.attribute}
        return plain_nbits(n, attrs) and attrs.get("bits", 4) == 8 and attrs.get("accuracy_level", 0) == 0

    def int_dot_matmul(n) -> bool:
        """A 4- or 8-bit MatMulNBits at accuracy level 4 in blocks of a power of two from 32 (MatMulNBits' are
        powers of two from 16), which IntDotMatMul computes."""
        attrs = {a.name: a.i for a in n.attribute}
        return (int_dot and plain_nbits(n, attrs) and attrs.get("bits", 4) in (4, 8)
                and attrs.get("accuracy_level", 0) == 4 and attrs["block_size"] >= 32
                and attrs["block_size"] & (attrs["block_size"] - 1) == 0)

    targets = {i for i, n in enumerate(graph.node)
               if (n.op_type == "MatMul" and n.domain == "" and (n.input[1] in weights or n.input[1] in transposed))
               or int8_matmul(n) or int_dot_matmul(n)}
    if not targets:
        return 0
    # what is downstream of a routed MatMul, through its outputs and through values its nested graphs read
    downstream, tainted = set(), set()
    for i, node in enumerate(graph.node):
        if i in targets or any(x in tainted for x in _names_read(node)):
            downstream.add(i)
            tainted.update(node.output)
    step, prompt = [], []
    for i in sorted(downstream):
        node = graph.node[i]
        if i not in targets:
            copy = NodeProto()
            copy.CopyFrom(node)
            step.append(copy)
            prompt.append(node)
            continue
        a, w = node.input[:2]
        (y,) = node.output
        head_row = last_only and y == graph.output[0].name  # one row a sequence in a prompt as in a step
        if node.op_type == "MatMulNBits":
            attrs = {k: helper.get_node_attr_value(node, k) for k in ("K", "N", "block_size")}
            if int8_matmul(node):
                native = helper.make_node("Int8MatMul", list(node.input), [y], domain=CPU_DOMAIN, **attrs)
            else:
                bits = {a.name: a.i for a in node.attribute}.get("bits", 4)  # MatMulNBits' default
                native = helper.make_node("IntDotMatMul", list(node.input), [y], domain=CPU_DOMAIN, bits=bits,
                                          **attrs)
            step.append(native)
            if head_row:
                copy = NodeProto()
                copy.CopyFrom(native)
                prompt.append(copy)
            else:
                prompt.append(node)
            continue
        if w in transposed:
            b = transposed[w]
            n, k = weights[b].dims
            step.append(helper.make_node("HalfMatMul", [a, b], [y], domain=CPU_DOMAIN, trans_b=1,
                                         threads=threads))
            if head_row:
                prompt.append(helper.make_node("HalfMatMul", [a, b], [y], domain=CPU_DOMAIN, trans_b=1,
                                               threads=threads))
                continue
            # the prompt's activation as rows (..., K) -> (rows, K), by the embedding, and back to (..., N)
            prompt += [helper.make_node("Constant", [], [f"{y}.rows_shape"], value_ints=[-1, k]),
                       helper.make_node("Reshape", [a, f"{y}.rows_shape"], [f"{y}.rows"]),
                       helper.make_node("Gemm", [f"{y}.rows", b], [f"{y}.gemm"], transB=1),
                       helper.make_node("Shape", [a], [f"{y}.lead"], end=-1),
                       helper.make_node("Constant", [], [f"{y}.n"], value_ints=[n]),
                       helper.make_node("Concat", [f"{y}.lead", f"{y}.n"], [f"{y}.shape"], axis=0),
                       helper.make_node("Reshape", [f"{y}.gemm", f"{y}.shape"], [y])]
        else:
            step.append(helper.make_node("HalfMatMul", [a, w], [y], domain=CPU_DOMAIN, threads=threads))
            prompt.append(helper.make_node("HalfMatMul", [a, w], [y], domain=CPU_DOMAIN, threads=threads)
                          if head_row else node)
    # the If gives the graph outputs its branches compute, under the same names (siblings' own scopes)
    outputs = [o for o in graph.output if o.name in tainted]
    types = [v for v in graph.value_info if v.name in tainted]
    branch = {name: helper.make_graph(nodes, f"{ROUTED}.{name}", [], outputs, value_info=types)
              for name, nodes in (("step", step), ("prompt", prompt))}
    route = helper.make_node("If", [DECODE_FLAG], [o.name for o in outputs], name=ROUTED,
                             then_branch=branch["step"], else_branch=branch["prompt"])
    flag = [helper.make_node("Shape", ["input_ids"], [f"{DECODE_FLAG}.len"], start=1, end=2),
            helper.make_node("Constant", [], [f"{DECODE_FLAG}.one"], value_ints=[1]),
            helper.make_node("Equal", [f"{DECODE_FLAG}.len", f"{DECODE_FLAG}.one"], [f"{DECODE_FLAG}.eq"]),
            helper.make_node("Constant", [], [f"{DECODE_FLAG}.axes"], value_ints=[0]),
            helper.make_node("Squeeze", [f"{DECODE_FLAG}.eq", f"{DECODE_FLAG}.axes"], [DECODE_FLAG])]
    read = {x for i, node in enumerate(graph.node) if i not in downstream for x in _names_read(node)}
    read |= {x for node in step + prompt for x in _names_read(node)} | {o.name for o in graph.output}
    kept = [node for i, node in enumerate(graph.node) if i not in downstream
            and not (node.op_type == "Transpose" and node.output[0] in transposed and node.output[0] not in read)]
    keep_types = [v for v in graph.value_info if v.name not in tainted]
    del graph.node[:]
    graph.node.extend(kept + flag + [route])
    del graph.value_info[:]
    graph.value_info.extend(keep_types)
    if not any(o.domain == CPU_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CPU_DOMAIN, 1))
    return len(targets)


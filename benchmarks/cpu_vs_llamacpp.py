"""CPU peer benchmark: ssmrt on ONNX Runtime against llama.cpp, same weights, same threads, alternating blocks.

    python benchmarks/cpu_vs_llamacpp.py [--arch mamba1 mamba2] [--llama-cpp DIR] [--work DIR] [--threads 2]
                                         [--blocks 4] [--decode-tokens 64] [--prefill-reps 2] [--json OUT] [--smoke]

- llama.cpp: --llama-cpp names a build directory (bin/llama-bench), a llama.cpp source tree, or a llama-cpp-python
  source tree (its vendored vendor/llama.cpp). Without it, llama-cpp-python==LLAMA_CPP_PYTHON's source is fetched
  with `pip download --no-binary :all:` into --work and built there with cmake (Release, GGML_NATIVE, only the
  tools used here); a finished build is reused.
- weights: a random 130M-class HF checkpoint per family (d_model 768, 24 layers; Mamba-1 d_state 16, vocab 50280;
  Mamba-2 24 heads of 64, d_state 128, vocab 50288: the vocab sizes llama.cpp's converter pads them to), saved with
  save_pretrained. llama.cpp's own convert_hf_to_gguf.py writes f32 and f16 GGUFs from it (the tokenizer: its
  built-in GPT-NeoX vocabulary, which the converter uses for a Mamba checkpoint without tokenizer files), and
  llama-quantize q8_0 and q4_0 from the f32 one. ssmrt exports the same checkpoint (`ssmrt export --logits last`:
  what a user prefills and decodes with) as float32, float16, int8 and int4 weights, and int8 with float32
  activations (int8-f32act, against q8_0).
- timing, --threads on both sides: decode ms/token over --decode-tokens steps after a 128-token prompt
  (llama-bench -p 0 -n N -d 128 -r 1), and prefill tokens/s of a 512-token prompt from an empty state,
  --prefill-reps times (llama-bench -p 512 -n 0 -r reps). Per precision, --blocks rounds of: an ssmrt decode
  block, a llama.cpp decode block (one llama-bench run), an ssmrt prefill block, a llama.cpp prefill block.
  ssmrt runs in its own process (ONNX Runtime alone, as a deployment runs it), llama.cpp in llama-bench's. The
  figure to read is the median of the per-block-pair time ratios ssmrt / llama.cpp (below 1: ssmrt faster), each
  pair under the same machine load.
- sanity: greedy tokens of the float32 models from the same prompt token ids: ssmrt, llama.cpp (llama-simple; its
  text compared with the ssmrt tokens' text from the GGUF's vocabulary) and HF transformers (token ids).
--smoke: a tiny model, ssmrt alone (no llama.cpp), every precision exported and timed for one block.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON = "0.3.36"
TOOLS = ("llama-bench", "llama-quantize", "llama-simple", "llama-tokenize")
# ssmrt's precision -> (its export options, llama.cpp's file type)
PRECISIONS = {
    "fp32": (dict(dtype="float32"), "f32"),
    "fp16": (dict(dtype="float16"), "f16"),
    "int8": (dict(weights="int8"), "q8_0"),
    # the int8 that --calibration brings within the float16 band (GPTQ changes its codes, not what a step reads)
    "int8-f32act": (dict(weights="int8", activations="float32"), "q8_0"),
    "int4": (dict(weights="int4"), "q4_0"),
}
# the /proc/cpuinfo flags that decide which kernels either side runs
VECTOR_FLAGS = {"avx2", "f16c", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "amx_int8"}
GREEDY_PROMPT = "The quick brown fox jumps over the lazy dog. Mamba is a state space model"
GREEDY_TOKENS = 16


class BenchError(Exception):
    """A problem the user can fix (an argument, a missing tool): one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run(cmd: list, log: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """Run cmd; on failure raise with the tail of its output (kept whole in `log` where given)."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if log is not None:
        log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")
    return res


# ------------------------------------------------------------------------------------------ llama.cpp


class LlamaCpp:
    """A llama.cpp source tree (converter, gguf-py) and a build of it (TOOLS)."""

    def __init__(self, source: Path, build: Path, version: dict):
        self.source, self.build, self.version = source, build, version

    def tool(self, name: str) -> Path:
        return self.build / "bin" / name

    def env(self) -> dict:
        return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(self.source / "gguf-py"),
                                                                          os.environ.get("PYTHONPATH")]))}


def _vendored_commit(sdist: Path) -> str | None:
    """The llama.cpp commit llama-cpp-python's release vendors: the 'update llama.cpp to ...@<sha>' line of its
    CHANGELOG's section for its version (the sdist carries no git metadata)."""
    changelog, version = sdist / "CHANGELOG.md", _sdist_version(sdist)
    if not changelog.is_file() or version is None:
        return None
    for section in changelog.read_text().split("\n## [")[1:]:
        if section.startswith(version + "]"):
            m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
            return m.group(1) if m else None
    return None


def _sdist_version(sdist: Path) -> str | None:
    pkg = sdist / "PKG-INFO"
    if pkg.is_file():
        m = re.search(r"^Version: (\S+)", pkg.read_text(), re.M)
        return m.group(1) if m else None
    return None


def find_llama_cpp(given: Path | None, work: Path, log) -> LlamaCpp:
    """Resolve --llama-cpp (or fetch llama-cpp-python's sdist into `work`), building what is missing."""
    build = None
    if given is None:
        sdist = work / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
        if not (sdist / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
            (work / "src").mkdir(parents=True, exist_ok=True)
            tars = sorted(work.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
            if not tars:
                log(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON} (source) into {work}")
                run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", work,
                     f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])
                tars = sorted(work.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
            with tarfile.open(tars[0]) as t:
                t.extractall(work / "src", filter="data")
        source, build = sdist / "vendor" / "llama.cpp", work / "build"
    elif (given / "bin" / "llama-bench").is_file() and (given / "CMakeCache.txt").is_file():
        m = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", (given / "CMakeCache.txt").read_text(), re.M)
        source, build = Path(m.group(1)), given
    elif (given / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        source = given / "vendor" / "llama.cpp"
    elif (given / "convert_hf_to_gguf.py").is_file():
        source = given
    else:
        raise BenchError(f"--llama-cpp {given}: neither a llama.cpp build directory (bin/llama-bench, "
                         "CMakeCache.txt), a llama.cpp source tree nor a llama-cpp-python source tree")
    sdist = source.parent.parent if source.parent.name == "vendor" else None
    version = {"llama_cpp_source": str(source),
               "llama_cpp_python": _sdist_version(sdist) if sdist else None,
               "llama_cpp_commit": _vendored_commit(sdist) if sdist else None}
    if build is None:
        build = work / f"build-{hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:10]}"
    llama = LlamaCpp(source, build, version)
    missing = [t for t in TOOLS if not llama.tool(t).is_file()]
    if missing:
        log(f"building {', '.join(missing)} in {build} (cmake, Release, GGML_NATIVE; a few minutes)")
        cfg = ["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF"]
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        if version["llama_cpp_commit"]:  # the sdist has no git history for llama.cpp's own build info to find
            cfg += [f"-DLLAMA_BUILD_COMMIT={version['llama_cpp_commit']}", "-DLLAMA_BUILD_NUMBER=0"]
        if not (build / "CMakeCache.txt").is_file():
            run(cfg)
        run(["cmake", "--build", build, "--config", "Release", "-j", str(min(os.cpu_count() or 1, 2)),
             "--target", *TOOLS])
    return llama


def llama_bench(llama: LlamaCpp, gguf: Path, threads: int, args: list) -> dict:
    """One llama-bench run (-o json) of one test; its JSON record."""
    res = run([llama.tool("llama-bench"), "-m", gguf, "-t", threads, "-o", "json", *args])
    (rec,) = json.loads(res.stdout)
    return rec


def convert(llama: LlamaCpp, hf_dir: Path, out_dir: Path, log) -> dict:
    """f32/f16 GGUFs by llama.cpp's converter, q8_0/q4_0 by llama-quantize from the f32 one; reused if present."""
    paths = {t: out_dir / f"model-{t}.gguf" for _, t in PRECISIONS.values()}
    for t in ("f32", "f16"):
        if not paths[t].is_file():
            log(f"convert_hf_to_gguf.py --outtype {t}")
            tmp = paths[t].with_suffix(".part")
            run([sys.executable, llama.source / "convert_hf_to_gguf.py", hf_dir, "--outtype", t, "--outfile", tmp],
                log=out_dir / f"convert-{t}.log", env=llama.env())
            tmp.rename(paths[t])
    for t in ("q8_0", "q4_0"):
        if not paths[t].is_file():
            log(f"llama-quantize {t}")
            tmp = paths[t].with_suffix(".part")
            run([llama.tool("llama-quantize"), paths["f32"], tmp, t], log=out_dir / f"quantize-{t}.log")
            tmp.rename(paths[t])
    return paths


def gguf_pieces(llama: LlamaCpp, gguf: Path) -> list[bytes]:
    """Each token's bytes as llama.cpp prints it: a byte-level BPE token through GPT-2's byte-to-unicode table
    reversed, a control or user-defined token as its text."""
    sys.path.insert(0, str(llama.source / "gguf-py"))
    import gguf as gg

    reader = gg.GGUFReader(str(gguf), "r")
    tokens = reader.get_field(gg.Keys.Tokenizer.LIST)
    types = reader.get_field(gg.Keys.Tokenizer.TOKEN_TYPE)
    # GPT-2's table: printable bytes stand for themselves, the others are shifted past 255 in order
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    to_byte, shift = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            to_byte[chr(256 + shift)] = b
            shift += 1
    pieces = []
    for i, j in zip(tokens.data, types.data, strict=True):
        text = bytes(tokens.parts[i]).decode("utf-8")
        if int(types.parts[j][0]) == gg.TokenType.NORMAL:
            pieces.append(bytes(to_byte.get(c, 0) for c in text))
        else:
            pieces.append(text.encode("utf-8"))
    return pieces


# ------------------------------------------------------------------------------------------ ssmrt side


def _ssmrt_worker(conn, threads: int, prompt_len: int, prefill_len: int, seed: int):
    """ONNX Runtime in its own process. Commands: ("load", artifact) -> ("ready", native ops) after an untimed
    warm-up (a --prompt-len prefill whose state every decode block starts from, a prefill of --prefill-len, a few
    steps); ("decode", n) -> seconds for n single-token steps; ("prefill", reps) -> seconds for reps prefills of
    prefill_len tokens from the zero state; ("greedy", ids, n) -> n greedy tokens after the prompt ids;
    ("stop",)."""
    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact, Session

    r = None
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        if msg[0] == "load":
            r = OnnxRuntimeRunnerFromArtifact(msg[1], provider="cpu", threads=threads, native_ops="auto")
            rng = np.random.default_rng(seed)
            vocab = r.config.vocab_size
            prompt = rng.integers(0, vocab, (1, prompt_len), dtype=np.int64)
            long = rng.integers(0, vocab, (1, prefill_len), dtype=np.int64)
            steps = rng.integers(0, vocab, (4096, 1, 1), dtype=np.int64)  # llama-bench also feeds random tokens
            _, after_prompt = r.forward(prompt, r.zero_state(1))
            r.forward(long, r.zero_state(1))
            st = after_prompt
            for k in range(3):
                _, st = r.forward(steps[k], st)
            conn.send(("ready", list(r.native_ops)))
        elif msg[0] == "decode":
            st = after_prompt
            t0 = time.perf_counter()
            for k in range(msg[1]):
                _, st = r.forward(steps[k % len(steps)], st)
            conn.send(time.perf_counter() - t0)
        elif msg[0] == "prefill":
            t0 = time.perf_counter()
            for _ in range(msg[1]):
                r.forward(long, r.zero_state(1))
            conn.send(time.perf_counter() - t0)
        elif msg[0] == "greedy":
            conn.send([int(t) for t in Session(r).generate(list(msg[1]), msg[2])])


class SsmrtProcess:
    def __init__(self, threads: int, prompt_len: int, prefill_len: int, seed: int = 0):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_ssmrt_worker, args=(child, threads, prompt_len, prefill_len, seed))
        self.proc.start()

    def ask(self, *msg):
        self.conn.send(msg)
        return self.conn.recv()

    def close(self):
        self.conn.send(("stop",))
        self.proc.join()


# ------------------------------------------------------------------------------------------ models


def checkpoint(arch: str, layers: int, d_model: int, vocab: int, out: Path, log) -> Path:
    """The random HF checkpoint (seeded, so a rerun writes the same weights); reused if complete."""
    hf_dir = out / "hf"
    if (hf_dir / "config.json").is_file() and any(hf_dir.glob("*.safetensors")):
        return hf_dir
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from cpu_onnxruntime import hf_model

    log(f"writing a random {arch} HF checkpoint ({layers} layers, d_model {d_model}, vocab {vocab})")
    torch.manual_seed(0)
    model = hf_model(arch, layers, vocab_size=vocab, d_model=d_model)
    tmp = out / "hf.part"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(hf_dir)
    return hf_dir


def hf_greedy(hf_dir: Path, ids: list[int], n: int) -> list[int]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def greedy_check(llama: LlamaCpp, ssmrt: SsmrtProcess, hf_dir: Path, gguf: Path) -> dict:
    """The float32 models' greedy tokens from the same prompt ids (llama.cpp's tokenisation of GREEDY_PROMPT)."""
    res = run([llama.tool("llama-tokenize"), "-m", gguf, "-p", GREEDY_PROMPT, "--ids", "--log-disable"])
    ids = json.loads(res.stdout.strip().splitlines()[-1])
    ours = ssmrt.ask("greedy", ids, GREEDY_TOKENS)
    hf = hf_greedy(hf_dir, ids, GREEDY_TOKENS)
    pieces = gguf_pieces(llama, gguf)
    simple = subprocess.run([str(llama.tool("llama-simple")), "-m", str(gguf), "-n", str(GREEDY_TOKENS),
                             GREEDY_PROMPT], capture_output=True)
    if simple.returncode != 0:
        raise RuntimeError(f"llama-simple failed:\n{simple.stderr.decode(errors='replace')[-2000:]}")
    text = simple.stdout
    prompt_text = b"".join(pieces[i] for i in ids)
    if not text.startswith(prompt_text):
        raise RuntimeError("llama-simple's echo of the prompt is not the prompt ids' text: it tokenised otherwise")
    generated, agree = text[len(prompt_text):], 0
    for t in ours:  # how many leading ssmrt tokens llama.cpp's text spells out
        if not generated.startswith(pieces[t]):
            break
        generated, agree = generated[len(pieces[t]):], agree + 1
    return {"prompt_ids": ids, "ssmrt": ours, "hf": hf,
            "ssmrt_vs_hf": sum(a == b for a, b in zip(ours, hf, strict=True)),
            "ssmrt_vs_llama_cpp_leading_text": agree,
            "llama_cpp_text": text[len(prompt_text):].decode(errors="replace"), "n": GREEDY_TOKENS}


# ------------------------------------------------------------------------------------------ the run


def bench_arch(arch: str, a, llama: LlamaCpp | None, work: Path, log, done=lambda rows, checks: None
               ) -> tuple[list[dict], dict | None]:
    """Every precision of one family; done(rows, checks) after each, so a long run interrupted keeps its rows."""
    vocab = a.vocab or (50280 if arch == "mamba1" else 50288)
    model_dir = work / "models" / f"{arch}-d{a.d_model}-L{a.layers}-v{vocab}-seed0"
    model_dir.mkdir(parents=True, exist_ok=True)
    hf_dir = checkpoint(arch, a.layers, a.d_model, vocab, model_dir, log)
    ggufs = convert(llama, hf_dir, model_dir, log) if llama else {}

    from ssmrt.exporter import export

    # ssmrt's exports are redone every run: they are what the ssmrt under test writes
    exports = Path(tempfile.mkdtemp(prefix="ssmrt-", dir=model_dir))
    rows, checks = [], None
    ssmrt = SsmrtProcess(a.threads, a.prompt_len, a.prefill_len)
    try:
        for prec, (opts, ltype) in PRECISIONS.items():
            if prec not in a.precision:
                continue
            log(f"{arch} {prec}: ssmrt export {opts}")
            t0 = time.perf_counter()
            art = export(hf_dir, exports / prec, logits="last", **opts)
            export_s = time.perf_counter() - t0
            native = ssmrt.ask("load", str(art))[1]
            if prec == "fp32" and llama:
                checks = greedy_check(llama, ssmrt, hf_dir, ggufs["f32"])
                log(f"{arch} greedy: ssmrt vs HF {checks['ssmrt_vs_hf']}/{GREEDY_TOKENS} tokens, ssmrt vs "
                    f"llama.cpp {checks['ssmrt_vs_llama_cpp_leading_text']}/{GREEDY_TOKENS} (text)")
            s_dec, s_pre, l_dec, l_pre, load = [], [], [], [], []
            for b in range(a.blocks):
                s_dec.append(1e3 * ssmrt.ask("decode", a.decode_tokens) / a.decode_tokens)
                if llama:
                    rec = llama_bench(llama, ggufs[ltype], a.threads, ["-p", 0, "-n", a.decode_tokens,
                                                                       "-d", a.prompt_len, "-r", 1])
                    l_dec.append(1e-6 * statistics.mean(rec["samples_ns"]) / a.decode_tokens)
                s_pre.append(a.prefill_len * a.prefill_reps / ssmrt.ask("prefill", a.prefill_reps))
                if llama:
                    rec = llama_bench(llama, ggufs[ltype], a.threads, ["-p", a.prefill_len, "-n", 0,
                                                                       "-r", a.prefill_reps])
                    l_pre.append(a.prefill_len / (1e-9 * statistics.mean(rec["samples_ns"])))
                    llama_build = {k: rec.get(k) for k in ("build_commit", "build_number", "cpu_info", "type_k")}
                load.append(os.getloadavg()[0])  # the machine is shared: how busy it was, block by block
                log(f"{arch} {prec} block {b}: ssmrt {s_dec[-1]:.2f} ms/token, {s_pre[-1]:.0f} tok/s"
                    + (f"; llama.cpp {l_dec[-1]:.2f} ms/token, {l_pre[-1]:.0f} tok/s" if llama else ""))
            row = {"arch": arch, "precision": prec, "layers": a.layers, "d_model": a.d_model, "vocab": vocab,
                   "load_average_1min_blocks": load,
                   "ssmrt": {"export": {**opts, "logits": "last"}, "export_s": export_s, "native_ops": native,
                             "file_MB": sum(p.stat().st_size for p in art.iterdir()) / 1e6,
                             "decode_ms_blocks": s_dec, "prefill_tok_s_blocks": s_pre,
                             "decode_ms_per_token": statistics.median(s_dec),
                             "prefill_tokens_per_s": statistics.median(s_pre)}}
            if llama:
                row["llama_cpp"] = {"type": ltype, "file_MB": ggufs[ltype].stat().st_size / 1e6,
                                    "decode_ms_blocks": l_dec, "prefill_tok_s_blocks": l_pre,
                                    "decode_ms_per_token": statistics.median(l_dec),
                                    "prefill_tokens_per_s": statistics.median(l_pre), **llama_build}
                dec_r = [s / ll for s, ll in zip(s_dec, l_dec, strict=True)]
                pre_r = [ll / s for s, ll in zip(s_pre, l_pre, strict=True)]  # time ratio: tok/s inverted
                row.update(decode_time_ratio_blocks=dec_r, decode_time_ratio=statistics.median(dec_r),
                           prefill_time_ratio_blocks=pre_r, prefill_time_ratio=statistics.median(pre_r))
            rows.append(row)
            done(rows, checks)
            shutil.rmtree(exports / prec, ignore_errors=True)
    finally:
        ssmrt.close()
        shutil.rmtree(exports, ignore_errors=True)
    return rows, checks


def table(rows: list[dict]) -> str:
    """The markdown table for benchmarks/RESULTS.md."""
    out = ["| family | ssmrt / llama.cpp | ssmrt decode ms/token | llama.cpp decode ms/token | decode time ratio | "
           "ssmrt prefill tok/s | llama.cpp prefill tok/s | prefill time ratio |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, ll = r["ssmrt"], r.get("llama_cpp")

        def f(x, fmt):
            return "-" if x is None else format(x, fmt)

        out.append(f"| {r['arch']} | {r['precision']} / {ll['type'] if ll else '-'} | "
                   f"{s['decode_ms_per_token']:.2f} | {f(ll and ll['decode_ms_per_token'], '.2f')} | "
                   f"{f(r.get('decode_time_ratio'), '.2f')} | {s['prefill_tokens_per_s']:.0f} | "
                   f"{f(ll and ll['prefill_tokens_per_s'], '.0f')} | {f(r.get('prefill_time_ratio'), '.2f')} |")
    return "\n".join(out)


def environment(a, llama: LlamaCpp | None) -> dict:
    import onnxruntime

    cpu, vector = platform.processor(), None
    try:
        info = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
        cpu = m.group(1) if m else cpu
        # what both sides' native builds may use: a figure from an AVX2 host is not one from an AVX-512 host
        m = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
        vector = sorted(set(m.group(1).split()) & VECTOR_FLAGS) if m else None
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                                capture_output=True, text=True).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "status", "--porcelain",
                                     "--untracked-files=no"], capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    return {"cpu": cpu, "cpu_vector_flags": vector, "cpus": os.cpu_count(), "threads": a.threads,
            "machine": platform.machine(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "ssmrt_commit": commit, "ssmrt_tree_modified": dirty,
            **(llama.version if llama else {}), "llama_cpp_build": str(llama.build) if llama else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
            "load_average_start": os.getloadavg(), "smoke": a.smoke,
            "protocol": {k: getattr(a, k) for k in ("layers", "d_model", "blocks", "decode_tokens", "prompt_len",
                                                    "prefill_len", "prefill_reps")}}


def parse_args(argv=None):
    ap = _Parser(prog="cpu_vs_llamacpp.py", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["mamba1", "mamba2"], choices=["mamba1", "mamba2"])
    ap.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                    help="a llama.cpp build directory, llama.cpp source tree or llama-cpp-python source tree")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "ssmrt" / "llamacpp", metavar="DIR",
                    help="downloads, the llama.cpp build, the checkpoints and GGUFs (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--decode-tokens", type=int, default=64, help="decode steps per block")
    ap.add_argument("--prefill-reps", type=int, default=2, help="prefills (and llama-bench repetitions) per block")
    ap.add_argument("--prompt-len", type=int, default=128, help="the prompt before the timed decode steps")
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--json", type=Path, default=None, metavar="OUT")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny model, ssmrt alone, one short block per precision: checks the script (a test runs it)")
    a = ap.parse_args(argv)
    a.vocab = None  # the family's: what llama.cpp's converter pads it to
    if a.smoke:
        a.layers, a.d_model, a.vocab, a.blocks, a.decode_tokens, a.prefill_reps, a.prompt_len, a.prefill_len = \
            1, 128, 1024, 1, 4, 1, 16, 32
    for name in ("threads", "blocks", "decode_tokens", "prefill_reps", "prompt_len", "prefill_len", "layers"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.threads > (os.cpu_count() or 1):
        ap.error(f"--threads {a.threads} is more than this machine's {os.cpu_count()} CPUs")
    if a.d_model % 64:
        ap.error(f"--d-model must be a multiple of 64 (Mamba-2 heads of 64), got {a.d_model}")
    if a.llama_cpp is not None and not a.llama_cpp.is_dir():
        ap.error(f"--llama-cpp {a.llama_cpp}: no such directory")
    if a.smoke and a.llama_cpp is not None:
        ap.error("--smoke runs ssmrt alone; it takes no --llama-cpp")
    if a.json is not None and not a.json.parent.is_dir():
        ap.error(f"--json {a.json}: no directory {a.json.parent}")
    repo = Path(__file__).resolve().parents[1]
    if not a.smoke and (a.work.resolve() == repo or repo in a.work.resolve().parents):
        ap.error(f"--work {a.work} is inside the repository; give a directory outside it")
    return a


def main(argv=None):
    a = parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        if a.smoke:  # its own throwaway work directory: nothing of a real run's is reused or left behind
            tmp = tempfile.TemporaryDirectory(prefix="ssmrt-llamacpp-smoke-")
            a.work = Path(tmp.name)
        a.work.mkdir(parents=True, exist_ok=True)
        llama = None if a.smoke else find_llama_cpp(a.llama_cpp, a.work.resolve(), log)
    except BenchError as e:
        print(f"cpu_vs_llamacpp.py: error: {e}", file=sys.stderr)
        return 2
    env = environment(a, llama)
    print(json.dumps(env), flush=True)
    rows, checks = [], {}

    def write(arch_rows=(), arch_checks=None, arch=None):
        env["load_average_end"] = os.getloadavg()
        env["date_end"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if a.json:
            a.json.write_text(json.dumps({"env": env, "results": rows + list(arch_rows),
                                          "greedy": {**checks, **({arch: arch_checks} if arch_checks else {})}},
                                         indent=1))

    for arch in a.arch:
        r, c = bench_arch(arch, a, llama, a.work, log, done=lambda rs, cs, arch=arch: write(rs, cs, arch))
        rows += r
        if c:
            checks[arch] = c
    write()
    print(table(rows))
    for arch, c in checks.items():
        print(f"{arch} float32 greedy, {c['n']} tokens: ssmrt = HF on {c['ssmrt_vs_hf']}, ssmrt = llama.cpp on the "
              f"first {c['ssmrt_vs_llama_cpp_leading_text']} (by their text)")
    bad = [r for r in rows for v in (r["ssmrt"]["decode_ms_per_token"], r["ssmrt"]["prefill_tokens_per_s"])
           if not (math.isfinite(v) and v > 0)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

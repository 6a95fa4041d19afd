"""TensorRT engines from an ssmrt artifact: what an engine directory holds and promises, without TensorRT.

An engine directory (`ssmrt build ARTIFACT -o ENGINE_DIR`) holds:
- `model.engine`: the decode step (one profile "decode": seqlen 1, batch 1..max), from model.onnx;
- `prefill.engine`: prompts (one profile "prefill": seqlen 2..max_seq): with the plugins on, from prefill.onnx
  where the artifact has it (`export --target tensorrt`: the scans as chains of one-kernel plugins), else from
  model.onnx; on the fallback bodies (`--plugins none`) model.engine takes the scan bodies' step branch and
  prefill.engine their prefill branch (TensorRT checks both branches of an If against every shape of a profile).
  Two engines, not two profiles of one: a different graph for prompts, and each execution context holds one
  profile's memory (the weights are in each engine);
- `engine.json`, the sidecar: the artifact's model config, state specs and export options, the TensorRT
  version and GPU the engines were built for, the plugin mode, each engine's profiles and the build flags.

A runner reads the sidecar first: an engine is refused, in one line, where it was built for another TensorRT
version or GPU (TensorRT would refuse it less clearly, or crash). This module imports neither TensorRT nor
a GPU library.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..artifact import TOKENIZER_FILES
from ..errors import SsmrtError

ENGINE_FILE = "model.engine"
PREFILL_ENGINE_FILE = "prefill.engine"
SIDECAR_FILE = "engine.json"
# the tokenizer files come along from the artifact, so `generate ENGINE_DIR --prompt TEXT` works
ENGINE_DIR_FILES = (ENGINE_FILE, PREFILL_ENGINE_FILE, SIDECAR_FILE, *TOKENIZER_FILES)
SIDECAR_FORMAT = 1
PLUGIN_MODES = ("aot", "jit", "none")
ENGINE_KINDS = ("tensorrt", "tensorrt-rtx")


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: (min, opt, max) of the batch and of the sequence length."""

    name: str
    batch: tuple[int, int, int]
    seqlen: tuple[int, int, int]

    def shapes(self, specs: list[dict]) -> dict[str, tuple[tuple, tuple, tuple]]:
        """(min, opt, max) shape of every graph input: input_ids (batch, seqlen), then each state (batch, ...)
        from the artifact's state specs."""
        out = {"input_ids": tuple((b, s) for b, s in zip(self.batch, self.seqlen, strict=True))}
        for spec in specs:
            out[spec["name"]] = tuple(tuple(b if d == "batch" else int(d) for d in spec["shape"]) for b in self.batch)
        return out

    def covers(self, batch: int, seqlen: int) -> bool:
        return self.batch[0] <= batch <= self.batch[2] and self.seqlen[0] <= seqlen <= self.seqlen[2]


INT32_MAX = 2**31 - 1


def profiles(max_batch: int, max_seq: int, opt_batch: int | None = None, opt_seq: int | None = None
             ) -> dict[str, list[Profile]]:
    """Each engine file's profile for these limits (SsmrtError, naming the option, for values that cannot make
    one): model.engine decodes (seqlen 1), prefill.engine takes prompts (seqlen 2..max_seq). One profile per
    engine: an execution context then holds that profile's memory alone. opt_batch defaults to 1, opt_seq to
    min(max_seq, 512)."""
    for name, value in (("--max-batch", max_batch), ("--max-seq", max_seq)):
        if not isinstance(value, int) or value < 1:
            raise SsmrtError(f"{name} must be a positive integer, got {value!r}")
        if value > INT32_MAX:  # TensorRT's dimensions are 32-bit: refused here rather than by the builder later
            raise SsmrtError(f"{name} must be at most {INT32_MAX:_} (TensorRT's dimensions are 32-bit), got {value}")
    if max_seq < 2:
        raise SsmrtError(f"--max-seq must be at least 2 (the prefill profile takes 2..max-seq tokens), got {max_seq}")
    opt_batch = 1 if opt_batch is None else opt_batch
    opt_seq = min(max_seq, 512) if opt_seq is None else opt_seq
    if not isinstance(opt_batch, int) or not 1 <= opt_batch <= max_batch:
        raise SsmrtError(f"--opt-batch must be between 1 and --max-batch ({max_batch}), got {opt_batch!r}")
    if not isinstance(opt_seq, int) or not 2 <= opt_seq <= max_seq:
        raise SsmrtError(f"--opt-seq must be between 2 and --max-seq ({max_seq}), got {opt_seq!r}")
    batch = (1, opt_batch, max_batch)
    return {ENGINE_FILE: [Profile("decode", batch, (1, 1, 1))],
            PREFILL_ENGINE_FILE: [Profile("prefill", batch, (2, opt_seq, max_seq))]}


def write_sidecar(path: Path, meta: dict, *, tensorrt: str, engine: str, sm: str | None, gpu: str | None,
                  plugins: str, engines: dict[str, list[Profile]], build: dict, ssmrt_version: str) -> None:
    """engine.json: what a runner needs before it loads an engine (and what a user wants to know of one)."""
    doc = {
        "format": SIDECAR_FORMAT,
        "config": meta["config"], "states": meta["states"], "export": meta["export"],
        "engine": engine, "tensorrt": tensorrt, "sm": sm, "gpu": gpu, "plugins": plugins,
        "engines": {name: [asdict(p) for p in ps] for name, ps in engines.items()},
        "build": build, "ssmrt_version": ssmrt_version,
    }
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def read_sidecar(engine_dir) -> dict:
    """engine.json of an engine directory, checked; profiles as Profile objects. SsmrtError, naming the file,
    for anything else."""
    from ..fsutil import user_path

    d = user_path(engine_dir, "the engine directory")
    f = d / SIDECAR_FILE
    if not d.is_dir():
        raise SsmrtError(f"{d}: not an engine directory (build one with `ssmrt build ARTIFACT -o {d}`)")
    if not f.is_file():
        raise SsmrtError(f"{f}: not found; an engine directory from `ssmrt build` has one")
    try:
        doc = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SsmrtError(f"{f}: not a valid engine sidecar ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or doc.get("format") != SIDECAR_FORMAT:
        raise SsmrtError(f"{f}: not an engine sidecar of format {SIDECAR_FORMAT} (rebuild with this ssmrt)")
    required = {"config": dict, "states": list, "export": dict, "engine": str, "tensorrt": str, "plugins": str,
                "engines": dict, "build": dict}
    for key, kind in required.items():
        if not isinstance(doc.get(key), kind):
            raise SsmrtError(f"{f}: '{key}' must be a JSON {kind.__name__}")
    try:
        doc["engines"] = {name: [Profile(p["name"], tuple(p["batch"]), tuple(p["seqlen"])) for p in ps]
                          for name, ps in doc["engines"].items()}
    except (KeyError, TypeError, ValueError):
        raise SsmrtError(f"{f}: 'engines' must map each engine file to its profiles") from None
    unknown = set(doc["engines"]) - {ENGINE_FILE, PREFILL_ENGINE_FILE}
    if unknown or ENGINE_FILE not in doc["engines"]:
        raise SsmrtError(f"{f}: 'engines' must name {ENGINE_FILE} (and optionally {PREFILL_ENGINE_FILE})")
    for name in doc["engines"]:
        if not (d / name).is_file():
            raise SsmrtError(f"{d / name}: missing; the sidecar names it")
    return doc


def check_compatible(doc: dict, tensorrt: str, sm: str | None, where) -> None:
    """Refuses, in one line, an engine built for another TensorRT version or GPU architecture."""
    built, here = doc["tensorrt"], tensorrt
    if built.split(".")[:3] != here.split(".")[:3]:
        raise SsmrtError(f"{where}: built with TensorRT {built}, this is TensorRT {here}; rebuild it here "
                         "(`ssmrt build`)")
    if doc.get("sm") and sm and doc["sm"] != sm:
        raise SsmrtError(f"{where}: built for {doc['sm']} ({doc.get('gpu')}), this GPU is {sm}; rebuild it here")


def recognise_engine_dir(directory, names: list[str]) -> str | None:
    """For fsutil.check_output_dir: None if `names` are an earlier engine directory's files and nothing else."""
    from ..artifact import only_our_files

    problem = only_our_files(directory, names, ENGINE_DIR_FILES, SIDECAR_FILE, "an engine directory from ssmrt")
    if problem:
        return problem
    try:
        doc = json.loads((Path(directory) / SIDECAR_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return f"holds a {SIDECAR_FILE} that ssmrt did not write (not JSON)"
    if not isinstance(doc, dict) or "format" not in doc or "engines" not in doc:
        return f"holds a {SIDECAR_FILE} that ssmrt did not write"
    return None


def is_engine_dir(path) -> bool:
    return (Path(path) / SIDECAR_FILE).is_file()

"""`ssmrt build`: TensorRT engines from an ssmrt artifact (see ssmrt.engine for what the directory holds).

Per engine file: the ssmrt plugins are registered (plugins "aot" or "jit"), the ONNX parser reads the graph
(with plugins "none" the nodes lose their plugin attributes, so every TensorRT version parses the fallback
bodies: TensorRT <= 10.6 always does, >= 10.15 prefers a plugin where plugin_namespace is set), the network
is strongly typed (TensorRT 11 knows no other kind; 10.x sets the flag), its optimisation profiles are those
of ssmrt.engine.profiles, and the serialised engine goes into a directory that appears whole or not at all
(ssmrt.fsutil). TensorRT is imported only here, when a build runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .. import artifact
from ..errors import SsmrtError
from . import (
    ENGINE_FILE,
    ENGINE_KINDS,
    PLUGIN_MODES,
    PREFILL_ENGINE_FILE,
    SIDECAR_FILE,
    Profile,
    profiles,
    recognise_engine_dir,
    write_sidecar,
)

MIN_TENSORRT_PLUGINS = (10, 9)  # tensorrt.plugin with AOT implementations
MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}


def import_tensorrt(engine: str = "tensorrt"):
    """The TensorRT module of that kind, or SsmrtError in one line (not installed, or its libraries missing)."""
    import importlib
    import importlib.util

    if engine not in ENGINE_KINDS:
        raise SsmrtError(f"--engine must be one of {', '.join(ENGINE_KINDS)}, got {engine!r}")
    name = MODULES[engine]
    if importlib.util.find_spec(name) is None:
        pip = "tensorrt" if engine == "tensorrt" else "tensorrt-rtx"
        raise SsmrtError(f"{engine} is not installed (pip install {pip}); `ssmrt selftest` says what this machine "
                         "can run")
    try:
        return importlib.import_module(name)
    except Exception as e:  # a wheel without its native libraries fails with OSError, ImportError or worse
        raise SsmrtError(f"{engine} is installed but cannot be loaded ({str(e).splitlines()[0]})") from None


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def gpu_info() -> tuple[str | None, str | None]:
    """(name, "sm_XY") of CUDA device 0 through the driver API, (None, None) where there is none."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return None, None
    try:
        if driver.cuInit(0)[0] != driver.CUresult.CUDA_SUCCESS:
            return None, None
        err, count = driver.cuDeviceGetCount()
        if err != driver.CUresult.CUDA_SUCCESS or count < 1:
            return None, None
        _, dev = driver.cuDeviceGet(0)
        attr = driver.CUdevice_attribute
        _, major = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
        _, minor = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
        _, name = driver.cuDeviceGetName(64, dev)
        return name.split(b"\0", 1)[0].decode(errors="replace"), f"sm_{major}{minor}"
    except Exception:  # a driver library that cannot be loaded: no GPU for our purposes
        return None, None


def graph_bytes(onnx_path: Path, plugins: str, branch: str | None = None) -> bytes:
    """The graph as the parser gets it. With plugins "none" the ssmrt nodes lose plugin_namespace /
    plugin_version, so the parser takes their fallback bodies whatever its version prefers, and the scan bodies'
    If on seqlen == 1 becomes the one branch this engine's profiles need (`branch`: "step" for the decode
    engine, "prefill" for the prompt engine): TensorRT checks both branches of an If against every shape of
    a profile, and a step branch shaped for one token fails (or crashes the builder) for longer ones."""
    import onnx

    from ..exporter.functions import PLUGIN_ATTRS, single_branch
    from ..ops.spec import DOMAIN

    if plugins != "none":
        return onnx_path.read_bytes()
    model = onnx.load(str(onnx_path), load_external_data=False)
    for node in model.graph.node:
        if node.domain == DOMAIN:
            keep = [a for a in node.attribute if a.name not in PLUGIN_ATTRS]
            del node.attribute[:]
            node.attribute.extend(keep)
    if branch is not None:
        single_branch(model, branch)
    return model.SerializeToString()


class _Messages:
    """A TensorRT logger that keeps the errors (for the one-line message) and prints what `verbose` asks."""

    def __init__(self, trt, verbose: bool, echo: Callable[[str], None]):
        self.trt, self.verbose, self.echo, self.errors = trt, verbose, echo, []

        class Logger(trt.ILogger):
            def __init__(inner):  # noqa: N805
                trt.ILogger.__init__(inner)

            def log(inner, severity, msg):  # noqa: N805
                if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                    self.errors.append(str(msg))
                if verbose:  # otherwise the first error is the one line a failure prints
                    echo(f"  [TensorRT] {msg}")

        self.logger = Logger()

    def last(self) -> str:
        return self.errors[-1].splitlines()[0] if self.errors else "no message from TensorRT"

    def out_of_memory(self) -> bool:
        return any(k in e.lower() for e in self.errors for k in ("out of memory", "outofmemory", "insufficient memory",
                                                                 "cudaerrormemoryallocation"))


def _network_flags(trt, plugins: str) -> int:
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    strongly = getattr(creation, "STRONGLY_TYPED", None)  # TensorRT 11 networks are strongly typed, no flag
    if strongly is not None:
        flags |= 1 << int(strongly)
    if plugins in ("aot", "jit"):
        flags |= 1 << int(getattr(creation, f"PREFER_{plugins.upper()}_PYTHON_PLUGINS"))
    return flags


def build_one(trt, onnx_path: Path, engine_profiles: list[Profile], states: list[dict], plugins: str, *,
              workspace: int | None, timing_cache: bytes | None, verbose: bool, echo: Callable[[str], None],
              label: str = "") -> tuple[bytes, bytes | None]:
    """One engine: (serialised engine, serialised timing cache or None)."""
    label = label or onnx_path.name
    messages = _Messages(trt, verbose, echo)
    builder = trt.Builder(messages.logger)
    network = builder.create_network(_network_flags(trt, plugins))
    parser = trt.OnnxParser(network, messages.logger)
    t0 = time.monotonic()
    branch = "step" if all(p.seqlen[2] == 1 for p in engine_profiles) else "prefill"
    if not parser.parse(graph_bytes(onnx_path, plugins, branch), str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = (errors or [messages.last()])[0].strip().splitlines()[0]
        raise SsmrtError(f"{onnx_path}: TensorRT's ONNX parser refused it ({first}; --verbose for the rest)")
    echo(f"parse {onnx_path.name} for {label}: {network.num_layers} layers, {time.monotonic() - t0:.1f} s")

    config = builder.create_builder_config()
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    cache = None
    if timing_cache is not None and hasattr(config, "create_timing_cache"):
        cache = config.create_timing_cache(timing_cache)
        if not config.set_timing_cache(cache, False):  # one from another GPU or TensorRT: start a new one
            echo(f"the timing cache does not fit this GPU / TensorRT; {onnx_path.name} starts a new one")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
    for p in engine_profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes(states).items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise SsmrtError(f"{onnx_path.name}: TensorRT refused the {p.name} profile ({messages.last()})")
    t0 = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        if messages.out_of_memory():
            biggest = engine_profiles[-1]
            raise SsmrtError(f"{onnx_path.name}: the profiles (batch up to {biggest.batch[2]}, sequence up to "
                             f"{biggest.seqlen[2]}) do not fit the GPU's memory; lower --max-batch / --max-seq")
        raise SsmrtError(f"{onnx_path.name}: TensorRT could not build an engine ({messages.last()}; --verbose for "
                         "the rest)")
    echo(f"build {label} ({', '.join(p.name for p in engine_profiles)}): {time.monotonic() - t0:.1f} s")
    new_cache = None
    if cache is not None and config.get_timing_cache() is not None:
        new_cache = bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(serialized)), new_cache


def build(
    artifact_dir,
    out_dir,
    *,
    max_batch: int = 8,
    max_seq: int = 2048,
    opt_batch: int | None = None,
    opt_seq: int | None = None,
    plugins: str = "aot",
    timing_cache=None,
    workspace: int | None = None,
    verbose: bool = False,
    overwrite: bool = False,
    engine: str = "tensorrt",
    echo: Callable[[str], None] = print,
) -> Path:
    """Engines for the artifact in artifact_dir, into out_dir (new, empty, or with overwrite an earlier engine
    directory). Every check that needs no TensorRT runs first; then TensorRT's, then the builds."""
    from .. import __version__
    from ..fsutil import check_output_dir, output_directory, probe_file_writable, user_path

    if plugins not in PLUGIN_MODES:
        raise SsmrtError(f"--plugins must be one of {', '.join(PLUGIN_MODES)}, got {plugins!r}")
    if workspace is not None and (not isinstance(workspace, int) or workspace < 1):
        raise SsmrtError(f"--workspace must be positive, got {workspace!r}")
    art = Path(artifact_dir)
    model_path = artifact.model_file(art)
    meta = artifact.read_metadata(model_path)  # one line for anything that is not an ssmrt artifact
    prefill_path = model_path.parent / artifact.PREFILL_FILE
    # prompts take prefill.onnx's chains where the export made them and the plugins are on; else a second engine
    # of model.onnx (on the bodies, with their prefill branch: graph_bytes)
    use_prefill = plugins != "none" and meta["export"].get("prefill") == artifact.PREFILL_FILE
    if use_prefill and not prefill_path.is_file():
        raise SsmrtError(f"{prefill_path}: missing; the artifact's metadata names it (export it again)")
    if plugins != "none" and meta["export"].get("state_dtype", "float32") != "float32":
        raise SsmrtError(f"{model_path}: its SSM state is {meta['export']['state_dtype']}; the plugins keep it "
                         "float32 (export with --state-dtype float32, or build with --plugins none)")
    engines = profiles(max_batch, max_seq, opt_batch, opt_seq)
    plan = check_output_dir(out_dir, recognise=recognise_engine_dir, overwrite=overwrite,
                            what="an earlier engine directory")
    cache_path = user_path(timing_cache, "--timing-cache") if timing_cache is not None else None
    cache = None
    if cache_path is not None:
        if cache_path.is_symlink():  # the file it names is updated; the link stays a link
            cache_path = Path(os.path.realpath(cache_path))
        if cache_path.exists() and not cache_path.is_file():
            raise SsmrtError(f"{cache_path}: --timing-cache must be a file")
        if not cache_path.parent.is_dir():
            raise SsmrtError(f"{cache_path}: --timing-cache's directory {cache_path.parent} does not exist")
        try:
            cache = cache_path.read_bytes() if cache_path.exists() else b""  # b"": a new, empty cache
        except OSError as e:
            raise SsmrtError(f"{cache_path}: --timing-cache cannot be read ({e.strerror or e})") from None
        # written back after the builds: a place it cannot go is refused now, not after minutes of building
        why = probe_file_writable(cache_path)
        if why is not None:
            raise SsmrtError(f"{cache_path}: --timing-cache cannot be written back ({why})")

    if plugins != "none" and engine != "tensorrt":
        raise SsmrtError(f"{engine} has no ssmrt plugins; build with --plugins none")
    trt = import_tensorrt(engine)
    version = trt.__version__
    if plugins != "none" and version_tuple(version) < MIN_TENSORRT_PLUGINS:
        raise SsmrtError(f"TensorRT {version} has no AOT plugin support (needs >= "
                         f"{'.'.join(map(str, MIN_TENSORRT_PLUGINS))}); build with --plugins none")
    gpu, sm = gpu_info() if engine == "tensorrt" else (None, None)  # TensorRT-RTX builds without a GPU
    if gpu is None and engine == "tensorrt":
        raise SsmrtError("no CUDA GPU here: TensorRT builds on the GPU it builds for (`ssmrt selftest` says what "
                         "this machine can run)")
    if plugins != "none":
        from ..plugins import register

        register()

    built: dict[str, bytes] = {}
    new_cache = cache if cache_path is not None else None
    sources = {ENGINE_FILE: model_path, PREFILL_ENGINE_FILE: prefill_path if use_prefill else model_path}
    for name, engine_profiles in engines.items():
        built[name], produced = build_one(trt, sources[name], engine_profiles, meta["states"], plugins,
                                          workspace=workspace, timing_cache=new_cache if cache_path else None,
                                          verbose=verbose, echo=echo, label=name)
        new_cache = produced if produced is not None else new_cache

    if cache_path is not None and new_cache is not None:
        _write_atomically(cache_path, new_cache)
    t0 = time.monotonic()
    with output_directory(plan, main_file=SIDECAR_FILE) as tmp:
        for name, data in built.items():
            (tmp / name).write_bytes(data)
        for name in artifact.TOKENIZER_FILES:
            if (model_path.parent / name).is_file():
                shutil.copyfile(model_path.parent / name, tmp / name)
        write_sidecar(tmp / SIDECAR_FILE, meta, tensorrt=version, engine=engine, sm=sm, gpu=gpu, plugins=plugins,
                      engines=engines,
                      build={"artifact": os.path.abspath(art), "max_batch": max_batch, "max_seq": max_seq,
                             "opt_batch": engines[ENGINE_FILE][0].batch[1], "opt_seq": next(
                                 p.seqlen[1] for ps in engines.values() for p in ps if p.name == "prefill"),
                             "workspace": workspace, "timing_cache": str(cache_path) if cache_path else None},
                      ssmrt_version=__version__)
    echo(f"serialise: {', '.join(built)} + {SIDECAR_FILE} into {plan.out}, {time.monotonic() - t0:.1f} s")
    return plan.out


def _write_atomically(path: Path, data: bytes) -> None:
    """The timing cache is the user's file: written beside, then renamed over, so it is never half-written."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise

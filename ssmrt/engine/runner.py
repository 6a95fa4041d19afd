"""TensorRTRunner: an engine directory (`ssmrt build`) behind the Runner interface, so Session, generate,
compare and bench run on it unchanged.

- The sidecar is read first: an engine built for another TensorRT version or GPU is refused in one line.
- One execution context per optimisation profile: seqlen 1 takes model.engine's "decode" profile, longer
  prompts the "prefill" profile (of prefill.engine where the build made one: the chains on one-kernel plugins).
- Device memory through cuda-python's driver API (the `[gpu]` extra; torch is not needed). The state stays on
  the device between steps: a state is a list of DeviceArray, and a step writes the new state to other
  buffers than it reads (the engines declare no aliasing); freed buffers are kept for reuse.
- decode "cuda_graph" (the default): the step of each batch size is captured once per direction between two
  fixed sets of state buffers (A -> B, B -> A) and replayed; a state that is one of those sets is fed back
  without a copy, any other is copied in first. Like the torch backend's static state, a state two steps old
  has been overwritten and is refused as stale (keep one with runner.copy(state)). "eager" enqueues each step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SsmrtError
from ..models.config import SSMConfig
from ..runtime.backends import Runner
from . import ENGINE_FILE, PREFILL_ENGINE_FILE, check_compatible, read_sidecar
from .build import gpu_info, import_tensorrt

DECODE_MODES = ("eager", "cuda_graph")
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def _check(result, what: str):
    from ..plugins.launcher import _check as check

    return check(result, what)


class _Memory:
    """Device buffers by size, reused: a decode step allocates its outputs without a driver call. At most KEEP
    free buffers of a size are kept; the rest are freed (after the stream has finished with them)."""

    KEEP = 4

    def __init__(self, stream):
        self.stream = stream
        self.free: dict[int, list[int]] = {}

    def get(self, nbytes: int) -> int:
        from cuda.bindings import driver

        nbytes = max(nbytes, 1)
        pool = self.free.get(nbytes)
        if pool:
            return pool.pop()
        return int(_check(driver.cuMemAlloc(nbytes), "cuMemAlloc"))

    def put(self, ptr: int, nbytes: int) -> None:
        pool = self.free.setdefault(max(nbytes, 1), [])
        pool.append(ptr)
        if len(pool) > self.KEEP:
            self.release(pool[self.KEEP:])
            del pool[self.KEEP:]

    def release(self, ptrs) -> None:
        from cuda.bindings import driver

        if not ptrs:
            return
        driver.cuStreamSynchronize(self.stream)  # queued work may still read or write them
        for ptr in ptrs:
            driver.cuMemFree(ptr)

    def close(self) -> None:
        for pool in self.free.values():
            self.release(pool)
        self.free.clear()


class DeviceArray:
    """A C-contiguous array in device memory: the TensorRT runner's state element."""

    def __init__(self, shape, dtype, memory: _Memory):
        self.shape, self.dtype, self._memory = tuple(int(d) for d in shape), np.dtype(dtype), memory
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = memory.get(self.nbytes)

    def __del__(self):
        memory = getattr(self, "_memory", None)
        if memory is not None:
            memory.put(self.ptr, self.nbytes)

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


class GraphState(list):
    """A state list that is one of a decode graph's two buffer sets, valid until that set is written again."""

    def __init__(self, arrays, owner, side: int, version: int):
        super().__init__(arrays)
        self.owner, self.side, self.version = owner, side, version


class _StepGraphs:
    """The decode step of one batch size captured twice: reading set A writing set B, and back. Each capture has
    an execution context of its own, set up once and never changed after (TensorRT's rule for captured
    contexts)."""

    def __init__(self, runner, batch: int):
        runner._route(batch, 1)  # refuses a batch outside the decode profile before anything is allocated
        self.runner, self.batch = runner, batch
        specs = runner.state_specs
        self.sets = [[runner._empty(runner._state_shape(s, batch), s["dtype"]) for s in specs] for _ in range(2)]
        self.ids = runner._empty((batch, 1), "int64")
        self.logits = None
        self.graphs = [None, None]
        self.contexts = []  # each graph's own execution context, alive as long as the graph
        self.versions = [0, 0]  # bumped each time a set is written

    def run(self, ids: np.ndarray, state: list) -> tuple[np.ndarray, GraphState]:
        from cuda.bindings import driver

        r = self.runner
        r._fresh(state)
        if isinstance(state, GraphState) and state.owner is self:
            src = state.side
        else:
            src = 0
            for dst, s in zip(self.sets[0], state, strict=True):
                r._copy(dst, s)
            self.versions[0] += 1  # whatever state set A held is gone
        dst = 1 - src
        r._upload(self.ids, ids)
        self.versions[dst] += 1
        if self.graphs[src] is None:
            self.graphs[src] = self._capture(src, dst)
        _check(driver.cuGraphLaunch(self.graphs[src], r.stream), "cuGraphLaunch")
        return r._download(self.logits), GraphState(self.sets[dst], self, dst, self.versions[dst])

    def _capture(self, src: int, dst: int):
        """Warm-up (TensorRT does its deferred work on a context's first enqueue), then capture, on a context of
        this graph's own. The warm-up computes the same step the first replay computes again."""
        from cuda.bindings import driver

        r = self.runner
        context = r._new_context("decode")
        self.logits = r._enqueue(self.ids, self.sets[src], self.sets[dst], logits=self.logits, context=context)
        _check(driver.cuStreamSynchronize(r.stream), "cuStreamSynchronize")
        mode = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        _check(driver.cuStreamBeginCapture(r.stream, mode), "cuStreamBeginCapture")
        failure = None
        try:
            r._enqueue(self.ids, self.sets[src], self.sets[dst], logits=self.logits, context=context)
        except Exception as e:
            failure = e
        err, graph = driver.cuStreamEndCapture(r.stream)
        if failure is not None or err != driver.CUresult.CUDA_SUCCESS:
            if err == driver.CUresult.CUDA_SUCCESS:
                driver.cuGraphDestroy(graph)
            if failure is not None:
                raise failure
            _check((err,), "capturing the decode step (run with --decode eager)")
        try:
            executable = _check(driver.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        finally:
            driver.cuGraphDestroy(graph)
        self.contexts.append(context)
        return executable


class TensorRTRunner(Runner):
    """An engine directory from `ssmrt build` on TensorRT (see the module docstring)."""

    name = "tensorrt"
    device_kind = "cuda"

    def __init__(self, engine_dir, decode: str | None = None):
        self.path = Path(engine_dir)
        doc = read_sidecar(self.path)  # refuses anything that is not an engine directory, before TensorRT loads
        if decode is None:  # a TensorRT-RTX engine is captured only when built for user allocation: not ours
            decode = "cuda_graph" if doc["engine"] == "tensorrt" else "eager"
        if decode not in DECODE_MODES:
            raise SsmrtError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        if decode == "cuda_graph" and doc["engine"] != "tensorrt":
            raise SsmrtError(f"{self.path}: a {doc['engine']} engine decodes eagerly here (--decode eager)")
        wide = sorted({s["dtype"] for s in doc["states"]} - set(_NP))
        if wide or doc["export"].get("dtype") == "bfloat16":
            raise SsmrtError(f"{self.path}: bfloat16 tensors cannot be handed to numpy yet; build from a float16 or "
                             "float32 export (--dtype, --state-dtype)")
        trt = import_tensorrt(doc["engine"])
        gpu, sm = gpu_info()
        if gpu is None:
            raise SsmrtError(f"{self.path}: a TensorRT engine runs on a CUDA GPU, and there is none here")
        check_compatible(doc, trt.__version__, sm, self.path)
        if doc["plugins"] in ("aot", "jit"):
            from ..plugins import register

            register()  # a JIT engine calls the plugins' Python at run time; an AOT one needs nothing
        from cuda.bindings import driver

        _check(driver.cuInit(0), "cuInit")
        dev = _check(driver.cuDeviceGet(0), "cuDeviceGet")
        self._ctx = _check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        _check(driver.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        flags = int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)  # no implicit sync with the legacy stream
        self.stream = _check(driver.cuStreamCreate(flags), "cuStreamCreate")
        self.memory = _Memory(self.stream)
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.doc = doc
        self.config = SSMConfig.from_dict(doc["config"], where=self.path / "engine.json")
        self.state_specs = doc["states"]
        self.logits_mode = doc["export"]["logits"]
        self.dtype = doc["export"]["dtype"]
        self.decode = decode
        self._profiles = {}  # profile name -> (engine, profile index, Profile)
        for name, engine_profiles in doc["engines"].items():
            engine = runtime.deserialize_cuda_engine((self.path / name).read_bytes())
            if engine is None:
                raise SsmrtError(f"{self.path / name}: TensorRT cannot load it (rebuild it with `ssmrt build`)")
            for index, profile in enumerate(engine_profiles):
                self._profiles[profile.name] = (engine, index, profile)
        # eager steps share one context per profile; each captured decode graph has its own (_StepGraphs)
        self._contexts = {name: self._new_context(name) for name in self._profiles}
        _check(driver.cuStreamSynchronize(self.stream), "cuStreamSynchronize")
        self._graphs: dict[int, _StepGraphs] = {}

    def _new_context(self, profile_name: str):
        """An execution context of the engine holding that profile, switched to it."""
        engine, index, profile = self._profiles[profile_name]
        strategy = getattr(getattr(self.trt, "ExecutionContextAllocationStrategy", None), "ON_PROFILE_CHANGE", None)
        context = engine.create_execution_context(strategy) if strategy is not None else \
            engine.create_execution_context()
        if context is None:
            raise SsmrtError(f"{self.path}: no execution context for the {profile_name} profile (out of GPU memory?)")
        try:
            context.set_optimization_profile_async(index, self.stream)
        except Exception as e:  # TensorRT raises rather than returning False
            raise SsmrtError(f"{self.path}: cannot select the {profile_name} profile ({str(e).splitlines()[0]})") \
                from None
        return context

    def close(self) -> None:
        """Frees the device memory the runner keeps for reuse (states still held stay valid until dropped)."""
        self.memory.close()

    def _bind(self) -> None:
        """The runner's CUDA context current on the calling thread (driver calls need it)."""
        from cuda.bindings import driver

        _check(driver.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    def _fresh(self, state) -> None:
        if isinstance(state, GraphState) and state.version != state.owner.versions[state.side]:
            raise RuntimeError("this state is stale: a later decode step of the same batch size overwrote its "
                               "buffers (keep a state with runner.copy(state))")

    # ------------------------------------------------------------------------------------------ buffers

    def _state_shape(self, spec: dict, batch: int) -> tuple:
        return tuple(batch if d == "batch" else int(d) for d in spec["shape"])

    def _empty(self, shape, dtype) -> DeviceArray:
        return DeviceArray(shape, _NP[dtype] if isinstance(dtype, str) else dtype, self.memory)

    def _upload(self, dst: DeviceArray, host: np.ndarray) -> None:
        from cuda.bindings import driver

        host = np.ascontiguousarray(host, dtype=dst.dtype)
        if host.nbytes != dst.nbytes:
            raise SsmrtError(f"an input of shape {host.shape} does not fit a buffer of shape {dst.shape}")
        _check(driver.cuMemcpyHtoDAsync(dst.ptr, host.ctypes.data, host.nbytes, self.stream), "cuMemcpyHtoDAsync")
        _check(driver.cuStreamSynchronize(self.stream), "cuStreamSynchronize")  # the host array may go away

    def _download(self, src: DeviceArray) -> np.ndarray:
        from cuda.bindings import driver

        out = np.empty(src.shape, dtype=src.dtype)
        _check(driver.cuMemcpyDtoHAsync(out.ctypes.data, src.ptr, src.nbytes, self.stream), "cuMemcpyDtoHAsync")
        _check(driver.cuStreamSynchronize(self.stream), "cuStreamSynchronize")
        return out.astype(np.float32, copy=False) if out.dtype != np.int64 else out

    def _copy(self, dst: DeviceArray, src, rows: slice | None = None) -> None:
        """dst <- src (a DeviceArray, or a host array uploaded)."""
        from cuda.bindings import driver

        if not isinstance(src, DeviceArray):
            self._upload(dst, np.asarray(src))
            return
        if src.nbytes != dst.nbytes:
            raise SsmrtError(f"a state of shape {src.shape} does not fit one of shape {dst.shape}")
        _check(driver.cuMemcpyDtoDAsync(dst.ptr, src.ptr, src.nbytes, self.stream), "cuMemcpyDtoDAsync")

    # ------------------------------------------------------------------------------------------ the steps

    def _route(self, batch: int, seqlen: int) -> str:
        """The profile that takes (batch, seqlen): decode for one token, prefill for more."""
        want = "decode" if seqlen == 1 else "prefill"
        if want not in self._profiles:
            raise SsmrtError(f"{self.path}: the engine has no {want} profile")
        profile = self._profiles[want][2]
        if not profile.covers(batch, seqlen):
            raise SsmrtError(f"{self.path}: batch {batch} x {seqlen} tokens is outside the engine's {want} profile "
                             f"(batch {profile.batch[0]}..{profile.batch[2]}, tokens {profile.seqlen[0]}.."
                             f"{profile.seqlen[2]}); rebuild with larger --max-batch / --max-seq")
        return want

    def _enqueue(self, ids: DeviceArray, state_in: list, state_out: list, logits: DeviceArray | None = None,
                 context=None) -> DeviceArray:
        """One execute_async_v3 on the stream: ids (batch, seqlen) and state_in -> logits and state_out."""
        batch, seqlen = ids.shape
        name = self._route(batch, seqlen)
        engine = self._profiles[name][0]
        context = context if context is not None else self._contexts[name]

        def bind(ok, what):
            if not ok:
                raise SsmrtError(f"{self.path}: TensorRT refused {what} (batch {batch}, {seqlen} tokens)")

        bind(context.set_input_shape("input_ids", (batch, seqlen)), "the input_ids shape")
        bind(context.set_tensor_address("input_ids", ids.ptr), "the input_ids buffer")
        for spec, arr in zip(self.state_specs, state_in, strict=True):
            bind(context.set_input_shape(spec["name"], arr.shape), f"the shape of {spec['name']}")
            bind(context.set_tensor_address(spec["name"], arr.ptr), f"the buffer of {spec['name']}")
        shape = tuple(context.get_tensor_shape("logits"))
        dtype = self.trt.nptype(engine.get_tensor_dtype("logits"))
        if logits is None or logits.shape != shape or logits.dtype != np.dtype(dtype):
            logits = self._empty(shape, dtype)
        bind(context.set_tensor_address("logits", logits.ptr), "the logits buffer")
        for spec, arr in zip(self.state_specs, state_out, strict=True):
            bind(context.set_tensor_address(spec["output"], arr.ptr), f"the buffer of {spec['output']}")
        if not context.execute_async_v3(self.stream):
            raise SsmrtError(f"{self.path}: TensorRT could not run the step (batch {batch}, {seqlen} tokens)")
        return logits

    def zero_state(self, batch: int) -> list:
        from cuda.bindings import driver

        self._bind()
        state = [self._empty(self._state_shape(s, batch), s["dtype"]) for s in self.state_specs]
        for arr in state:
            _check(driver.cuMemsetD8Async(arr.ptr, 0, arr.nbytes, self.stream), "cuMemsetD8Async")
        return state

    def forward(self, input_ids, state):
        self._bind()
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise SsmrtError(f"input_ids must be (batch, seqlen), got shape {ids.shape}")
        batch, seqlen = ids.shape
        self._fresh(state)
        if seqlen == 1 and self.decode == "cuda_graph":
            graphs = self._graphs.get(batch)
            if graphs is None:
                graphs = self._graphs[batch] = _StepGraphs(self, batch)
            return graphs.run(ids, state)
        device_ids = self._empty(ids.shape, "int64")
        self._upload(device_ids, ids)
        state_in = [s if isinstance(s, DeviceArray) else self._host_state(s, spec) for s, spec in
                    zip(state, self.state_specs, strict=True)]
        state_out = [self._empty(s.shape, s.dtype) for s in state_in]
        logits = self._enqueue(device_ids, state_in, state_out)
        return self._download(logits), state_out

    def _host_state(self, value, spec) -> DeviceArray:
        host = np.asarray(value)
        arr = self._empty(host.shape, spec["dtype"])
        self._upload(arr, host)
        return arr

    # ------------------------------------------------------------------------------- state operations

    def take(self, state: list, index: list[int]) -> list:
        from cuda.bindings import driver

        self._bind()
        self._fresh(state)
        rows = state[0].shape[0] if state else 0
        if any(not 0 <= int(i) < rows for i in index):
            raise IndexError(f"state rows {list(index)} out of range for a batch of {rows}")
        out = []
        for s in state:
            arr = self._empty((len(index), *s.shape[1:]), s.dtype)
            for row, i in enumerate(index):
                _check(driver.cuMemcpyDtoDAsync(arr.ptr + row * s.row_bytes, s.ptr + int(i) * s.row_bytes,
                                                s.row_bytes, self.stream), "cuMemcpyDtoDAsync")
            out.append(arr)
        return out

    def concat(self, states: list[list]) -> list:
        from cuda.bindings import driver

        self._bind()
        for state in states:
            self._fresh(state)
        out = []
        for parts in zip(*states, strict=True):
            rows = sum(p.shape[0] for p in parts)
            arr = self._empty((rows, *parts[0].shape[1:]), parts[0].dtype)
            offset = 0
            for p in parts:
                _check(driver.cuMemcpyDtoDAsync(arr.ptr + offset, p.ptr, p.nbytes, self.stream), "cuMemcpyDtoDAsync")
                offset += p.nbytes
            out.append(arr)
        return out

    def copy(self, state: list) -> list:
        self._bind()
        self._fresh(state)
        out = []
        for s in state:
            arr = self._empty(s.shape, s.dtype)
            self._copy(arr, s)
            out.append(arr)
        return out

    def to_numpy(self, state: list) -> list[np.ndarray]:
        from cuda.bindings import driver

        self._bind()
        self._fresh(state)
        out = []
        for s in state:
            host = np.empty(s.shape, dtype=s.dtype)
            _check(driver.cuMemcpyDtoHAsync(host.ctypes.data, s.ptr, s.nbytes, self.stream), "cuMemcpyDtoHAsync")
            out.append(host)
        _check(driver.cuStreamSynchronize(self.stream), "cuStreamSynchronize")
        return out

    def describe(self) -> str:
        engines = "+".join(n.removesuffix(".engine") for n in self.doc["engines"])
        return (f"tensorrt {self.doc['tensorrt']} ({self.dtype}, {self.doc.get('gpu')}, plugins {self.doc['plugins']}, "
                f"{engines}, decode {self.decode})")


def TensorRTRunnerFromEngine(engine_dir, **opts) -> TensorRTRunner:  # noqa: N802
    return TensorRTRunner(engine_dir, **opts)


__all__ = ["DECODE_MODES", "ENGINE_FILE", "PREFILL_ENGINE_FILE", "DeviceArray", "TensorRTRunner",
           "TensorRTRunnerFromEngine"]

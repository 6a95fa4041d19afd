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
    """Device buffers by size, reused: a decode step allocates its outputs without a driver call."""

    def __init__(self):
        self.free: dict[int, list[int]] = {}

    def get(self, nbytes: int) -> int:
        from cuda.bindings import driver

        nbytes = max(nbytes, 1)
        pool = self.free.get(nbytes)
        if pool:
            return pool.pop()
        return int(_check(driver.cuMemAlloc(nbytes), "cuMemAlloc"))

    def put(self, ptr: int, nbytes: int) -> None:
        self.free.setdefault(max(nbytes, 1), []).append(ptr)


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
    """The decode step of one batch size captured twice: reading set A writing set B, and back."""

    def __init__(self, runner, batch: int):
        self.runner, self.batch = runner, batch
        specs = runner.state_specs
        self.sets = [[runner._empty(runner._state_shape(s, batch), s["dtype"]) for s in specs] for _ in range(2)]
        self.ids = runner._empty((batch, 1), "int64")
        self.logits = None
        self.graphs = [None, None]
        self.versions = [0, 0]  # bumped each time a set is written

    def run(self, ids: np.ndarray, state: list) -> tuple[np.ndarray, GraphState]:
        from cuda.bindings import driver

        r = self.runner
        if isinstance(state, GraphState) and state.owner is self:
            if state.version != self.versions[state.side]:
                raise RuntimeError("this state is stale: a later decode step of the same batch size overwrote its "
                                   "buffers (keep a state with runner.copy(state))")
            src = state.side
        else:
            src = 0
            for dst, s in zip(self.sets[0], state, strict=True):
                r._copy(dst, s)
            self.versions[0] += 1  # whatever state set A held is gone
        dst = 1 - src
        r._upload(self.ids, ids)
        if self.graphs[src] is None:
            self.logits = r._enqueue(self.ids, self.sets[src], self.sets[dst], logits=self.logits)  # warm-up
            stream = r.stream
            _check(driver.cuStreamBeginCapture(stream, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL),
                   "cuStreamBeginCapture")
            try:
                r._enqueue(self.ids, self.sets[src], self.sets[dst], logits=self.logits)
            finally:
                graph = _check(driver.cuStreamEndCapture(stream), "cuStreamEndCapture")
            self.graphs[src] = _check(driver.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
            # the warm-up already computed this step: the replay below computes it again, from the same inputs
        _check(driver.cuGraphLaunch(self.graphs[src], r.stream), "cuGraphLaunch")
        self.versions[dst] += 1
        return r._download(self.logits), GraphState(self.sets[dst], self, dst, self.versions[dst])


class TensorRTRunner(Runner):
    """An engine directory from `ssmrt build` on TensorRT (see the module docstring)."""

    name = "tensorrt"
    device_kind = "cuda"

    def __init__(self, engine_dir, decode: str = "cuda_graph"):
        self.path = Path(engine_dir)
        doc = read_sidecar(self.path)  # refuses anything that is not an engine directory, before TensorRT loads
        if decode not in DECODE_MODES:
            raise SsmrtError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
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
        self.stream = _check(driver.cuStreamCreate(0), "cuStreamCreate")
        self.memory = _Memory()
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.doc = doc
        self.config = SSMConfig.from_dict(doc["config"])
        self.state_specs = doc["states"]
        self.logits_mode = doc["export"]["logits"]
        self.dtype = doc["export"]["dtype"]
        if self.dtype == "bfloat16":
            raise SsmrtError(f"{self.path}: bfloat16 engines cannot hand their logits to numpy yet; build from a "
                             "float16 or float32 export")
        self.decode = decode
        self._engines, self._contexts = {}, {}
        for name, engine_profiles in doc["engines"].items():
            engine = runtime.deserialize_cuda_engine((self.path / name).read_bytes())
            if engine is None:
                raise SsmrtError(f"{self.path / name}: TensorRT cannot load it (rebuild it with `ssmrt build`)")
            self._engines[name] = engine
            for index, profile in enumerate(engine_profiles):
                context = engine.create_execution_context()
                if context is None:
                    raise SsmrtError(f"{self.path / name}: no execution context for profile {profile.name} "
                                     "(out of GPU memory?)")
                context.set_optimization_profile_async(index, self.stream)
                self._contexts[profile.name, name] = (context, profile, engine)
        _check(driver.cuStreamSynchronize(self.stream), "cuStreamSynchronize")
        self._graphs: dict[int, _StepGraphs] = {}

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

    def _route(self, batch: int, seqlen: int):
        want = "decode" if seqlen == 1 else "prefill"
        for (profile_name, _), (context, profile, engine) in self._contexts.items():
            if profile_name == want:
                if not profile.covers(batch, seqlen):
                    raise SsmrtError(f"{self.path}: batch {batch} x {seqlen} tokens is outside the engine's "
                                     f"{want} profile (batch {profile.batch[0]}..{profile.batch[2]}, tokens "
                                     f"{profile.seqlen[0]}..{profile.seqlen[2]}); rebuild with larger --max-batch "
                                     "/ --max-seq")
                return context, engine
        raise SsmrtError(f"{self.path}: the engine has no {want} profile")

    def _enqueue(self, ids: DeviceArray, state_in: list, state_out: list, logits: DeviceArray | None = None
                 ) -> DeviceArray:
        """One execute_async_v3 on the stream: ids (batch, seqlen) and state_in -> logits and state_out."""
        batch, seqlen = ids.shape
        context, engine = self._route(batch, seqlen)
        context.set_input_shape("input_ids", (batch, seqlen))
        context.set_tensor_address("input_ids", ids.ptr)
        for spec, arr in zip(self.state_specs, state_in, strict=True):
            context.set_input_shape(spec["name"], arr.shape)
            context.set_tensor_address(spec["name"], arr.ptr)
        shape = tuple(context.get_tensor_shape("logits"))
        dtype = self.trt.nptype(engine.get_tensor_dtype("logits"))
        if logits is None or logits.shape != shape or logits.dtype != np.dtype(dtype):
            logits = self._empty(shape, dtype)
        context.set_tensor_address("logits", logits.ptr)
        for spec, arr in zip(self.state_specs, state_out, strict=True):
            context.set_tensor_address(spec["output"], arr.ptr)
        if not context.execute_async_v3(self.stream):
            raise SsmrtError(f"{self.path}: TensorRT could not run the step (batch {batch}, {seqlen} tokens)")
        return logits

    def zero_state(self, batch: int) -> list:
        from cuda.bindings import driver

        state = [self._empty(self._state_shape(s, batch), s["dtype"]) for s in self.state_specs]
        for arr in state:
            _check(driver.cuMemsetD8Async(arr.ptr, 0, arr.nbytes, self.stream), "cuMemsetD8Async")
        return state

    def forward(self, input_ids, state):
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise SsmrtError(f"input_ids must be (batch, seqlen), got shape {ids.shape}")
        batch, seqlen = ids.shape
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
        out = []
        for s in state:
            arr = self._empty(s.shape, s.dtype)
            self._copy(arr, s)
            out.append(arr)
        return out

    def to_numpy(self, state: list) -> list[np.ndarray]:
        from cuda.bindings import driver

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

"""Runners: one interface over every backend, so Session, generate and compare never branch on it.

A runner maps (input_ids (batch, seqlen) int64, state) -> (logits float32 numpy (batch, seqlen | 1, vocab),
new_state). A state is a flat list in graph order [conv_state.0, ssm_state.0, conv_state.1, ...] of the
backend's own arrays; runners also gather, concatenate and copy states, and convert them to numpy.

Loaders follow one naming scheme: TorchRunnerFromCheckpoint, OnnxRuntimeRunnerFromArtifact, and
`runner_from_path` picks by what the path holds.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .. import artifact
from ..artifact import MODEL_FILE, flatten_states, pair_states
from ..errors import SsmrtError
from ..fsutil import user_path
from ..models.config import SSMConfig
from ..quantize import describe_scheme, scheme_of

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
# ONNX Runtime options, as the runner and the CLI take them
PROVIDERS = ("auto", "cpu", "cuda")
OPT_LEVELS = ("disable", "basic", "extended", "all")
NATIVE_OPS_MODES = ("auto", "on", "off")


def checked_ids(input_ids, state, config) -> np.ndarray:
    """forward()'s input_ids as a contiguous int64 (batch, seqlen) array of token ids in the vocabulary, and its
    state a list: anything else refused in one line (a float id would be truncated to another token, an id
    outside the vocabulary read another row or crash the runtime)."""
    ids = np.asarray(input_ids)
    if ids.dtype.kind not in "iu":
        raise SsmrtError(f"input_ids must be token ids (integers), got a {ids.dtype} array")
    if ids.ndim != 2 or 0 in ids.shape:
        raise SsmrtError(f"input_ids must be (batch, seqlen) with both >= 1, got shape {ids.shape}")
    v = config.padded_vocab_size
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= v:
        raise SsmrtError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {v})")
    if not isinstance(state, (list, tuple)):
        raise SsmrtError(f"state must be the list zero_state() or forward() returned, got {type(state).__name__}")
    return np.ascontiguousarray(ids, dtype=np.int64)


def checked_batch(batch) -> int:
    """zero_state()'s batch: an integer >= 0."""
    from .sampling import is_int

    if not is_int(batch) or batch < 0:
        raise SsmrtError(f"batch must be an integer >= 0, got {batch!r}")
    return int(batch)


class Runner:
    """Base class: subclasses set `name`, `config`, `logits_mode` and implement the array operations."""

    name = "base"
    config: SSMConfig
    logits_mode = "all"  # "last" when the artifact returns only the last position
    dtype = "float32"
    device_kind = "cpu"  # where the weights live: "cpu" or "cuda"
    weights = None  # an artifact's quantised weights (ssmrt.quantize's metadata entry); None: float weights

    def zero_state(self, batch: int) -> list:
        raise NotImplementedError

    def forward(self, input_ids: np.ndarray, state: list) -> tuple[np.ndarray, list]:
        raise NotImplementedError

    def forward_last(self, input_ids: np.ndarray, state: list) -> tuple[np.ndarray, list]:
        """forward, with the logits of the last position only: (batch, 1, vocab). A prompt's prefill needs no
        more; a runner that can skip the other positions' lm_head overrides this."""
        logits, new = self.forward(input_ids, state)
        return logits[:, -1:], new

    # state operations; numpy-backed runners share these
    def take(self, state: list, index: list[int]) -> list:
        idx = np.asarray(index, dtype=np.int64)
        return [s[idx] for s in state]

    def concat(self, states: list[list]) -> list:
        return [np.concatenate(parts, axis=0) for parts in zip(*states, strict=True)]

    def copy(self, state: list) -> list:
        return [s.copy() for s in state]

    def to_numpy(self, state: list) -> list[np.ndarray]:
        return [np.asarray(s) for s in state]

    def describe(self) -> str:
        return self.name


def _numpy(t) -> np.ndarray:
    """A torch tensor as numpy: float32, or float64 for a float64 one (the compare reference's precision)."""
    import torch

    return (t.double() if t.dtype == torch.float64 else t.float()).cpu().numpy()


class TorchRunner(Runner):
    """The reference models (ssmrt.models) in PyTorch.

    kernels: run the ops on the Triton kernels (default: on CUDA; on the CPU they run in Triton's
    interpreter); "aot": on CUDA, their ahead-of-time PTX launched through the CUDA driver as a TensorRT AOT
    plugin launches it (ssmrt.plugins.launcher), so a whole model runs on what an engine would embed.
    decode: how a one-token step runs: "eager"; "cuda_graph" (the default on CUDA): captured
    once per batch size and replayed, the state in static buffers updated in place (see decode_graph);
    "static": the same buffers without the capture. Off the eager CPU path the runner freezes the model's
    derived constants (MambaLM.freeze): change the weights, make a new runner.
    """

    name = "torch"

    def __init__(self, model, kernels: bool | str | None = None, decode: str | None = None):
        import torch

        from ..kernels.dispatch import interpreting
        from ..models.mamba import MambaLM
        from .decode_graph import MODES

        if not isinstance(model, MambaLM):
            raise SsmrtError(f"TorchRunner(model) takes an ssmrt model (ssmrt.load_model), got {type(model).__name__}")
        self._torch = torch
        self.model = model.eval()
        self.config = model.config
        self.dtype = str(model.dtype).removeprefix("torch.")
        self.device = model.backbone.embeddings.weight.device
        self.device_kind = self.device.type
        on_cuda = self.device.type == "cuda"
        self.launcher = None
        if kernels == "aot":
            if not on_cuda:
                raise SsmrtError(f"kernels 'aot' launches PTX on a CUDA GPU; the model is on {self.device}")
            from ..plugins.launcher import DriverLauncher

            self.launcher = DriverLauncher()
        elif kernels not in (None, True, False):
            raise SsmrtError(f"kernels must be True, False or 'aot', got {kernels!r}")
        self.kernels = on_cuda if kernels is None else bool(kernels)
        if self.kernels and not on_cuda and not interpreting():
            raise SsmrtError(f"kernels=True on {self.device} tensors runs only in Triton's interpreter "
                             "(TRITON_INTERPRET=1 before Triton is imported); move the model to a CUDA device")
        self.decode = decode or ("cuda_graph" if on_cuda else "eager")
        if self.decode not in MODES:
            raise SsmrtError(f"decode must be one of {', '.join(MODES)}, got {self.decode!r}")
        if self.decode == "cuda_graph" and not on_cuda:
            raise SsmrtError(f"decode 'cuda_graph' needs the model on a CUDA device, it is on {self.device}")
        if self.kernels or self.decode != "eager":
            model.freeze()
        self._graphs = {}

    def _routes(self, inplace_state: bool = False):
        from contextlib import nullcontext

        if not self.kernels:
            return nullcontext()
        from contextlib import ExitStack

        from ..kernels.dispatch import use_kernels
        from ..plugins.launch import use_launcher

        stack = ExitStack()
        stack.enter_context(use_kernels(force=True, inplace_state=inplace_state))
        if self.launcher is not None:
            stack.enter_context(use_launcher(self.launcher))
        return stack

    def zero_state(self, batch: int) -> list:
        batch = checked_batch(batch)
        torch = self._torch
        # float64 models (the compare reference) carry a float64 SSM state; every other dtype float32
        ssm = torch.float64 if self.model.dtype == torch.float64 else torch.float32
        try:
            return flatten_states(self.model.zero_state(batch, self.device, ssm_state_dtype=ssm))
        except (MemoryError, RuntimeError) as e:  # torch's allocator raises RuntimeError
            raise SsmrtError(f"zero_state({batch}): cannot allocate the state ({str(e).splitlines()[0]})") from None

    def forward(self, input_ids, state):
        return self._forward(input_ids, state, last_only=False)

    def forward_last(self, input_ids, state):
        return self._forward(input_ids, state, last_only=True)

    def _forward(self, input_ids, state, last_only: bool):
        torch = self._torch
        ids = torch.as_tensor(checked_ids(input_ids, state, self.config), device=self.device)
        if len(state) != 2 * self.config.n_layer:
            raise SsmrtError(f"state must be {2 * self.config.n_layer} arrays (zero_state() makes one), got "
                             f"{len(state)}")
        if ids.shape[1] == 1 and self.decode != "eager":
            from .decode_graph import StepGraph

            batch = ids.shape[0]
            if batch not in self._graphs:
                self._graphs[batch] = StepGraph(self.model, batch, self.device, self.decode,
                                                lambda: self._routes(inplace_state=True))
            logits, new = self._graphs[batch](ids, state)
            return _numpy(logits), new
        with torch.no_grad(), self._routes():
            logits, new = self.model(ids, pair_states(state), last_only=last_only)
        return _numpy(logits), flatten_states(new)

    def take(self, state, index):
        idx = self._torch.as_tensor(index, dtype=self._torch.long, device=self.device)
        return [s.index_select(0, idx) for s in state]

    def concat(self, states):
        return [self._torch.cat(parts, 0) for parts in zip(*states, strict=True)]

    def copy(self, state):
        return [s.clone() for s in state]

    def to_numpy(self, state):
        return [_numpy(s) for s in state]

    def describe(self) -> str:
        kernels = ", aot kernels" if self.launcher is not None else (", kernels" if self.kernels else "")
        extra = kernels + (f", decode {self.decode}" if self.decode != "eager" else "")
        return f"torch ({self.dtype}, {self.device}{extra})"


def TorchRunnerFromCheckpoint(model_dir, dtype=None, device="cpu", kernels=None, decode=None) -> TorchRunner:  # noqa: N802
    from ..models.checkpoints import load_model

    return TorchRunner(load_model(model_dir, dtype=dtype, device=device), kernels=kernels, decode=decode)


class OnnxRuntimeRunner(Runner):
    """An exported model.onnx on ONNX Runtime: CPU by default, CUDA when asked for and present.

    native_ops: on the CPU provider with a float32 or float16 artifact (its SSM state float32, as exported by
    default), run the ssmrt ops the native library implements (ssmrt.ort_ops) instead of their fallback bodies.
    "auto" uses it where it applies and builds, else the bodies (`native_ops_note` says why); "on" raises where it
    cannot; "off" always runs the bodies. `self.native_ops` lists the ops running natively.
    fuse: with the native ops, run each Mamba-2 mixer's middle, each block's residual add and norm and a float16
    Mamba-1 decode step's mixer middles as one native node each (ssmrt.ort_ops.fusion); False leaves those nodes
    as exported, one native node per ssmrt op (the decode matmuls of a float16 or a quantised graph are still routed
    to HalfMatMul, Int8MatMul or IntDotMatMul)."""

    name = "onnxruntime"

    def __init__(self, path, provider: str = "auto", threads: int = 0, opt_level: str = "all",
                 native_ops: str = "auto", fuse: bool = True):
        import onnxruntime as ort

        self.path = Path(path)
        meta = artifact.read_metadata(self.path)  # refuses a file that is not an ssmrt export, before ORT loads it
        levels = dict(zip(OPT_LEVELS, (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                       ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                       ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                       ort.GraphOptimizationLevel.ORT_ENABLE_ALL), strict=True))
        if opt_level not in levels:
            raise SsmrtError(f"opt_level must be one of {', '.join(levels)}, got {opt_level!r}")
        available = ort.get_available_providers()
        if provider == "auto":
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        elif provider in ("cpu", "cuda"):
            want = "CUDAExecutionProvider" if provider == "cuda" else "CPUExecutionProvider"
            if want not in available:
                raise SsmrtError(f"ONNX Runtime here has no {want} (available: {', '.join(available)})")
            providers = [want]
        else:
            raise SsmrtError(f"provider must be auto, cpu or cuda, got {provider!r}")
        from .limits import check_threads

        threads = check_threads(threads)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = levels[opt_level]
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.native_ops, self.native_ops_note = self._register_native_ops(opts, native_ops, providers, meta)
        if not isinstance(fuse, bool):
            raise SsmrtError(f"fuse must be True or False, got {fuse!r}")
        self.fuse = fuse
        self.fuse_note = ""  # why the fusion was skipped, where it failed
        self.decode_matmuls = self.half_matmul_threads = self.fused_mixers = self.fused_step_mixers = 0
        self.fused_blocks = 0
        self.decode_matmul_op = ""
        self.fused_norms = 0
        model = self._rewrite_graph(opts, meta, threads) if self.native_ops else None
        try:
            self.session = ort.InferenceSession(model or str(self.path), sess_options=opts, providers=providers)
        except Exception as e:
            why = str(e).splitlines()[0]
            if "Could not find an implementation" in why and meta["export"].get("dtype") == "bfloat16":
                why = (f"this bfloat16 artifact needs bfloat16 kernels, which {', '.join(providers)} lacks; "
                       "run it with the CUDA provider or TensorRT, or export float16/float32")
            raise SsmrtError(f"{self.path}: ONNX Runtime cannot load it ({why})") from None
        if model is not None:
            self._drop_model_bytes()
        ort_types = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
                     "tensor(int64)": "int64"}

        def described(args):
            return [(a.name, ort_types.get(a.type, a.type), list(a.shape)) for a in args]

        artifact.check_graph(meta, described(self.session.get_inputs()), described(self.session.get_outputs()),
                             self.path)
        self.config = SSMConfig.from_dict(meta["config"], where=self.path)
        self.state_specs = meta["states"]
        export = meta["export"]
        self.logits_mode = export["logits"]
        self.dtype = export["dtype"]
        self.weights = scheme_of(export.get("weights"), self.path)
        self.providers = self.session.get_providers()
        self.device_kind = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self._np_dtypes = {s["name"]: _numpy_dtype(s["dtype"], self.path) for s in self.state_specs}
        self._out_names = [o.name for o in self.session.get_outputs()]
        # A prompt's activations (in a float16 graph also the float32 copies of the weights that ONNX Runtime's
        # float16 MatMul widens on every call) grow the CPU arena to the largest prompt's working set, which it would
        # keep for the session's life: for a float16 model, more than its weights again. The arena is shrunk at the
        # end of each prompt; decode steps, small and many, keep what they use.
        self._prompt_run_options = None
        if self.device_kind == "cpu":
            self._prompt_run_options = ort.RunOptions()
            self._prompt_run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def _drop_model_bytes(self) -> None:
        """Frees the rewritten graph's bytes once ONNX Runtime has loaded them. Its Python session keeps a model
        given as bytes for as long as the session lives, to create the session again should a provider fail and
        it fall back to the CPU provider: for a rewritten graph, a second copy of every weight beside the one ONNX
        Runtime loaded. The rewrites apply on the CPU provider alone, whose fallback would only make the same
        session again: the fallback is switched off and the bytes it would have needed let go (the session can no
        longer be made again with set_providers, which the runner never calls)."""
        self.session.disable_fallback()
        if getattr(self.session, "_model_bytes", None) is not None:  # a private field: absent in another version
            self.session._model_bytes = None

    def _register_native_ops(self, opts, mode: str, providers: list[str], meta: dict
                             ) -> tuple[tuple[str, ...], str]:
        """Registers ssmrt.ort_ops's library on `opts` where it applies: (the ops it runs, why not if none)."""
        from .. import ort_ops
        from ..ops.spec import CHAINS, OPS_BY_ARCH

        if mode not in NATIVE_OPS_MODES:
            raise SsmrtError(f"native_ops must be one of {', '.join(NATIVE_OPS_MODES)}, got {mode!r}")
        if mode == "off":
            return (), "off by request"
        why = None
        info = {**meta["export"], "arch": meta["config"].get("arch")}
        ops = tuple(op for op in ort_ops.OPS if op in OPS_BY_ARCH.get(info.get("arch"), ())
                    and not (info.get("graph") == "prefill" and op in CHAINS))  # a chain runs on its bodies
        if providers[0] != "CPUExecutionProvider":
            why = f"the native ops are CPU kernels and this session runs on {providers[0]}"
        elif info.get("dtype") not in ("float32", "float16"):
            why = f"the native ops are float32 and float16 kernels and this artifact is {info.get('dtype')}"
        elif info.get("state_dtype", "float32") != "float32":
            why = (f"the native ops keep the SSM state float32, as the op contract does, and this artifact's is "
                   f"{info.get('state_dtype')}")
        elif not ops:
            why = f"the artifact has none of the ops the native library implements ({', '.join(ort_ops.OPS)})"
        else:
            try:
                library = ort_ops.library_path()
            except ort_ops.NativeOpsUnavailable as e:
                why = str(e)
            else:
                try:
                    opts.register_custom_ops_library(str(library))
                    self._library = library
                    return ops, ""
                except Exception as e:  # onnxruntime raises its own Fail; the message is what matters
                    why = f"ONNX Runtime cannot load {library}: {str(e).splitlines()[0]}"
        if mode == "on":
            raise SsmrtError(f"{self.path}: native ops asked for, but {why}")
        return (), why

    def _rewrite_graph(self, opts, meta: dict, threads: int) -> bytes | None:
        """With the native library registered: the graph with each Mamba-2 mixer's middle as one SSDMixer node
        (ssmrt.ort_ops.fuse_ssd_mixers), each block's residual add and norm as one AddRMSNorm node
        (fuse_add_rmsnorms) and, in a float16 artifact, its decode step's weight MatMuls on the library's
        HalfMatMul (route_decode_matmuls), that step's Mamba-1 mixers as SelectiveMixer nodes
        (fuse_selective_mixers) and its Mamba-2 mixers, each with the norm after it, as SSDBlock nodes
        (fuse_ssd_blocks); in an int8 artifact with float32 activations, its decode step's MatMulNBits on
        Int8MatMul, and in an int8 or int4 one with int8 activations on IntDotMatMul where the library has its
        vector code (route_decode_matmuls). As bytes for ONNX Runtime; None (load the file as it is) where none
        applies.
        `self.fused_mixers`, `self.fused_step_mixers`, `self.fused_blocks`, `self.fused_norms` and
        `self.decode_matmuls` count them;
        `self.half_matmul_threads` is the pool size the matmuls are told."""
        mixers = self.fuse and {"CausalConv1d", "SSDScan"} <= set(self.native_ops)
        step_mixers = self.fuse and {"CausalConv1d", "SelectiveScan"} <= set(self.native_ops)
        from .. import ort_ops

        half = meta["export"].get("dtype") == "float16"
        # quantised weights: 8-bit ones with float32 activations go to Int8MatMul, int8-activation ones to
        # IntDotMatMul where it runs on vector instructions (else ONNX Runtime's kernel is the faster)
        weights = meta["export"].get("weights")
        quantised = isinstance(weights, dict) and weights.get("bits") in (4, 8)
        int_dot = quantised and weights.get("activations") == "int8" and ort_ops.int_dot_vectorised(self._library)
        if half:
            self.decode_matmul_op = "HalfMatMul"
        elif quantised:
            self.decode_matmul_op = "IntDotMatMul" if weights.get("activations") == "int8" else "Int8MatMul"
        if half:
            from .limits import physical_cores

            # threads 0: ONNX Runtime's default pool, a thread a physical core (0 where that is not known: the
            # matmuls then deal their blocks out to whatever pool there is)
            self.half_matmul_threads = threads or physical_cores()

        # the rewrites in the order they apply; each fusion is an optimisation: one the matchers trip on is left
        # out and the graph rewritten again without it (a half-done rewrite never reaches ONNX Runtime). Routing
        # is not: its errors propagate.
        last_only = meta["export"].get("logits") == "last"
        stages = [("SSDMixer", mixers, "fused_mixers", ort_ops.fuse_ssd_mixers),
                  ("AddRMSNorm", self.fuse, "fused_norms",
                   lambda model: ort_ops.fuse_add_rmsnorms(model, meta["export"].get("dtype"))),
                  ("routing", half or quantised, "decode_matmuls",
                   lambda model: ort_ops.route_decode_matmuls(model, self.half_matmul_threads, last_only=last_only,
                                                              int_dot=int_dot)),
                  ("SelectiveMixer", step_mixers, "fused_step_mixers", ort_ops.fuse_selective_mixers),
                  ("SSDBlock", mixers and half, "fused_blocks", ort_ops.fuse_ssd_blocks)]
        skipped: set[str] = set()

        def rewritten():
            model = _parse_model(self.path)
            for name, wanted, count, apply in stages:
                setattr(self, count, 0)
                if not wanted or name in skipped:
                    continue
                if name == "routing":
                    setattr(self, count, apply(model))
                    continue
                try:
                    setattr(self, count, apply(model))
                except Exception as e:  # noqa: BLE001  (any error in a matcher: run without that fusion)
                    log.warning("%s: running without the %s fusion (%s: %s)", self.path, name, type(e).__name__, e)
                    note = f"{name} not fused: {type(e).__name__}: {e}"
                    self.fuse_note = f"{self.fuse_note}; {note}" if self.fuse_note else note
                    skipped.add(name)
                    return None
            return model

        model = None
        while model is None:
            model = rewritten()
        if not (self.decode_matmuls or self.fused_mixers or self.fused_norms):
            return None
        # the bytes have no location of their own: external weights are found beside the artifact
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.path.parent))
        return model.SerializeToString()

    def zero_state(self, batch: int) -> list:
        batch = checked_batch(batch)
        try:
            return [np.zeros([batch if d == "batch" else d for d in s["shape"]], dtype=self._np_dtypes[s["name"]])
                    for s in self.state_specs]
        except MemoryError as e:
            raise SsmrtError(f"zero_state({batch}): cannot allocate the state ({e})") from None

    def forward(self, input_ids, state):
        feeds = {"input_ids": checked_ids(input_ids, state, self.config)}
        if len(state) != len(self.state_specs):
            raise SsmrtError(f"state must be {len(self.state_specs)} arrays (zero_state() makes one), got "
                             f"{len(state)}")
        for spec, value in zip(self.state_specs, state, strict=True):
            feeds[spec["name"]] = value
        prompt = feeds["input_ids"].shape[1] > 1
        outs = self.session.run(self._out_names, feeds, self._prompt_run_options if prompt else None)
        return outs[0].astype(np.float32, copy=False), outs[1:]

    def describe(self) -> str:
        native = f", native {'/'.join(self.native_ops)}" if self.native_ops else ""
        native += (f", {self.decode_matmuls} decode matmuls on {self.decode_matmul_op}" if self.decode_matmuls
                   else "")
        native += f", {self.fused_mixers} Mamba-2 mixers fused" if self.fused_mixers else ""
        if self.fused_step_mixers:
            native += f", {self.fused_step_mixers} Mamba-1 mixers fused in the decode step"
        native += f", {self.fused_norms} residual norms fused" if self.fused_norms else ""
        native += f", {self.fused_blocks} decode-step layers on SSDBlock" if self.fused_blocks else ""
        weights = f", {describe_scheme(self.weights)}" if self.weights else ""
        return f"onnxruntime ({self.dtype}{weights}, {self.providers[0]}{native})"


def _parse_model(path: Path):
    """The onnx.ModelProto of an .onnx file, its external data not read, parsed from a map of the file: onnx.load
    reads the file into one bytes object first, a copy of every weight beside the parse. Where the file cannot be
    mapped, onnx.load."""
    import mmap

    import onnx

    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a file system that cannot map files
            return onnx.load(str(path), load_external_data=False)
    model = onnx.ModelProto()
    with mm, memoryview(mm) as data:
        model.ParseFromString(data)  # copies what it keeps: nothing refers to the map once it is closed
    return model


def _numpy_dtype(name: str, path) -> np.dtype:
    if name == "bfloat16":
        raise SsmrtError(f"{path}: bfloat16 artifacts cannot be fed from numpy; run them with TensorRT")
    return np.dtype(name)


def OnnxRuntimeRunnerFromArtifact(path, **opts) -> OnnxRuntimeRunner:  # noqa: N802
    p = user_path(path, "the artifact")
    onnx_path = p / MODEL_FILE if p.is_dir() else p
    if not onnx_path.is_file():
        raise SsmrtError(f"{onnx_path}: not found; expected an artifact directory from `ssmrt export`")
    return OnnxRuntimeRunner(onnx_path, **opts)


def is_artifact(path) -> bool:
    p = Path(path)
    return (p / MODEL_FILE).is_file() or (p.is_file() and p.suffix == ".onnx")


def runner_from_path(path: str | os.PathLike, backend: str | None = None, **opts) -> Runner:
    """An engine directory (ssmrt build) runs on tensorrt; an artifact (model.onnx) on onnxruntime by default; a
    checkpoint directory on torch."""
    from ..engine import is_engine_dir

    p = user_path(path)
    if not p.exists():
        raise SsmrtError(f"{p}: no such file or directory")
    if backend is not None and backend not in BACKENDS:
        raise SsmrtError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if is_engine_dir(p) or backend == "tensorrt":
        if backend not in (None, "tensorrt"):
            raise SsmrtError(f"{p}: is a TensorRT engine directory; it runs on --backend tensorrt")
        from ..engine.runner import TensorRTRunner

        return TensorRTRunner(p, **opts)
    if is_artifact(p):
        if backend == "torch":
            raise SsmrtError(f"{p}: is an ONNX artifact; the torch backend runs a checkpoint directory")
        return OnnxRuntimeRunnerFromArtifact(p, **opts)
    if backend == "onnxruntime":
        raise SsmrtError(f"{p}: has no {MODEL_FILE}; export it first (`ssmrt export {p} -o OUT_DIR`)")
    return TorchRunnerFromCheckpoint(p, **opts)

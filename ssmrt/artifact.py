"""The exported artifact's layout: file names, metadata keys, state names, and the one metadata reader.

An artifact is a directory holding `model.onnx` (its weights inside, or beside it in `model.onnx.data`) and
the tokenizer files copied from the checkpoint. The model's config, the state specs and the export options
are JSON strings in the model's `metadata_props`. The exporter writes through this module; the runtime,
`ssmrt inspect` and the output-directory checks read through it. Nothing here imports torch (onnx only to
describe an artifact's graph).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from .errors import SsmrtError

MODEL_FILE = "model.onnx"
DATA_FILE = MODEL_FILE + ".data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json")
# Every name ssmrt writes into an artifact directory; anything else there was put there by someone else.
# A TensorRT-target export adds the prefill graph: each scan as its chain of one-kernel nodes (the weights are
# the same external data file's).
PREFILL_FILE = "prefill.onnx"
ARTIFACT_FILES = (MODEL_FILE, DATA_FILE, PREFILL_FILE, *TOKENIZER_FILES)

META_CONFIG = "ssmrt.config"
META_STATES = "ssmrt.states"
META_EXPORT = "ssmrt.export"
META_KEYS = (META_CONFIG, META_STATES, META_EXPORT)

DTYPES = ("float32", "float16", "bfloat16")
LOGITS_MODES = ("all", "last")  # logits for every position, or only the last
# portable: one node per op, for any runtime; tensorrt: also prefill.onnx, for engines of one-kernel plugins
TARGETS = ("portable", "tensorrt")
DEFAULT_OPSET = 21
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def state_names(n_layer: int) -> tuple[list[str], list[str]]:
    """The graph's state inputs and outputs in graph order: conv_state.0, ssm_state.0, conv_state.1, ..."""
    ins, outs = [], []
    for i in range(n_layer):
        ins += [f"conv_state.{i}", f"ssm_state.{i}"]
        outs += [f"present_conv_state.{i}", f"present_ssm_state.{i}"]
    return ins, outs


def pair_states(flat) -> tuple:
    """A state in graph order [conv_state.0, ssm_state.0, conv_state.1, ...] as per-layer (conv, ssm) pairs,
    the models' form."""
    return tuple((flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2))


def flatten_states(pairs) -> list:
    """Per-layer (conv, ssm) pairs as one list in graph order: the inverse of pair_states."""
    return [t for pair in pairs for t in pair]


def state_specs(n_layer: int, conv_shape, ssm_shape, dtype: str, state_dtype: str) -> list[dict]:
    """The `ssmrt.states` entries: one per state tensor, in graph order (the conv state follows the
    activations' dtype, the SSM state has its own)."""
    ins, outs = state_names(n_layer)
    specs = []
    for i in range(n_layer):
        specs.append({"name": ins[2 * i], "output": outs[2 * i], "layer": i, "kind": "conv",
                      "shape": list(conv_shape), "dtype": dtype})
        specs.append({"name": ins[2 * i + 1], "output": outs[2 * i + 1], "layer": i, "kind": "ssm",
                      "shape": list(ssm_shape), "dtype": state_dtype})
    return specs


def state_bytes(specs: list[dict], batch: int = 1) -> int:
    """Bytes of a whole state (every layer's conv and SSM state) for `batch` sequences, from the state specs."""
    total = 0
    for spec in specs:
        n = ITEMSIZE[spec["dtype"]]
        for d in spec["shape"]:
            n *= batch if d == "batch" else int(d)
        total += n
    return total


def write_metadata(model, config: dict, states: list[dict], export: dict) -> None:
    """Sets a ModelProto's metadata_props to the ssmrt metadata (and nothing else)."""
    meta = {META_CONFIG: json.dumps(config), META_STATES: json.dumps(states), META_EXPORT: json.dumps(export)}
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)


def model_file(path) -> Path:
    """The .onnx file of an artifact directory (or the file itself)."""
    from .fsutil import user_path

    p = user_path(path, "the artifact")
    return p / MODEL_FILE if p.is_dir() else p


# ------------------------------------------------------------------------------------------ reading


def read_metadata_props(path) -> dict[str, str]:
    """ModelProto.metadata_props (field 14) of an .onnx file, read by walking the protobuf wire format's
    top-level fields and seeking over every other one (the graph and weights are never read). Raises only
    SsmrtError, naming the file, for anything that is not a well-formed ONNX file."""
    path = Path(path)
    meta = {}
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for entry in _length_delimited_fields(f, size, {14}, path):
                kv = dict(_length_delimited_fields(io.BytesIO(entry), len(entry), {1, 2}, path, numbered=True))
                meta[kv.get(1, b"").decode()] = kv.get(2, b"").decode()
    except UnicodeDecodeError:
        raise SsmrtError(f"{path}: not an ONNX model (a metadata entry is not UTF-8)") from None
    except OSError as e:
        raise SsmrtError(f"{path}: cannot be read ({e.strerror or e})") from None
    return meta


def _length_delimited_fields(f, size: int, keep: set[int], path, numbered: bool = False):
    """The payloads of the length-delimited fields numbered `keep` in the message read from `f` (`size` bytes),
    in order; every other field is skipped unread. A truncated or malformed message raises SsmrtError."""

    def bad(why: str):
        return SsmrtError(f"{path}: not an ONNX model ({why})")

    def varint(first: bytes | None = None) -> int:
        shift = value = 0
        for _ in range(10):
            byte = first or f.read(1)
            first = None
            if not byte:
                raise bad("truncated")
            value |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                return value
            shift += 7
        raise bad("a varint longer than 10 bytes")

    fixed = {1: 8, 5: 4}  # wire type -> size
    while first := f.read(1):
        key = varint(first)
        number, wire = key >> 3, key & 7
        if wire == 0:
            varint()
        elif wire in fixed or wire == 2:
            length = fixed[wire] if wire in fixed else varint()
            if f.tell() + length > size:
                raise bad(f"field {number} runs past the end of the file: truncated")
            if wire == 2 and number in keep:
                payload = f.read(length)
                yield (number, payload) if numbered else payload
            else:
                f.seek(length, os.SEEK_CUR)
        else:
            raise bad(f"protobuf wire type {wire}")


def read_metadata(path) -> dict:
    """The ssmrt metadata of an .onnx file (or artifact directory) as parsed JSON: {"config": dict,
    "states": list, "export": dict}. SsmrtError, naming the file, if it is not an ssmrt export."""
    f = model_file(path)
    if not f.is_file():
        raise SsmrtError(f"{f}: not found; expected an artifact directory from `ssmrt export`")
    props = read_metadata_props(f)
    if META_CONFIG not in props:
        raise SsmrtError(f"{f}: not an ssmrt export (no '{META_CONFIG}' metadata)")
    out = {}
    for key, kind in ((META_CONFIG, dict), (META_STATES, list), (META_EXPORT, dict)):
        if key not in props:
            raise SsmrtError(f"{f}: the ssmrt metadata lacks '{key}'")
        try:
            value = json.loads(props[key])
        except ValueError as e:
            raise SsmrtError(f"{f}: metadata '{key}' is not valid JSON ({e})") from None
        if not isinstance(value, kind):
            raise SsmrtError(f"{f}: metadata '{key}' must be a JSON {kind.__name__}, got {type(value).__name__}")
        out[key.removeprefix("ssmrt.")] = value
    return out


MAX_STATE_BYTES = 1 << 40  # per sequence: any real model's state is orders of magnitude smaller


def check_states(states: list, where) -> None:
    """The state specs of an artifact's metadata, checked before anything is allocated from them: each a dict
    with a name, an output, a kind, a dtype ssmrt writes and a shape of "batch" then positive sizes."""
    for i, spec in enumerate(states):
        if not isinstance(spec, dict) or not {"name", "output", "kind", "shape", "dtype"} <= set(spec):
            raise SsmrtError(f"{where}: metadata state {i} must name its name, output, kind, shape and dtype")
        shape = spec["shape"]
        if spec["dtype"] not in ITEMSIZE:
            raise SsmrtError(f"{where}: metadata state {spec['name']!r} has dtype {spec['dtype']!r}; expected one of "
                             f"{', '.join(ITEMSIZE)}")
        if (not isinstance(shape, list) or not shape or shape[0] != "batch"
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:])):
            raise SsmrtError(f"{where}: metadata state {spec['name']!r} has shape {shape!r}; expected "
                             "[\"batch\", positive sizes...]")
    if states and state_bytes(states) > MAX_STATE_BYTES:
        raise SsmrtError(f"{where}: metadata states total {state_bytes(states):,} bytes a sequence, which no model "
                         "has; the metadata is not this model's")


def check_graph(meta: dict, inputs: list, outputs: list, where) -> None:
    """The metadata against the graph it describes: inputs [(name, dtype, shape)] must be input_ids then the
    states in metadata order, with the metadata's dtypes and sizes; outputs the logits (as wide as the
    config's padded vocabulary) then the new states. dtype: "float32" etc.; a shape entry is an int or a name
    (a dynamic size). SsmrtError in one line for the first disagreement: a runtime must not decode by lying
    metadata."""
    states = meta["states"]
    check_states(states, where)
    want_in = ["input_ids", *(s["name"] for s in states)]
    want_out = ["logits", *(s["output"] for s in states)]
    got_in, got_out = [t[0] for t in inputs], [t[0] for t in outputs]
    if got_in != want_in:
        raise SsmrtError(f"{where}: the graph's inputs {got_in[:4]}{'...' if len(got_in) > 4 else ''} are not "
                         f"the metadata's {want_in[:4]}{'...' if len(want_in) > 4 else ''}")
    if got_out != want_out:
        raise SsmrtError(f"{where}: the graph's outputs {got_out[:4]}{'...' if len(got_out) > 4 else ''} are not "
                         f"the metadata's {want_out[:4]}{'...' if len(want_out) > 4 else ''}")
    for spec, (name, dtype, shape) in zip(states, inputs[1:], strict=True):
        static = [d if isinstance(d, int) and d > 0 else None for d in shape]
        want = [None, *spec["shape"][1:]]
        if dtype != spec["dtype"] or len(static) != len(want) or any(
                g is not None and g != w for g, w in zip(static, want, strict=True)):
            raise SsmrtError(f"{where}: state {name} is {dtype} {list(shape)} in the graph, {spec['dtype']} "
                             f"{spec['shape']} in the metadata")
    cfg = meta["config"]
    vocab, multiple = cfg.get("vocab_size"), cfg.get("pad_vocab_size_multiple", 1) or 1
    width = outputs[0][2][-1] if outputs[0][2] else None
    if isinstance(vocab, int) and isinstance(width, int) and width > 0:
        padded = -(-vocab // multiple) * multiple
        if width != padded:
            raise SsmrtError(f"{where}: the graph's logits are {width} wide, the metadata's vocabulary {vocab} "
                             f"(padded to {padded})")


def export_info(path) -> dict:
    """The export options (dtype, logits, ...) and the model's `arch`, from the metadata alone; empty where the
    file is not an ssmrt export."""
    try:
        meta = read_metadata(path)
    except SsmrtError:
        return {}
    return {**meta["export"], "arch": meta["config"].get("arch")}


def only_our_files(directory, names: list[str], allowed, main_file: str, kind: str) -> str | None:
    """What every recogniser of an earlier ssmrt output checks first: the entries `names` are all files ssmrt
    writes there (`allowed`), regular files, and include `main_file` (whose contents the caller checks). None,
    or what is in the way, in words (`kind`: "an ssmrt export", ...)."""
    foreign = [n for n in names if n not in allowed]
    if foreign:
        return f"holds {foreign[0]!r}, which ssmrt did not write"
    if main_file not in names:
        return f"holds {names[0]!r} but no {main_file}, so it is not {kind}"
    odd = not_regular_files(directory, names)
    if odd:
        return f"holds {odd!r}, which is not a regular file (ssmrt writes only files, never links or folders)"
    return None


def earlier_export_problem(directory, names: list[str]) -> str | None:
    """None if the entries `names` of `directory` are an earlier ssmrt export and nothing else (so replacing
    it touches no file ssmrt did not write); otherwise what is in the way, in words."""
    problem = only_our_files(directory, names, ARTIFACT_FILES, MODEL_FILE, "an ssmrt export")
    if problem:
        return problem
    f = Path(directory) / MODEL_FILE
    try:
        props = read_metadata_props(f)
    except SsmrtError as e:
        return f"its {MODEL_FILE} is not an ssmrt export ({str(e).split('(', 1)[-1].rstrip(')')})"
    if not all(k in props for k in META_KEYS):
        return f"holds a {MODEL_FILE} that ssmrt did not write (no ssmrt metadata)"
    return None


def not_regular_files(directory, names: list[str]) -> str | None:
    """The first of `names` in `directory` that is not a regular file (a link, a folder, ...), or None."""
    for name in names:
        try:
            if not os.path.isfile(os.path.join(directory, name)) or os.path.islink(os.path.join(directory, name)):
                return name
        except OSError:
            return name
    return None


def check_output(out, overwrite: bool = False):
    """check_output_dir for an artifact directory (see ssmrt.fsutil): call it before the long export."""
    from .fsutil import check_output_dir

    return check_output_dir(out, recognise=earlier_export_problem, overwrite=overwrite)


def describe(path) -> dict:
    """What an artifact holds, for `ssmrt inspect`: config, export options, ops and node counts, inputs and
    outputs, state shapes and size (the weights are not loaded)."""
    from collections import Counter

    import onnx

    f = model_file(path)
    meta = read_metadata(f)  # refuses, in one line, anything that is not an ssmrt export
    try:
        m = onnx.load(str(f), load_external_data=False)
    except Exception as e:
        raise SsmrtError(f"{f}: not a readable ONNX model ({str(e).splitlines()[0]})") from None
    states = meta["states"]

    def tensor(vi):
        t = vi.type.tensor_type
        dtype = "bfloat16" if t.elem_type == onnx.TensorProto.BFLOAT16 else \
            onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        return {"name": vi.name, "dtype": dtype, "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

    def count(dims) -> int:
        n = 1
        for d in dims:
            n *= int(d)
        return n

    ins, outs = [tensor(v) for v in m.graph.input], [tensor(v) for v in m.graph.output]
    check_graph(meta, [(t["name"], t["dtype"], t["shape"]) for t in ins],
                [(t["name"], t["dtype"], t["shape"]) for t in outs], f)
    ops = Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in m.graph.node)
    from .quantize import scheme_of

    weights = scheme_of(meta["export"].get("weights"), f)
    # a MatMulNBits weight counts its K x N parameters, not its packed bytes, scales and zero points; so does a
    # quantised embedding table
    packed = {}
    for n in m.graph.node:
        if n.op_type == "MatMulNBits" and n.domain == "com.microsoft":
            attrs = {a.name: a.i for a in n.attribute}
            packed[n.input[1]] = attrs.get("K", 0) * attrs.get("N", 0)
            packed.update({name: 0 for name in n.input[2:]})
        elif n.op_type == "GatherBlockQuantized" and n.domain == "com.microsoft":  # the embedding table
            bits = next((a.i for a in n.attribute if a.name == "bits"), 4)
            dims = next((list(t.dims) for t in m.graph.initializer if t.name == n.input[0]), [0, 0])
            packed[n.input[0]] = count(dims) * (8 // bits)
            packed.update({name: 0 for name in n.input[2:]})
    conv = next(s for s in states if s["kind"] == "conv")
    ssm = next(s for s in states if s["kind"] == "ssm")
    return {
        "path": str(f),
        "config": meta["config"],
        "export": meta["export"],
        "nodes": len(m.graph.node),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "functions": [f"{fn.domain}::{fn.name}" for fn in m.functions],
        "parameters": sum(packed.get(t.name, count(t.dims)) for t in m.graph.initializer),
        "weights": weights,
        "inputs": ins,
        "outputs": outs,
        "state_layers": len(states) // 2,
        "conv_state_shape": conv["shape"],
        "ssm_state_shape": ssm["shape"],
        "state_bytes_per_sequence": state_bytes(states),
    }

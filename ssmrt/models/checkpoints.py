"""Checkpoint directories -> SSMConfig + MambaLM: HF transformers (mamba, mamba2, falcon_mamba) and mamba_ssm.

Only safe formats are read: safetensors, or torch.load(weights_only=True). Every problem raises
CheckpointError naming the file and what was expected.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from pathlib import Path

from ..errors import CheckpointError, SsmrtError
from ..fsutil import check_output_dir, output_directory, user_path
from .config import ConfigError, SSMConfig

CONFIG_FILE = "config.json"
HF_MODEL_TYPES = ("mamba", "mamba2", "falcon_mamba")
MAMBA_SSM_LAYERS = ("Mamba1", "Mamba2")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# ---------------------------------------------------------------------------------------------- config


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class _Keys:
    """Typed reads of one config.json object: a value of the wrong kind is refused in one line naming its key
    (prefix + key), never converted into something else (int(2.5), bool("false"))."""

    def __init__(self, raw: dict, path: Path, prefix: str = ""):
        self.raw, self.path, self.prefix = raw, path, prefix

    def _bad(self, key: str, expected: str, v) -> CheckpointError:
        return CheckpointError(f"{self.path}: {self.prefix}{key} must be {expected}, got {v!r}")

    def int(self, key: str, default, positive: bool = True) -> int:
        v = self.raw.get(key, default)
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or (positive and v < 1):
            raise self._bad(key, "a positive integer" if positive else "an integer", v)
        return v

    def float(self, key: str, default) -> float:
        v = self.raw.get(key, default)
        try:
            return _float(v)
        except (TypeError, ValueError):
            raise self._bad(key, "a number", v) from None

    def bool(self, key: str, default) -> bool:
        v = self.raw.get(key, default)
        if not isinstance(v, bool):
            raise self._bad(key, "true or false", v)
        return v

    def token(self, key: str) -> int | None:
        v = _first_id(self.raw.get(key))
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise self._bad(key, "a token id (an integer or null)", self.raw.get(key))
        return v

    def limit(self, key: str) -> tuple[float, float]:
        v = self.raw.get(key, (0.0, math.inf))
        try:
            lo, hi = v
            return _float(lo), _float(hi)
        except (TypeError, ValueError):
            raise self._bad(key, "[min, max]", v) from None


def _float(v) -> float:
    """JSON floats, including transformers' {"__float__": "Infinity"} and the bare Infinity literal."""
    if isinstance(v, dict) and "__float__" in v:
        v = float(v["__float__"])
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"expected a number, got {v!r}")
    return float(v)


def _first_id(v):
    if isinstance(v, list):
        return v[0] if v else None
    return v


# The config.json keys behind each SSMConfig field, for messages about a value the file gave.
HF_KEYS = {
    "d_model": "hidden_size", "n_layer": "num_hidden_layers", "norm_eps": "layer_norm_epsilon",
    "gated_norm_eps": "layer_norm_epsilon", "d_inner": "intermediate_size", "d_conv": "conv_kernel",
    "d_state": "state_size", "dt_rank": "time_step_rank", "headdim": "head_dim", "ngroups": "n_groups",
    "dt_limit": "time_step_limit", "d_ssm": "num_heads * head_dim", "tie_embeddings": "tie_word_embeddings",
    "conv_bias": "use_conv_bias", "bias": "use_bias",
}
MAMBA_SSM_KEYS = {
    "norm_eps": "norm_epsilon", "d_inner": "ssm_cfg.expand * d_model", "dt_limit": "ssm_cfg.dt_limit",
    **{k: f"ssm_cfg.{k}" for k in ("d_state", "d_conv", "dt_rank", "headdim", "ngroups", "d_ssm", "chunk_size",
                                   "conv_bias", "bias", "D_has_hdim", "rmsnorm", "norm_before_gate")},
}


def config_keys(config: SSMConfig) -> dict[str, str]:
    """SSMConfig field -> the config.json key it was read from, for the reader that made config."""
    return MAMBA_SSM_KEYS if config.source == "mamba_ssm" else HF_KEYS


def _config_from_hf(raw: dict, path: Path) -> SSMConfig:
    model_type = raw["model_type"]
    k = _Keys(raw, path)
    d_model = k.int("hidden_size", 768)
    if raw.get("intermediate_size"):
        d_inner = k.int("intermediate_size", None)
    else:
        expand = k.float("expand", 2)
        if not (math.isfinite(expand) and expand > 0):
            raise CheckpointError(f"{path}: expand must be a positive number, got {raw.get('expand')!r}")
        d_inner = int(expand * d_model)
    common = dict(
        d_model=d_model,
        n_layer=k.int("num_hidden_layers", 32),
        vocab_size=k.int("vocab_size", 50280),
        pad_vocab_size_multiple=1,  # HF checkpoints store the embedding at vocab_size rows
        residual_in_fp32=k.bool("residual_in_fp32", True),
        norm_eps=k.float("layer_norm_epsilon", 1e-5),
        d_inner=d_inner,
        d_conv=k.int("conv_kernel", 4),
        conv_bias=k.bool("use_conv_bias", True),
        bias=k.bool("use_bias", False),
        bos_token_id=k.token("bos_token_id"),
        eos_token_id=k.token("eos_token_id"),
        pad_token_id=k.token("pad_token_id"),
        source=f"hf:{model_type}",
    )
    # 0 would mean "auto" to SSMConfig, so an explicit rank must be positive.
    dt_rank = -(-d_model // 16) if raw.get("time_step_rank", "auto") == "auto" else k.int("time_step_rank", 0)
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
    if model_type in ("mamba", "falcon_mamba"):
        return SSMConfig(
            arch="mamba1",
            tie_embeddings=k.bool("tie_word_embeddings", True),
            d_state=k.int("state_size", 16),
            dt_rank=dt_rank,
            mixer_rms_eps=k.float("mixer_rms_eps", 1e-6) if model_type == "falcon_mamba" else None,
            **common,
        )
    lo, hi = k.limit("time_step_limit")
    num_heads = k.int("num_heads", 128)
    head_dim = k.int("head_dim", 64)
    if num_heads * head_dim != common["d_inner"]:
        raise CheckpointError(
            f"{path}: num_heads * head_dim ({num_heads} * {head_dim}) must equal "
            f"hidden_size * expand ({common['d_inner']})"
        )
    return SSMConfig(
        arch="mamba2",
        tie_embeddings=k.bool("tie_word_embeddings", False),
        d_state=k.int("state_size", 128),
        headdim=head_dim,
        ngroups=k.int("n_groups", 8),
        chunk_size=k.int("chunk_size", 256),
        gated_norm_eps=common["norm_eps"],
        dt_min_limit=lo,
        dt_max_limit=hi,
        **common,
    )


def _config_from_mamba_ssm(raw: dict, path: Path) -> SSMConfig:
    if not isinstance(raw.get("ssm_cfg") or {}, dict):
        raise CheckpointError(f"{path}: ssm_cfg must be an object, got {raw['ssm_cfg']!r}")
    ssm_cfg = dict(raw.get("ssm_cfg") or {})
    k, sk = _Keys(raw, path), _Keys(ssm_cfg, path, "ssm_cfg.")
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer not in MAMBA_SSM_LAYERS:
        raise CheckpointError(f"{path}: unknown ssm_cfg.layer {layer!r}; expected one of {MAMBA_SSM_LAYERS}")
    if raw.get("attn_layer_idx"):
        raise CheckpointError(f"{path}: attention layers (attn_layer_idx) are not supported, only pure SSM models")
    if raw.get("d_intermediate", 0):
        raise CheckpointError(f"{path}: MLP blocks (d_intermediate > 0) are not supported")
    if not raw.get("rms_norm", True):
        raise CheckpointError(f"{path}: rms_norm=false (LayerNorm blocks) is not supported")
    d_model = k.int("d_model", None)
    expand = sk.float("expand", 2)
    if not (math.isfinite(expand) and expand > 0):
        raise CheckpointError(f"{path}: ssm_cfg.expand must be a positive number, got {ssm_cfg['expand']!r}")
    common = dict(
        d_model=d_model,
        n_layer=k.int("n_layer", None),
        vocab_size=k.int("vocab_size", 50277),
        pad_vocab_size_multiple=k.int("pad_vocab_size_multiple", 8),
        tie_embeddings=k.bool("tie_embeddings", True),
        residual_in_fp32=k.bool("residual_in_fp32", False),
        norm_eps=k.float("norm_epsilon", 1e-5),
        d_inner=int(expand * d_model),
        d_conv=sk.int("d_conv", 4),
        conv_bias=sk.bool("conv_bias", True),
        bias=sk.bool("bias", False),
        source="mamba_ssm",
    )
    for key in ("expand", "d_conv", "conv_bias", "bias"):
        ssm_cfg.pop(key, None)
    # Initialisation-only settings do not change the forward pass.
    for k in ("dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "A_init_range", "use_fast_path",
              "layer_idx", "device", "dtype", "process_group", "sequence_parallel", "use_mem_eff_path"):
        ssm_cfg.pop(k, None)
    if layer == "Mamba1":
        cfg_kw = dict(
            arch="mamba1",
            d_state=sk.int("d_state", 16),
            # 0 would mean "auto" to SSMConfig, so an explicit rank must be positive.
            dt_rank=-(-d_model // 16) if ssm_cfg.get("dt_rank", "auto") == "auto" else sk.int("dt_rank", 0),
        )
    else:
        lo, hi = sk.limit("dt_limit")
        cfg_kw = dict(
            arch="mamba2",
            d_state=sk.int("d_state", 128),
            headdim=sk.int("headdim", 64),
            ngroups=sk.int("ngroups", 1),
            d_ssm=sk.int("d_ssm", 0, positive=False) if ssm_cfg.get("d_ssm") else 0,
            chunk_size=sk.int("chunk_size", 256),
            D_has_hdim=sk.bool("D_has_hdim", False),
            rmsnorm=sk.bool("rmsnorm", True),
            norm_before_gate=sk.bool("norm_before_gate", False),
            dt_min_limit=lo,
            dt_max_limit=hi,
        )
    for key in ("d_state", "dt_rank", "dt_limit", "headdim", "ngroups", "d_ssm", "chunk_size", "D_has_hdim",
                "rmsnorm", "norm_before_gate"):
        if layer == "Mamba2" or key in ("d_state", "dt_rank"):
            ssm_cfg.pop(key, None)
    if ssm_cfg:
        raise CheckpointError(f"{path}: unsupported ssm_cfg settings for {layer}: {sorted(ssm_cfg)}")
    return SSMConfig(**cfg_kw, **common)


def load_config(model_dir: str | os.PathLike) -> SSMConfig:
    """Read and validate the config.json of an HF or mamba_ssm checkpoint directory."""
    d = user_path(model_dir, "the checkpoint directory")
    if not d.exists():
        raise CheckpointError(f"{d}: no such directory")
    if not d.is_dir():
        raise CheckpointError(f"{d}: expected a checkpoint directory (config.json + weights), got a file")
    path = d / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint directory needs config.json beside its weights")
    raw = _read_json(path)
    keys = HF_KEYS if "model_type" in raw else MAMBA_SSM_KEYS
    try:
        if "model_type" in raw:
            if raw["model_type"] not in HF_MODEL_TYPES:
                raise CheckpointError(
                    f"{path}: unknown model_type {raw['model_type']!r}; expected one of {HF_MODEL_TYPES}"
                )
            return _config_from_hf(raw, path)
        if "d_model" in raw and "n_layer" in raw:
            return _config_from_mamba_ssm(raw, path)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e.render(keys)}") from None
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise CheckpointError(f"{path}: invalid config ({e})") from None
    raise CheckpointError(
        f"{path}: neither an HF config (model_type) nor a mamba_ssm config (d_model, n_layer)"
    )


# --------------------------------------------------------------------------------------------- weights


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or unreadable safetensors file ({e})") from None


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape from the file's header, reading no tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or unreadable safetensors file ({e})") from None


def _first_sentence(e: Exception) -> str:
    return str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__


def _load_torch_bin(path: Path) -> dict:
    import torch

    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: refused: this pickle needs code execution to load (only plain tensors are "
                "accepted; convert it to safetensors)"
            ) from None
        raise CheckpointError(f"{path}: truncated or unreadable ({_first_sentence(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or unreadable ({_first_sentence(e)})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return sd


def _allowed_roots(d: Path) -> list[Path]:
    root = d.resolve()
    roots = [root]
    # The Hugging Face hub cache keeps a revision's files as links snapshots/<rev>/<file> -> ../../blobs/<hash>,
    # so a shard linked into that repository's blobs is still the checkpoint's own.
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def _shard_path(index_path: Path, key: str, shard, roots: list[Path]) -> Path:
    """The file a weight_map entry names. An index is part of a checkpoint that may come from anyone: a shard
    outside the checkpoint directory (absolute, through "..", or a link out of it) would have ssmrt read and
    report on any file of this machine, so it is refused."""
    if not isinstance(shard, str) or not shard or "\0" in shard:
        raise CheckpointError(f"{index_path}: weight_map entry {key!r}: expected a shard file name, got {shard!r}")
    if os.path.isabs(shard) or shard.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", shard) \
            or ".." in re.split(r"[/\\]", shard):
        raise CheckpointError(
            f"{index_path}: weight_map entry {key!r} names {shard!r}, outside the checkpoint directory"
        )
    path = index_path.parent / shard
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # a loop of links
        raise CheckpointError(f"{index_path}: weight_map entry {key!r} names {shard!r}, which cannot be "
                              f"resolved ({_first_sentence(e)})") from None
    if not any(real.is_relative_to(root) for root in roots):
        raise CheckpointError(
            f"{index_path}: weight_map entry {key!r} names {shard!r}, a link to {real}, outside the checkpoint "
            "directory"
        )
    return path


def _weight_source(model_dir: str | os.PathLike) -> tuple[Path, list[Path], dict | None]:
    """(the weights file or index found, the files that hold the tensors, the index's weight_map (tensor name ->
    shard) or None). Only an index is read; every shard it names is checked to be inside the directory and
    present. safetensors first, then pytorch_model.bin."""
    d = Path(model_dir)
    for name in WEIGHT_FILES:
        p = d / name
        if not p.is_file():
            continue
        if not name.endswith(".index.json"):
            return p, [p], None
        weight_map = _read_json(p).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{p}: missing or empty 'weight_map'")
        roots, shards = _allowed_roots(d), {}
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or shard not in shards:
                shards[shard] = _shard_path(p, key, shard, roots)
        files = [shards[s] for s in sorted(shards)]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard named in {p.name} is missing")
        return p, files, weight_map
    raise CheckpointError(f"{d}: no weights found; expected one of {', '.join(WEIGHT_FILES)}")


def _check_listed(source: Path, weight_map: dict | None, names) -> None:
    if weight_map is None:
        return
    listed_missing = sorted(k for k in weight_map if k not in names)
    if listed_missing:
        raise CheckpointError(f"{source}: tensors listed in weight_map are in no shard: {listed_missing[:5]}")


def _tensor_shapes(source: Path, files: list[Path], weight_map: dict | None) -> tuple[dict, dict] | None:
    """(name -> shape, name -> file) from what is known before any tensor data is read: safetensors headers, or
    a pytorch_model.bin index's names (shape None). None for a lone pytorch_model.bin (only loading it tells)."""
    if source.name == "pytorch_model.bin":
        return None
    if source.name == "pytorch_model.bin.index.json":
        return {k: None for k in weight_map}, {k: source.parent / v for k, v in weight_map.items()}
    shapes, origin = {}, {}
    for f in files:
        for k, shape in _safetensors_shapes(f).items():
            shapes[k], origin[k] = shape, f
    _check_listed(source, weight_map, shapes)
    return shapes, origin


def _read_tensors(source: Path, files: list[Path], weight_map: dict | None) -> tuple[dict, dict]:
    load_one = _load_safetensors if "safetensors" in source.name else _load_torch_bin
    tensors, origin = {}, {}
    for f in files:
        for k, v in load_one(f).items():
            tensors[k], origin[k] = v, f
    _check_listed(source, weight_map, tensors)
    return tensors, origin


def load_weights(model_dir: str | os.PathLike) -> tuple[dict, dict, Path]:
    """Returns (name -> tensor, name -> file it came from, the weights file or index read).
    safetensors first, then pytorch_model.bin."""
    source, files, weight_map = _weight_source(model_dir)
    return (*_read_tensors(source, files, weight_map), source)


def _map_mamba_ssm_names(sd: dict) -> dict:
    return {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v for k, v in sd.items()}


def _to_mamba_ssm_names(sd: dict) -> dict:
    return {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v for k, v in sd.items()}


# Non-persistent or derived entries some writers include.
IGNORED_SUFFIXES = ("_layernorm.weight", "rotary_emb.inv_freq")


def _model_names(d: dict, config: SSMConfig) -> dict:
    """A checkpoint's name -> x in MambaLM's names, less the entries no model holds."""
    if config.source == "mamba_ssm":
        d = _map_mamba_ssm_names(d)
    return {k: v for k, v in d.items() if not k.endswith(IGNORED_SUFFIXES)}


def _file_name(k: str, config: SSMConfig) -> str:
    """The name a tensor has in the checkpoint's file (for messages)."""
    return "backbone.embedding.weight" if config.source == "mamba_ssm" and k == "backbone.embeddings.weight" else k


def expected_shapes(config: SSMConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """What MambaLM(config) holds, computed without building it (tests compare the two): (the tensors outside
    the layers, name -> shape; the tensors of each layer, name after "backbone.layers.{i}." -> shape).
    lm_head.weight is listed only when untied."""
    c = config
    top = {"backbone.embeddings.weight": (c.padded_vocab_size, c.d_model), "backbone.norm_f.weight": (c.d_model,)}
    if not c.tie_embeddings:
        top["lm_head.weight"] = (c.padded_vocab_size, c.d_model)
    if c.arch == "mamba1":
        mixer = {
            "in_proj.weight": (2 * c.d_inner, c.d_model),
            "conv1d.weight": (c.d_inner, 1, c.d_conv),
            "x_proj.weight": (c.dt_rank + 2 * c.d_state, c.d_inner),
            "dt_proj.weight": (c.d_inner, c.dt_rank),
            "dt_proj.bias": (c.d_inner,),
            "A_log": (c.d_inner, c.d_state),
            "D": (c.d_inner,),
        }
        in_width = 2 * c.d_inner
    else:
        in_width = 2 * c.d_inner + 2 * c.ngroups * c.d_state + c.nheads
        mixer = {
            "in_proj.weight": (in_width, c.d_model),
            "conv1d.weight": (c.conv_dim, 1, c.d_conv),
            "dt_bias": (c.nheads,),
            "A_log": (c.nheads,),
            "D": (c.d_ssm if c.D_has_hdim else c.nheads,),
        }
        if c.rmsnorm:
            mixer["norm.weight"] = (c.d_ssm,)
    mixer["out_proj.weight"] = (c.d_model, c.d_inner)
    if c.bias:
        mixer["in_proj.bias"] = (in_width,)
        mixer["out_proj.bias"] = (c.d_model,)
    if c.conv_bias:
        mixer["conv1d.bias"] = (mixer["conv1d.weight"][0],)
    layer = {"norm.weight": (c.d_model,), **{f"mixer.{k}": v for k, v in mixer.items()}}
    return top, layer


_LAYER_NAME = re.compile(r"backbone\.layers\.(0|[1-9][0-9]*)\.(.+)")
TIED_HEAD = ("lm_head.weight differs from the embedding but the config says the embeddings are tied (set "
             "tie_embeddings / tie_word_embeddings to false)")


def _check_tensor_index(config: SSMConfig, shapes: dict, origin: dict, source: Path) -> None:
    """The checkpoint's tensor names and shapes (None: not known yet) against what the config builds, from the
    names and shapes alone: a config that disagrees with its weights (a layer count of 10**8, another
    d_model) is refused before anything of its size is allocated."""
    n = config.n_layer
    n_layer_key = config_keys(config).get("n_layer", "n_layer")
    top, per_layer = expected_shapes(config)
    layer_of = {}
    for k in shapes:
        m = _LAYER_NAME.fullmatch(k)
        if m:
            layer_of[k] = (int(m[1]), m[2])
    held = {i for i, _ in layer_of.values()}
    if len({i for i in held if i < n}) < n:
        first = next(i for i in range(n) if i not in held)  # found within len(held) + 1 steps
        raise CheckpointError(f"{source}: holds no tensors of layer {first}, but {CONFIG_FILE} has {n_layer_key} "
                              f"{n} (the weights have {len(held)} layers)")
    # From here n <= the number of tensors, so walking the layers is bounded by the checkpoint's own size.
    missing = [k for k in top if k not in shapes]
    missing += [f"backbone.layers.{i}.{s}" for i in range(n) for s in per_layer
                if f"backbone.layers.{i}.{s}" not in shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing tensor {_file_name(missing[0], config)!r}{more}")

    def expected(k: str):
        if k in top:
            return top[k]
        if k == "lm_head.weight" and config.tie_embeddings:
            return top["backbone.embeddings.weight"]
        i, suffix = layer_of.get(k, (n, None))
        return per_layer.get(suffix) if i < n else None

    unexpected = [k for k in shapes if expected(k) is None]
    if unexpected:
        k = unexpected[0]
        beyond = f"; {CONFIG_FILE} has {n_layer_key} {n}" if k in layer_of and layer_of[k][0] >= n else ""
        raise CheckpointError(
            f"{origin[k]}: unexpected tensor {_file_name(k, config)!r}"
            f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''} for a {config.arch} model "
            f"of this config{beyond}"
        )
    # The tensors outside the layers first: a wrong d_model or vocabulary shows in the embedding's shape.
    for k in sorted(shapes, key=lambda k: layer_of.get(k, (-1,))[0]):
        shape, want = shapes[k], expected(k)
        if shape is not None and tuple(shape) != want:
            if k == "lm_head.weight" and config.tie_embeddings:
                raise CheckpointError(f"{origin[k]}: {TIED_HEAD}")
            raise CheckpointError(
                f"{origin[k]}: tensor {_file_name(k, config)!r} has shape {tuple(shape)}, expected {want} from the "
                "config"
            )


def _check_values(sd: dict, origin: dict, config: SSMConfig) -> None:
    """Floating tensors without NaN or infinity: either would run, and answer NaN for every token."""
    import torch

    for k, t in sd.items():
        if not t.is_floating_point():
            raise CheckpointError(
                f"{origin[k]}: tensor {_file_name(k, config)!r} has dtype {t.dtype}, expected a floating type"
            )
        if not bool(torch.isfinite(t).all()):
            what = "NaN" if bool(torch.isnan(t).any()) else "infinite"
            raise CheckpointError(f"{origin[k]}: tensor {_file_name(k, config)!r} has {what} values")


# float64: the parity reference (compare), float32 weights computed exactly
_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _dtype_arg(dtype):
    """None, or one of the dtypes a model runs in (by name or as a torch.dtype), as a torch.dtype."""
    import torch

    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.") if isinstance(
        dtype, torch.dtype) else None
    if name not in _DTYPES:
        raise SsmrtError(f"dtype must be one of {', '.join(_DTYPES)} (or None: float32), got {dtype!r}")
    return getattr(torch, name)


def _device_arg(device):
    """A torch.device this PyTorch has: "cpu", or "cuda" / "cuda:N" where it sees that GPU."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SsmrtError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}") from None
    if d.type == "cpu":
        return d
    if d.type != "cuda":
        raise SsmrtError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    if not torch.cuda.is_available():
        raise SsmrtError(f"device {device!r}: this PyTorch sees no CUDA device")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise SsmrtError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d


def load_model(model_dir: str | os.PathLike, dtype=None, device="cpu"):
    """Load an HF or mamba_ssm checkpoint directory as an ssmrt MambaLM (eval mode).

    model_dir: directory with config.json and model.safetensors / its sharded index / pytorch_model.bin
    dtype: torch dtype of the weights (default float32); A_log, D and the dt biases stay float32

    The config is checked against the tensors' names and shapes (from the safetensors headers, or an index's
    names, where they are known before reading) before any tensor data is read or any module built.
    """
    import torch

    from .mamba import MambaLM

    dtype, device = _dtype_arg(dtype), _device_arg(device)  # before the weights are read
    config = load_config(model_dir)
    source, files, weight_map = _weight_source(model_dir)
    index = _tensor_shapes(source, files, weight_map)
    if index is not None:
        _check_tensor_index(config, _model_names(index[0], config), _model_names(index[1], config), source)
    sd, origin = _read_tensors(source, files, weight_map)
    sd, origin = _model_names(sd, config), _model_names(origin, config)
    _check_tensor_index(config, {k: tuple(v.shape) for k, v in sd.items()}, origin, source)
    _check_values(sd, origin, config)
    if config.tie_embeddings and "lm_head.weight" in sd:
        # Some writers store the tied matrix twice; keep it only if it really is the embedding.
        lm = sd.pop("lm_head.weight")
        if not torch.equal(lm, sd["backbone.embeddings.weight"]):
            raise CheckpointError(f"{origin['lm_head.weight']}: {TIED_HEAD}")

    # The checks above hold the names and shapes to expected_shapes; the model itself has the last word (and
    # is now known to be no larger than the checkpoint).
    with torch.device("meta"):
        model = MambaLM(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    if set(expected) != set(sd) or any(tuple(sd[k].shape) != tuple(t.shape) for k, t in expected.items()):
        raise RuntimeError(f"ssmrt bug: expected_shapes disagrees with MambaLM for {config}")

    model = MambaLM(config)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    return model.cast(dtype or torch.float32).to(device=device).eval()


# ---------------------------------------------------------------------------------------------- saving


def _hf_config(config: SSMConfig) -> dict:
    c = config
    if c.arch == "mamba1":
        d = {
            "model_type": "falcon_mamba" if c.mixer_rms_eps is not None else "mamba",
            "architectures": ["FalconMambaForCausalLM" if c.mixer_rms_eps is not None else "MambaForCausalLM"],
            "state_size": c.d_state,
            "time_step_rank": c.dt_rank,
            "intermediate_size": c.d_inner,
        }
        if c.mixer_rms_eps is not None:
            d["mixer_rms_eps"] = c.mixer_rms_eps
    else:
        if c.d_mlp or c.D_has_hdim or not c.rmsnorm or c.norm_before_gate or c.gated_norm_eps != c.norm_eps:
            raise ValueError("this Mamba-2 variant has no HF transformers equivalent; save it as mamba_ssm")
        d = {
            "model_type": "mamba2",
            "architectures": ["Mamba2ForCausalLM"],
            "num_heads": c.nheads,
            "head_dim": c.headdim,
            "n_groups": c.ngroups,
            "state_size": c.d_state,
            "chunk_size": c.chunk_size,
            "time_step_limit": [c.dt_min_limit, c.dt_max_limit],
        }
    if c.padded_vocab_size != c.vocab_size:
        raise ValueError("HF checkpoints carry an unpadded vocabulary; set pad_vocab_size_multiple=1")
    if c.d_inner % c.d_model:
        raise ValueError("HF configs express d_inner as an integer expand of d_model")
    d.update(
        hidden_size=c.d_model,
        num_hidden_layers=c.n_layer,
        vocab_size=c.vocab_size,
        expand=c.d_inner // c.d_model,
        conv_kernel=c.d_conv,
        use_conv_bias=c.conv_bias,
        use_bias=c.bias,
        layer_norm_epsilon=c.norm_eps,
        residual_in_fp32=c.residual_in_fp32,
        tie_word_embeddings=c.tie_embeddings,
        hidden_act="silu",
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    return d


def _mamba_ssm_config(config: SSMConfig) -> dict:
    c = config
    ssm_cfg = {"layer": "Mamba1" if c.arch == "mamba1" else "Mamba2", "d_state": c.d_state, "d_conv": c.d_conv,
               "expand": c.d_inner // c.d_model, "conv_bias": c.conv_bias, "bias": c.bias}
    if c.d_inner % c.d_model:
        raise ValueError("mamba_ssm configs express d_inner as an integer expand of d_model")
    if c.mixer_rms_eps is not None:
        raise ValueError("FalconMamba has no mamba_ssm layout; save it as hf")
    if c.arch == "mamba1":
        ssm_cfg["dt_rank"] = c.dt_rank
    else:
        ssm_cfg.update(headdim=c.headdim, ngroups=c.ngroups, chunk_size=c.chunk_size, D_has_hdim=c.D_has_hdim,
                       rmsnorm=c.rmsnorm, norm_before_gate=c.norm_before_gate,
                       dt_limit=[c.dt_min_limit, c.dt_max_limit])
        if c.d_ssm != c.d_inner:
            ssm_cfg["d_ssm"] = c.d_ssm
    return {
        "d_model": c.d_model,
        "d_intermediate": 0,
        "n_layer": c.n_layer,
        "vocab_size": c.vocab_size,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": c.residual_in_fp32,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": c.pad_vocab_size_multiple,
        "tie_embeddings": c.tie_embeddings,
        "norm_epsilon": c.norm_eps,
    }


def check_save(out_dir, layout: str = "hf", extra_files=None, overwrite: bool = False):
    """save_model's checks of its arguments and of out_dir, alone: call it before the work that makes the model
    (the demo's training), so that a bad place is refused before, not after. Returns the output plan."""
    if layout not in ("hf", "mamba_ssm"):
        raise SsmrtError(f"layout must be 'hf' or 'mamba_ssm', got {layout!r}")
    from ..artifact import not_regular_files

    weights = "model.safetensors" if layout == "hf" else "pytorch_model.bin"
    for name in extra_files or {}:
        if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
            raise SsmrtError(f"extra_files: {name!r} is not a plain file name (no directories)")
    ours = {CONFIG_FILE, weights, *(extra_files or {})}

    def recognise(directory: Path, names: list[str]) -> str | None:
        foreign = [n for n in names if n not in ours]
        if foreign:
            return f"holds {foreign[0]!r}, which this save would not write"
        odd = not_regular_files(directory, names)
        if odd:
            return f"holds {odd!r}, which is not a regular file"
        return None if CONFIG_FILE in names else f"holds no {CONFIG_FILE}, so it is not a checkpoint"

    return check_output_dir(out_dir, recognise=recognise, overwrite=overwrite, what="a checkpoint",
                            flag="overwrite=True")


def save_model(
    model,
    out_dir: str | os.PathLike,
    layout: str = "hf",
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write model (a MambaLM) as a checkpoint directory: layout "hf" (config.json + model.safetensors) or
    "mamba_ssm" (its config.json + pytorch_model.bin), plus extra_files (name -> text, e.g. a tokenizer).

    out_dir must be new or empty; overwrite=True replaces a directory that holds only the files this call
    writes (anything else there is refused). Staged, then swapped in (ssmrt.fsutil): a failure leaves the
    old directory or the new one, complete.
    """
    import torch
    from safetensors.torch import save_file

    weights = "model.safetensors" if layout == "hf" else "pytorch_model.bin"
    plan = check_save(out_dir, layout, extra_files, overwrite)
    cfg = _hf_config(model.config) if layout == "hf" else _mamba_ssm_config(model.config)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")
    with output_directory(plan, main_file=CONFIG_FILE) as tmp:
        with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        if layout == "hf":
            save_file(sd, str(tmp / weights), metadata={"format": "pt"})
        else:
            torch.save(_to_mamba_ssm_names(sd), tmp / weights)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return plan.out

"""Checkpoint directories -> SSMConfig + MambaLM: HF transformers (mamba, mamba2, falcon_mamba) and mamba_ssm.

Only safe formats are read: safetensors, or torch.load(weights_only=True). Every problem raises
CheckpointError naming the file and what was expected.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from pathlib import Path

from ..errors import CheckpointError, SsmrtError
from ..fsutil import check_output_dir, output_directory
from .config import SSMConfig

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


def _float(v) -> float:
    """JSON floats, including transformers' {"__float__": "Infinity"} and the bare Infinity literal."""
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    return float(v)


def _first_id(v):
    return v[0] if isinstance(v, list) and v else v


def _config_from_hf(raw: dict, path: Path) -> SSMConfig:
    model_type = raw["model_type"]
    d_model = int(raw.get("hidden_size", 768))
    expand = raw.get("expand", 2)
    common = dict(
        d_model=d_model,
        n_layer=int(raw.get("num_hidden_layers", 32)),
        vocab_size=int(raw.get("vocab_size", 50280)),
        pad_vocab_size_multiple=1,  # HF checkpoints store the embedding at vocab_size rows
        residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        d_inner=int(raw.get("intermediate_size") or int(expand * d_model)),
        d_conv=int(raw.get("conv_kernel", 4)),
        conv_bias=bool(raw.get("use_conv_bias", True)),
        bias=bool(raw.get("use_bias", False)),
        bos_token_id=_first_id(raw.get("bos_token_id")),
        eos_token_id=_first_id(raw.get("eos_token_id")),
        pad_token_id=_first_id(raw.get("pad_token_id")),
        source=f"hf:{model_type}",
    )
    rank = raw.get("time_step_rank", "auto")
    dt_rank = math.ceil(d_model / 16) if rank == "auto" else int(rank)
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
    if model_type in ("mamba", "falcon_mamba"):
        return SSMConfig(
            arch="mamba1",
            tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
            d_state=int(raw.get("state_size", 16)),
            dt_rank=dt_rank,
            mixer_rms_eps=float(raw.get("mixer_rms_eps", 1e-6)) if model_type == "falcon_mamba" else None,
            **common,
        )
    lo, hi = raw.get("time_step_limit", (0.0, math.inf))
    num_heads = int(raw.get("num_heads", 128))
    head_dim = int(raw.get("head_dim", 64))
    if num_heads * head_dim != common["d_inner"]:
        raise CheckpointError(
            f"{path}: num_heads * head_dim ({num_heads} * {head_dim}) must equal "
            f"hidden_size * expand ({common['d_inner']})"
        )
    return SSMConfig(
        arch="mamba2",
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        d_state=int(raw.get("state_size", 128)),
        headdim=head_dim,
        ngroups=int(raw.get("n_groups", 8)),
        chunk_size=int(raw.get("chunk_size", 256)),
        gated_norm_eps=common["norm_eps"],
        dt_min_limit=_float(lo),
        dt_max_limit=_float(hi),
        **common,
    )


def _config_from_mamba_ssm(raw: dict, path: Path) -> SSMConfig:
    ssm_cfg = dict(raw.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer not in MAMBA_SSM_LAYERS:
        raise CheckpointError(f"{path}: unknown ssm_cfg.layer {layer!r}; expected one of {MAMBA_SSM_LAYERS}")
    if raw.get("attn_layer_idx"):
        raise CheckpointError(f"{path}: attention layers (attn_layer_idx) are not supported, only pure SSM models")
    if raw.get("d_intermediate", 0):
        raise CheckpointError(f"{path}: MLP blocks (d_intermediate > 0) are not supported")
    if not raw.get("rms_norm", True):
        raise CheckpointError(f"{path}: rms_norm=false (LayerNorm blocks) is not supported")
    d_model = int(raw["d_model"])
    expand = ssm_cfg.pop("expand", 2)
    common = dict(
        d_model=d_model,
        n_layer=int(raw["n_layer"]),
        vocab_size=int(raw.get("vocab_size", 50277)),
        pad_vocab_size_multiple=int(raw.get("pad_vocab_size_multiple", 8)),
        tie_embeddings=bool(raw.get("tie_embeddings", True)),
        residual_in_fp32=bool(raw.get("residual_in_fp32", False)),
        norm_eps=float(raw.get("norm_epsilon", 1e-5)),
        d_inner=int(expand * d_model),
        d_conv=int(ssm_cfg.pop("d_conv", 4)),
        conv_bias=bool(ssm_cfg.pop("conv_bias", True)),
        bias=bool(ssm_cfg.pop("bias", False)),
        source="mamba_ssm",
    )
    # Initialisation-only settings do not change the forward pass.
    for k in ("dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "A_init_range", "use_fast_path",
              "layer_idx", "device", "dtype", "process_group", "sequence_parallel", "use_mem_eff_path"):
        ssm_cfg.pop(k, None)
    if layer == "Mamba1":
        rank = ssm_cfg.pop("dt_rank", "auto")
        cfg = SSMConfig(
            arch="mamba1",
            d_state=int(ssm_cfg.pop("d_state", 16)),
            dt_rank=math.ceil(d_model / 16) if rank == "auto" else int(rank),
            **common,
        )
    else:
        lo, hi = ssm_cfg.pop("dt_limit", (0.0, math.inf))
        d_ssm = ssm_cfg.pop("d_ssm", None)
        cfg = SSMConfig(
            arch="mamba2",
            d_state=int(ssm_cfg.pop("d_state", 128)),
            headdim=int(ssm_cfg.pop("headdim", 64)),
            ngroups=int(ssm_cfg.pop("ngroups", 1)),
            d_ssm=int(d_ssm) if d_ssm else 0,
            chunk_size=int(ssm_cfg.pop("chunk_size", 256)),
            D_has_hdim=bool(ssm_cfg.pop("D_has_hdim", False)),
            rmsnorm=bool(ssm_cfg.pop("rmsnorm", True)),
            norm_before_gate=bool(ssm_cfg.pop("norm_before_gate", False)),
            dt_min_limit=_float(lo),
            dt_max_limit=_float(hi),
            **common,
        )
    if ssm_cfg:
        raise CheckpointError(f"{path}: unsupported ssm_cfg settings for {layer}: {sorted(ssm_cfg)}")
    return cfg


def load_config(model_dir: str | os.PathLike) -> SSMConfig:
    """Read and validate the config.json of an HF or mamba_ssm checkpoint directory."""
    d = Path(model_dir)
    if not d.exists():
        raise CheckpointError(f"{d}: no such directory")
    if not d.is_dir():
        raise CheckpointError(f"{d}: expected a checkpoint directory (config.json + weights), got a file")
    path = d / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint directory needs config.json beside its weights")
    raw = _read_json(path)
    try:
        if "model_type" in raw:
            if raw["model_type"] not in HF_MODEL_TYPES:
                raise CheckpointError(
                    f"{path}: unknown model_type {raw['model_type']!r}; expected one of {HF_MODEL_TYPES}"
                )
            return _config_from_hf(raw, path)
        if "d_model" in raw and "n_layer" in raw:
            return _config_from_mamba_ssm(raw, path)
    except (TypeError, ValueError, KeyError) as e:
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


def _load_sharded(index_path: Path, load_one) -> tuple[dict, dict]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: missing or empty 'weight_map'")
    tensors, origin = {}, {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{shard_path}: shard named in {index_path.name} is missing")
        for k, v in load_one(shard_path).items():
            tensors[k] = v
            origin[k] = shard_path
    listed_missing = sorted(k for k in weight_map if k not in tensors)
    if listed_missing:
        raise CheckpointError(f"{index_path}: tensors listed in weight_map are in no shard: {listed_missing[:5]}")
    return tensors, origin


def load_weights(model_dir: str | os.PathLike) -> tuple[dict, dict, Path]:
    """Returns (name -> tensor, name -> file it came from, the weights file or index read).
    safetensors first, then pytorch_model.bin."""
    d = Path(model_dir)
    for name in WEIGHT_FILES:
        p = d / name
        if not p.is_file():
            continue
        if name == "model.safetensors":
            sd = _load_safetensors(p)
        elif name == "pytorch_model.bin":
            sd = _load_torch_bin(p)
        else:
            return (*_load_sharded(p, _load_safetensors if "safetensors" in name else _load_torch_bin), p)
        return sd, {k: p for k in sd}, p
    raise CheckpointError(f"{d}: no weights found; expected one of {', '.join(WEIGHT_FILES)}")


def _map_mamba_ssm_names(sd: dict) -> dict:
    return {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v for k, v in sd.items()}


def _to_mamba_ssm_names(sd: dict) -> dict:
    return {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v for k, v in sd.items()}


def load_model(model_dir: str | os.PathLike, dtype=None, device="cpu"):
    """Load an HF or mamba_ssm checkpoint directory as an ssmrt MambaLM (eval mode).

    model_dir: directory with config.json and model.safetensors / its sharded index / pytorch_model.bin
    dtype: torch dtype of the weights (default float32); A_log, D and the dt biases stay float32
    """
    import torch

    from .mamba import MambaLM

    config = load_config(model_dir)
    sd, origin, source = load_weights(model_dir)
    if config.source == "mamba_ssm":
        sd = _map_mamba_ssm_names(sd)
        origin = _map_mamba_ssm_names(origin)
    # Non-persistent or derived entries some writers include.
    for k in [k for k in sd if k.endswith(("_layernorm.weight", "rotary_emb.inv_freq"))]:
        sd.pop(k)
        origin.pop(k)

    with torch.device("meta"):
        model = MambaLM(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
        if "lm_head.weight" in sd:
            # Some writers store the tied matrix twice; keep it only if it really is the embedding.
            lm, emb = sd.pop("lm_head.weight"), sd.get("backbone.embeddings.weight")
            if emb is not None and (lm.shape != emb.shape or not torch.equal(lm, emb)):
                raise CheckpointError(
                    f"{origin['lm_head.weight']}: lm_head.weight differs from the embedding but the config "
                    "says the embeddings are tied (set tie_embeddings / tie_word_embeddings to false)"
                )
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r}{more}")
    if unexpected:
        raise CheckpointError(
            f"{origin[unexpected[0]]}: unexpected tensor {unexpected[0]!r}"
            f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''} for a {config.arch} model "
            "of this config"
        )
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{origin[k]}: tensor {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(t.shape)} from the config"
            )
        if not sd[k].is_floating_point():
            raise CheckpointError(f"{origin[k]}: tensor {k!r} has dtype {sd[k].dtype}, expected a floating type")

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

    if layout not in ("hf", "mamba_ssm"):
        raise ValueError(f"layout must be 'hf' or 'mamba_ssm', got {layout!r}")
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

    plan = check_output_dir(out_dir, recognise=recognise, overwrite=overwrite, what="a checkpoint",
                            flag="overwrite=True")
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

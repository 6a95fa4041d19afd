"""Bad checkpoints: non-finite weights, configs that would build a broken model, configs that disagree with their
tensors (refused from the names and shapes, before anything of the config's size is allocated), sharded indexes
that name files outside the checkpoint. Each is refused in one line naming the culprit, through the CLI and
the Python API, and nothing is written; the good neighbours (HF, mamba_ssm and sharded layouts) still load."""

from __future__ import annotations

import json
import math
import os
import shutil
import types

import pytest
import torch
from bad_inputs import assert_refused, ssmrt, tree
from safetensors.torch import load_file, save_file
from test_models import random_lm

import ssmrt.models.checkpoints as ck
from ssmrt import SsmrtError
from ssmrt.models import MambaLM, SSMConfig
from ssmrt.models.checkpoints import expected_shapes, load_model, save_model

# 4 heads, so n_groups 3 divides none of them.
MAMBA2 = dict(arch="mamba2", d_model=32, n_layer=2, d_state=8, headdim=16, ngroups=2, chunk_size=4)
MAMBA1 = dict(arch="mamba1", d_model=32, n_layer=2, d_state=8)
IDS = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(0))
BIG = 10**8


def logits(model):
    with torch.no_grad():
        return model(IDS)[0]


def shard(d, fmt="safetensors"):
    """Rewrite the checkpoint in d as two shards and their index (HF's sharded layout)."""
    single = d / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    sd = load_file(single) if fmt == "safetensors" else torch.load(single, weights_only=True)
    single.unlink()
    names = sorted(sd)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-{i + 1:05d}-of-00002.safetensors" if fmt == "safetensors" else f"pytorch_model-{i + 1}.bin"
        piece = {k: sd[k].contiguous() for k in part}
        if fmt == "safetensors":
            save_file(piece, d / file, metadata={"format": "pt"})
        else:
            torch.save(piece, d / file)
        weight_map.update(dict.fromkeys(part, file))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (d / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Good checkpoints to copy and break: hf1 / hf2 (HF layout, safetensors), ms2 (mamba_ssm layout,
    pytorch_model.bin), sh2 (hf2 in safetensors shards), shb (ms2 in pytorch_model.bin shards); with the models
    they were written from."""
    root = tmp_path_factory.mktemp("made")
    m1, m2 = random_lm(**MAMBA1), random_lm(**MAMBA2)
    save_model(m1, root / "hf1")
    save_model(m2, root / "hf2")
    save_model(m2, root / "ms2", layout="mamba_ssm")
    shard(save_model(m2, root / "sh2"))
    shard(save_model(m2, root / "shb", layout="mamba_ssm"), fmt="bin")
    models = {"hf1": m1, "hf2": m2, "ms2": m2, "sh2": m2, "shb": m2}
    return types.SimpleNamespace(root=root, models=models)


def copy(made, base, dest):
    shutil.copytree(made.root / base, dest)
    return dest


# ------------------------------------------------------------------------------------------- the breakers


def edit_config(d, _ssm_cfg=None, _drop=(), **kw):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    cfg.get("ssm_cfg", {}).update(_ssm_cfg or {})
    for k in _drop:
        cfg.pop(k)
    (d / "config.json").write_text(json.dumps(cfg))


def poison(name, value, file="model.safetensors", index=(0,)):
    """A breaker that sets one element of tensor `name` in `file` to `value`."""

    def apply(d):
        path = d / file
        sd = load_file(path) if file.endswith(".safetensors") else torch.load(path, weights_only=True)
        sd[name][index] = value
        save_file(sd, path) if file.endswith(".safetensors") else torch.save(sd, path)

    return apply


def half_with_inf(d):
    """float16 weights, as a careless conversion writes them: a value past 65504 became infinity."""
    sd = {k: v.half() for k, v in load_file(d / "model.safetensors").items()}
    sd["backbone.layers.1.mixer.out_proj.weight"][2, 3] = 1e6
    save_file(sd, d / "model.safetensors")


def config(**kw):
    return lambda d: edit_config(d, **kw)


def ssm_cfg(**kw):
    return lambda d: edit_config(d, _ssm_cfg=kw)


def weight_map(fn, index="model.safetensors.index.json"):
    """A breaker that rewrites the index's weight_map with fn(d, weight_map)."""

    def apply(d):
        doc = json.loads((d / index).read_text())
        fn(d, doc["weight_map"])
        (d / index).write_text(json.dumps(doc))

    return apply


def shard_moved_out(entry_of):
    """Move the second shard next to the checkpoint directory and point its entries at entry_of(d, outside)."""

    def apply(d, wm):
        name = sorted(set(wm.values()))[-1]
        outside = d.parent / f"outside-{name}"
        shutil.move(d / name, outside)
        entry = entry_of(d, outside)
        for k, v in wm.items():
            if v == name:
                wm[k] = entry

    return apply


def link_out(d, outside):
    os.symlink(outside, d / "linked.safetensors")
    return "linked.safetensors"


def dir_link_out(d, outside):
    os.symlink(outside.parent, d / "sub")
    return f"sub/{outside.name}"


# id -> (the good checkpoint it starts from, the breaker, fragments of the one line)
CASES = {
    # non-finite weights
    "nan-A_log": ("hf2", poison("backbone.layers.0.mixer.A_log", math.nan),
                  ["model.safetensors", "'backbone.layers.0.mixer.A_log'", "NaN values"]),
    "inf-embedding": ("hf1", poison("backbone.embeddings.weight", math.inf, index=(3, 5)),
                      ["model.safetensors", "'backbone.embeddings.weight'", "infinite values"]),
    "float16-overflow": ("hf1", half_with_inf,
                         ["'backbone.layers.1.mixer.out_proj.weight'", "infinite values"]),
    "bin-neg-inf": ("ms2", poison("backbone.embedding.weight", -math.inf, "pytorch_model.bin"),
                    ["pytorch_model.bin", "'backbone.embedding.weight'", "infinite values"]),
    "shard-nan": ("sh2", poison("backbone.embeddings.weight", math.nan, "model-00001-of-00002.safetensors"),
                  ["model-00001-of-00002.safetensors", "'backbone.embeddings.weight'", "NaN"]),
    # configs that would build a broken model (or raise)
    "hidden_size-0": ("hf1", config(hidden_size=0), ["config.json", "hidden_size must be a positive integer, got 0"]),
    "layers-negative": ("hf1", config(num_hidden_layers=-1), ["config.json", "num_hidden_layers", "got -1"]),
    "norm-eps-negative": ("hf1", config(layer_norm_epsilon=-1e-5),
                          ["layer_norm_epsilon must be a positive finite number", "-1e-05"]),
    "vocab-string": ("hf1", config(vocab_size="97"), ["vocab_size must be a positive integer, got '97'"]),
    "use_bias-string": ("hf1", config(use_bias="false"), ["use_bias must be true or false, got 'false'"]),
    "expand-0": ("hf1", lambda d: edit_config(d, expand=0, _drop=["intermediate_size"]),
                 ["config.json", "expand must be a positive number, got 0"]),
    "time_step_rank-0": ("hf1", config(time_step_rank=0), ["time_step_rank must be a positive integer, got 0"]),
    "n_groups-0": ("hf2", config(n_groups=0), ["config.json", "n_groups must be a positive integer, got 0"]),
    "n_groups-3": ("hf2", config(n_groups=3), ["n_groups (3) must divide the number of heads (4)"]),
    "chunk_size-0": ("hf2", config(chunk_size=0), ["chunk_size must be a positive integer, got 0"]),
    "state_size-negative": ("hf2", config(state_size=-8), ["state_size", "got -8"]),
    "dt-limit-reversed": ("hf2", config(time_step_limit=[0.2, 0.1]), ["time_step_limit", "0 <= min <= max"]),
    "dt-limit-nan": ("hf2", config(time_step_limit=[math.nan, 1.0]), ["time_step_limit", "(nan, 1.0)"]),
    "ms-headdim": ("ms2", ssm_cfg(headdim=24), ["must be a multiple of ssm_cfg.headdim (24)"]),
    "ms-norm_epsilon-0": ("ms2", config(norm_epsilon=0), ["norm_epsilon must be a positive finite number"]),
    "ms-d_conv-0": ("ms2", ssm_cfg(d_conv=0), ["ssm_cfg.d_conv must be a positive integer, got 0"]),
    "ms-ngroups-float": ("ms2", ssm_cfg(ngroups=1.5), ["ssm_cfg.ngroups must be a positive integer, got 1.5"]),
    # configs that disagree with their tensors
    "layers-1e8": ("hf1", config(num_hidden_layers=BIG),
                   ["model.safetensors", "no tensors of layer 2", f"num_hidden_layers {BIG}"]),
    "layers-fewer": ("hf1", config(num_hidden_layers=1),
                     ["unexpected tensor 'backbone.layers.1.", "num_hidden_layers 1"]),
    "hidden_size-other": ("hf1", config(hidden_size=64, intermediate_size=128),
                          ["'backbone.embeddings.weight'", "(97, 32)", "expected (97, 64)"]),
    "vocab-1e9": ("hf2", config(vocab_size=10**9), ["'backbone.embeddings.weight'", f"({10**9}, 32)"]),
    "shards-layers-1e8": ("sh2", config(num_hidden_layers=BIG),
                          ["model.safetensors.index.json", "no tensors of layer 2", f"num_hidden_layers {BIG}"]),
    "bin-shards-layers-1e8": ("shb", config(n_layer=BIG),
                              ["pytorch_model.bin.index.json", "no tensors of layer 2", f"n_layer {BIG}"]),
    "bin-layers-1e8": ("ms2", config(n_layer=BIG), ["pytorch_model.bin", f"n_layer {BIG}"]),
    "bin-d_model-other": ("ms2", config(d_model=48), ["'backbone.embedding.weight'", "expected (97, 48)"]),
    # sharded indexes naming files outside the checkpoint
    "shard-dotdot": ("sh2", weight_map(shard_moved_out(lambda d, out: f"../{out.name}")),
                     ["model.safetensors.index.json", "'../outside-model-00002", "outside the checkpoint directory"]),
    "shard-absolute": ("sh2", weight_map(shard_moved_out(lambda d, out: str(out))),
                       ["model.safetensors.index.json", "outside-model-00002", "outside the checkpoint directory"]),
    "shard-link-out": ("sh2", weight_map(shard_moved_out(link_out)),
                       ["model.safetensors.index.json", "'linked.safetensors'", "a link to", "outside"]),
    "shard-dir-link-out": ("sh2", weight_map(shard_moved_out(dir_link_out)),
                           ["model.safetensors.index.json", "'sub/outside-model-00002", "outside"]),
    "bin-shard-dotdot": ("shb", weight_map(shard_moved_out(lambda d, out: f"x/../../{out.name}"),
                                           "pytorch_model.bin.index.json"),
                         ["pytorch_model.bin.index.json", "outside the checkpoint directory"]),
    "shard-not-a-name": ("sh2", weight_map(lambda d, wm: wm.update({"backbone.norm_f.weight": 5})),
                         ["weight_map entry 'backbone.norm_f.weight'", "expected a shard file name, got 5"]),
}


def broken(made, tmp_path, case):
    base, breaker, fragments = CASES[case]
    d = copy(made, base, tmp_path / "ckpt")
    breaker(d)
    return d, fragments


@pytest.mark.parametrize("case", list(CASES))
def test_api_refuses(made, tmp_path, case, monkeypatch):
    d, fragments = broken(made, tmp_path, case)
    before = tree(tmp_path)

    def no_model(*a, **kw):
        raise AssertionError("a model was built from a config the checks should have refused")

    monkeypatch.setattr(MambaLM, "__init__", no_model)
    with pytest.raises(SsmrtError) as e:
        load_model(d)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    for f in fragments:
        assert f in msg, (f, msg)
    assert tree(tmp_path) == before


# Ones whose refusal needs nothing but the config and the tensor index: no tensor data may be read.
FROM_INDEX = ["layers-1e8", "hidden_size-other", "vocab-1e9", "shards-layers-1e8", "bin-shards-layers-1e8",
              "shard-dotdot", "shard-link-out", "hidden_size-0", "n_groups-3"]


@pytest.mark.parametrize("case", FROM_INDEX)
def test_refused_before_reading_tensor_data(made, tmp_path, case, monkeypatch):
    d, fragments = broken(made, tmp_path, case)

    def no_read(path):
        raise AssertionError(f"read {path} before the index was checked")

    monkeypatch.setattr(ck, "_load_safetensors", no_read)
    monkeypatch.setattr(ck, "_load_torch_bin", no_read)
    with pytest.raises(SsmrtError, match="layer 2|expected|outside|positive|divide"):
        load_model(d)


# One of each kind through the CLI, with generate and export: exit 2, one line, nothing written anywhere.
CLI_CASES = ["nan-A_log", "hidden_size-0", "norm-eps-negative", "layers-1e8", "shard-dotdot", "shard-link-out"]


@pytest.mark.parametrize("command", ["generate", "export"])
@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses(made, tmp_path, case, command):
    d, fragments = broken(made, tmp_path, case)
    out = tmp_path / "out"
    before = tree(tmp_path)
    args = (["generate", d, "--prompt-ids", "1,2", "--max-new-tokens", "2"] if command == "generate"
            else ["export", d, "-o", out])
    res = ssmrt(*args, cwd=tmp_path, timeout=300)
    assert_refused(res, *fragments)
    assert not out.exists()
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------- still good


@pytest.mark.parametrize("base", ["hf1", "hf2", "ms2", "sh2", "shb"])
def test_good_checkpoints_load(made, base):
    model = load_model(made.root / base)
    assert torch.equal(logits(model), logits(made.models[base]))


def test_links_inside_the_checkpoint_and_the_hub_cache_load(made, tmp_path):
    """A shard may be a link within the directory, or (the Hugging Face hub cache) into the repository's
    blobs/ beside snapshots/."""
    d = copy(made, "sh2", tmp_path / "inside")
    name = "model-00002-of-00002.safetensors"
    (d / "data").mkdir()
    shutil.move(d / name, d / "data" / name)
    os.symlink(f"data/{name}", d / name)
    want = logits(made.models["sh2"])
    assert torch.equal(logits(load_model(d)), want)

    repo = tmp_path / "models--x--y"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted((made.root / "sh2").iterdir()):
        shutil.copyfile(f, repo / "blobs" / f"sha-{f.name}")
        os.symlink(f"../../blobs/sha-{f.name}", snap / f.name)
    assert torch.equal(logits(load_model(snap)), want)


def test_bf16_and_float16_checkpoints_load(made, tmp_path):
    for dtype in (torch.bfloat16, torch.float16):
        d = copy(made, "hf2", tmp_path / str(dtype))
        sd = load_file(d / "model.safetensors")
        save_file({k: v.to(dtype) for k, v in sd.items()}, d / "model.safetensors")
        load_model(d)


# The variants expected_shapes must agree with MambaLM on (the loader trusts it before building the model).
SHAPE_CONFIGS = {
    "mamba1": MAMBA1,
    "mamba1-untied-bias-rank": dict(MAMBA1, tie_embeddings=False, bias=True, conv_bias=False, dt_rank=5, d_inner=96),
    "falcon": dict(MAMBA1, mixer_rms_eps=1e-6),
    "mamba2": MAMBA2,
    "mamba2-mlp-Dhdim": dict(MAMBA2, d_inner=96, d_ssm=64, D_has_hdim=True, bias=True),
    "mamba2-no-rmsnorm-padded": dict(MAMBA2, rmsnorm=False, vocab_size=90, pad_vocab_size_multiple=16,
                                     tie_embeddings=False, conv_bias=False),
}


@pytest.mark.parametrize("name", list(SHAPE_CONFIGS))
def test_expected_shapes_match_the_model(name):
    cfg = SSMConfig(**{"vocab_size": 97, **SHAPE_CONFIGS[name]})
    with torch.device("meta"):
        model = MambaLM(cfg)
    top, layer = expected_shapes(cfg)
    want = dict(top)
    for i in range(cfg.n_layer):
        want.update({f"backbone.layers.{i}.{k}": v for k, v in layer.items()})
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        got.pop("lm_head.weight")
    assert got == want


# --------------------------------------------------------------------------- SSMConfig from artifact metadata

GOOD = SSMConfig(vocab_size=97, **MAMBA2).to_dict()
BAD_DICTS = {
    "d_model-0": ({"d_model": 0}, "d_model must be a positive integer, got 0"),
    "n_layer-string": ({"n_layer": "2"}, "n_layer must be an integer, got '2'"),
    "ngroups-0": ({"ngroups": 0}, "ngroups must be a positive integer, got 0"),
    "chunk_size-0": ({"chunk_size": 0}, "chunk_size must be a positive integer, got 0"),
    "headdim-not-dividing": ({"headdim": 24}, "d_ssm (64) must be a multiple of headdim (24)"),
    "norm_eps-negative": ({"norm_eps": -1e-5}, "norm_eps must be a positive finite number"),
    "gated_norm_eps-nan": ({"gated_norm_eps": math.nan}, "gated_norm_eps must be a positive finite number"),
    "dt-limits": ({"dt_min_limit": 0.5, "dt_max_limit": 0.1}, "dt_min_limit, dt_max_limit must be (min, max)"),
    "d_inner-negative": ({"d_inner": -64}, "d_inner must be a positive integer (or 0 for the default), got -64"),
    "arch": ({"arch": "mamba3"}, "arch must be one of"),
    "bool": ({"rmsnorm": "yes"}, "rmsnorm must be true or false"),
    "unknown": ({"frobnicate": 1}, "unknown fields ['frobnicate']"),
    "braces": ({"source": {"a": 1}}, "source must be a string, got {'a': 1}"),
}


@pytest.mark.parametrize("case", list(BAD_DICTS))
def test_from_dict_refuses(case):
    change, fragment = BAD_DICTS[case]
    with pytest.raises(SsmrtError) as e:
        SSMConfig.from_dict({**GOOD, **change}, where="art/model.onnx")
    assert str(e.value).startswith("art/model.onnx: config: ") and fragment in str(e.value), str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_from_dict_missing_field_and_not_an_object():
    with pytest.raises(SsmrtError, match=r"^config: missing fields \['d_model'\]"):
        SSMConfig.from_dict({k: v for k, v in GOOD.items() if k != "d_model"})
    with pytest.raises(SsmrtError, match="config: expected a JSON object, got list"):
        SSMConfig.from_dict([1, 2])


def test_from_dict_round_trips_good_configs():
    for kw in SHAPE_CONFIGS.values():
        cfg = SSMConfig(**{"vocab_size": 97, **kw})
        assert SSMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg

"""Checkpoint loading: formats (HF safetensors, sharded, .bin; mamba_ssm) and every error a user can cause."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from hf_models import hf_model, save_hf
from safetensors.torch import save_file

import ssmrt
from ssmrt import SsmrtError
from ssmrt.closeness import assert_close
from ssmrt.models import load_config

IDS = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS)[0]


def write_mamba_ssm(hf, path, extra_ssm_cfg=None):
    """Hand-write the mamba_ssm layout of an HF model: its config.json and pytorch_model.bin names."""
    c = hf.config
    path.mkdir()
    if c.model_type == "mamba":
        ssm_cfg = {"layer": "Mamba1", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
                   "dt_rank": c.time_step_rank, "conv_bias": c.use_conv_bias, "bias": c.use_bias}
    else:
        ssm_cfg = {"layer": "Mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
                   "headdim": c.head_dim, "ngroups": c.n_groups, "chunk_size": c.chunk_size,
                   "dt_limit": list(c.time_step_limit), "conv_bias": c.use_conv_bias, "bias": c.use_bias}
    ssm_cfg.update(extra_ssm_cfg or {})
    cfg = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers,
           "vocab_size": c.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
           "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 1,
           "tie_embeddings": c.tie_word_embeddings}
    (path / "config.json").write_text(json.dumps(cfg))
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    torch.save(sd, path / "pytorch_model.bin")
    return path


@pytest.mark.parametrize("config", ["mamba-base", "mamba-untied-d64-k3-bias", "mamba2-g1",
                                    "mamba2-g2-d64-k3-limit-tied"])
def test_mamba_ssm_layout_loads_to_same_logits(config, tmp_path):
    hf = hf_model(config)
    want = logits(ssmrt.load_model(save_hf(hf, tmp_path / "hf")))
    got = logits(ssmrt.load_model(write_mamba_ssm(hf, tmp_path / "ms")))
    assert_close(got, want, atol=0, rtol=0, name="mamba_ssm layout vs HF layout")
    with torch.no_grad():
        assert_close(got, hf(IDS).logits, atol=1e-4, rtol=1e-4, name="mamba_ssm layout vs HF forward")


def test_mamba_ssm_padded_vocab(tmp_path):
    hf = hf_model("mamba-base")
    d = write_mamba_ssm(hf, tmp_path / "ms")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(vocab_size=90, pad_vocab_size_multiple=97)  # 90 rounds up to the stored 97 rows
    (d / "config.json").write_text(json.dumps(cfg))
    model = ssmrt.load_model(d)
    assert model.config.vocab_size == 90 and model.config.padded_vocab_size == 97
    assert logits(model).shape[-1] == 97


def test_hf_sharded_safetensors_and_bin(tmp_path):
    hf = hf_model("mamba2-g2-d128-bias")
    want = logits(ssmrt.load_model(save_hf(hf, tmp_path / "one")))
    save_hf(hf, tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_close(logits(ssmrt.load_model(tmp_path / "sharded")), want, atol=0, rtol=0, name="sharded")
    # pytorch_model.bin beside the same config
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert_close(logits(ssmrt.load_model(tmp_path / "bin")), want, atol=0, rtol=0, name="pytorch_model.bin")


def test_dt_limit_and_falcon_config(tmp_path):
    cfg = load_config(save_hf(hf_model("mamba2-g2-d64-k3-limit-tied"), tmp_path / "m2"))
    assert cfg.arch == "mamba2" and cfg.dt_limit == pytest.approx((0.01, 0.2)) and cfg.ngroups == 2
    cfg = load_config(save_hf(hf_model("mamba2-g1"), tmp_path / "m2b"))
    assert cfg.dt_limit[1] == math.inf
    cfg = load_config(save_hf(hf_model("falcon_mamba-base"), tmp_path / "fm"))
    assert cfg.arch == "mamba1" and cfg.mixer_rms_eps == pytest.approx(1e-6)


# ------------------------------------------------------------------------------------------------ errors


@pytest.fixture
def good(tmp_path):
    """A valid HF Mamba-1 checkpoint directory, to break in each test (skips the test without transformers)."""
    return save_hf(hf_model("mamba-base"), tmp_path / "good")


def edit_config(d, **kw):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


def edit_weights(d, fn):
    from safetensors.torch import load_file

    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors")


def expect_error(path, *fragments):
    with pytest.raises(SsmrtError) as e:
        ssmrt.load_model(path)
    msg = str(e.value)
    print(msg)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


def test_no_such_directory(tmp_path):
    expect_error(tmp_path / "nope", "nope", "no such directory")


def test_a_file_is_not_a_directory(good):
    expect_error(good / "config.json", "config.json", "expected a checkpoint directory")


def test_missing_config(good):
    (good / "config.json").unlink()
    expect_error(good, "config.json", "missing")


def test_invalid_json(good):
    (good / "config.json").write_text("{not json")
    expect_error(good, "config.json", "not valid JSON")


def test_unknown_model_type(good):
    edit_config(good, model_type="llama")
    expect_error(good, "config.json", "unknown model_type 'llama'", "mamba2")


def test_unknown_mamba_ssm_layer(tmp_path):
    d = write_mamba_ssm(hf_model("mamba-base"), tmp_path / "ms", {"layer": "Mamba3"})
    expect_error(d, "config.json", "unknown ssm_cfg.layer 'Mamba3'")


def test_unsupported_mamba_ssm_setting(tmp_path):
    d = write_mamba_ssm(hf_model("mamba-base"), tmp_path / "ms", {"frobnicate": 1})
    expect_error(d, "config.json", "unsupported ssm_cfg settings", "frobnicate")


def test_attention_layers_refused(tmp_path):
    d = write_mamba_ssm(hf_model("mamba-base"), tmp_path / "ms")
    edit_config(d, attn_layer_idx=[1])
    expect_error(d, "attention layers")


def test_unrecognised_config(good):
    (good / "config.json").write_text(json.dumps({"hello": 1}))
    expect_error(good, "neither an HF config")


def test_no_weights(good):
    (good / "model.safetensors").unlink()
    expect_error(good, "no weights found", "model.safetensors")


def test_missing_tensor(good):
    edit_weights(good, lambda sd: sd.pop("backbone.layers.1.mixer.A_log"))
    expect_error(good, "model.safetensors", "missing tensor 'backbone.layers.1.mixer.A_log'")


def test_unexpected_tensor(good):
    edit_weights(good, lambda sd: sd.__setitem__("backbone.layers.5.mixer.D", torch.zeros(3)))
    expect_error(good, "model.safetensors", "unexpected tensor 'backbone.layers.5.mixer.D'")


def test_misshaped_tensor(good):
    edit_weights(good, lambda sd: sd.__setitem__("backbone.norm_f.weight", torch.zeros(47)))
    expect_error(good, "model.safetensors", "'backbone.norm_f.weight'", "(47,)", "(48,)")


def test_truncated_safetensors(good):
    data = (good / "model.safetensors").read_bytes()
    (good / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(good, "model.safetensors", "truncated or unreadable")


def test_truncated_bin(good, tmp_path):
    d = write_mamba_ssm(hf_model("mamba-base"), tmp_path / "ms")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    expect_error(d, "pytorch_model.bin", "truncated or unreadable")


class _Payload:
    """Unpickling this would call a function: exactly what weights_only must refuse."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_needing_code_execution_is_refused(good, capsys):
    (good / "model.safetensors").unlink()
    with open(good / "pytorch_model.bin", "wb") as f:
        pickle.dump({"backbone.norm_f.weight": _Payload()}, f)
    expect_error(good, "pytorch_model.bin", "refused", "code execution")
    assert "code ran" not in capsys.readouterr().out


def test_tied_lm_head_that_differs(good):
    edit_weights(good, lambda sd: sd.__setitem__("lm_head.weight", torch.randn(97, 48)))
    expect_error(good, "lm_head.weight differs from the embedding")


def test_missing_shard(tmp_path):
    d = save_hf(hf_model("mamba2-g2-d128-bias"), tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    expect_error(d, shards[-1].name, "missing")


def test_inconsistent_mamba2_config(tmp_path):
    d = save_hf(hf_model("mamba2-g1"), tmp_path / "m")
    edit_config(d, num_heads=7)
    expect_error(d, "num_heads * head_dim")

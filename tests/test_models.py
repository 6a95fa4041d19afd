"""Reference models vs HF transformers, and stepwise decode vs one full forward (logits and states)."""

from __future__ import annotations

import pytest
import torch
from hf_models import HF_CONFIGS, VOCAB, hf_config, hf_model, save_hf

import ssmrt
from ssmrt.closeness import assert_close
from ssmrt.models import MambaLM, SSMConfig, save_model

# Every HF config, by its id. The tests that build HF models skip without transformers (hf_model); the rest of
# this module (the mamba_ssm-only variants, freeze, errors) runs whether or not it is installed.
CASES = list(HF_CONFIGS)


def random_ids(batch, seqlen, seed=0, vocab=VOCAB):
    return torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def check_stepwise(model, ids, prefill):
    """Prefill `prefill` tokens, then one token at a time; compare with one full forward at every position."""
    with torch.no_grad():
        full_logits, full_state = model(ids)
        logits, state = model(ids[:, :prefill])
        _, prefix_state = model(ids[:, :prefill])
        steps = [logits]
        for t in range(prefill, ids.shape[1]):
            out, state = model(ids[:, t : t + 1], state)
            steps.append(out)
    assert_close(torch.cat(steps, 1), full_logits, name=f"stepwise logits (prefill {prefill})")
    for i, ((c, s), (c_ref, s_ref)) in enumerate(zip(state, full_state, strict=True)):
        assert_close(c, c_ref, name=f"layer {i} conv_state")
        assert_close(s, s_ref, name=f"layer {i} ssm_state")
    return prefix_state


@pytest.mark.parametrize("config", CASES)
def test_logits_match_hf(config, tmp_path):
    family, _ = hf_config(config)
    hf = hf_model(config)
    model = ssmrt.load_model(save_hf(hf, tmp_path / "m"))
    assert isinstance(model, torch.nn.Module)
    ids = random_ids(2, 23)
    with torch.no_grad():
        want = hf(ids).logits
        got, state = model(ids)
    assert_close(got, want, atol=1e-4, rtol=1e-4, name=f"{family} logits vs HF")
    assert len(state) == hf.config.num_hidden_layers


@pytest.mark.parametrize("config", CASES)
@pytest.mark.parametrize("prefill", [1, 6])
def test_stepwise_decode_matches_full_forward(config, prefill, tmp_path):
    model = ssmrt.load_model(save_hf(hf_model(config), tmp_path / "m"))
    check_stepwise(model, random_ids(2, 19, seed=1), prefill)


@pytest.mark.parametrize("config", ["mamba-base", "falcon_mamba-base", "mamba2-g1", "mamba2-g2-d128-bias"])
def test_two_pieces_carry_state(config, tmp_path):
    """Any split of a sequence, carrying the state, gives the whole sequence's logits and state."""
    model = ssmrt.load_model(save_hf(hf_model(config), tmp_path / "m"))
    ids = random_ids(3, 29, seed=2)
    with torch.no_grad():
        whole, whole_state = model(ids)
        for split in (2, 9, 17):
            a, st = model(ids[:, :split])
            b, st = model(ids[:, split:], st)
            assert_close(torch.cat([a, b], 1), whole, name=f"split at {split}")
            for (c, s), (c_ref, s_ref) in zip(st, whole_state, strict=True):
                assert_close(c, c_ref, name="conv_state")
                assert_close(s, s_ref, name="ssm_state")


MAMBA_SSM_ONLY = {
    "d_ssm-mlp": dict(d_inner=96, d_ssm=64),
    "D-per-channel": dict(D_has_hdim=True),
    "norm-before-gate": dict(norm_before_gate=True),
    "no-rmsnorm": dict(rmsnorm=False),
    "padded-vocab-untied": dict(pad_vocab_size_multiple=8, tie_embeddings=False, residual_in_fp32=False),
}


def random_lm(seed=0, **kw):
    cfg = SSMConfig(**{**dict(arch="mamba2", d_model=48, n_layer=2, vocab_size=VOCAB, d_state=16, headdim=16,
                              ngroups=2, chunk_size=4), **kw})
    torch.manual_seed(seed)
    model = MambaLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "D", "norm.weight", "dt_bias")):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model.eval()


@pytest.mark.parametrize("variant", list(MAMBA_SSM_ONLY))
def test_mamba2_variants_stepwise(variant, tmp_path):
    """Variants that only the mamba_ssm layout expresses: decode == full forward, and they round-trip."""
    model = random_lm(**MAMBA_SSM_ONLY[variant])
    check_stepwise(model, random_ids(2, 13, seed=3), 5)
    loaded = ssmrt.load_model(save_model(model, tmp_path / "m", layout="mamba_ssm"))
    ids = random_ids(2, 9, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])
    assert loaded.config.padded_vocab_size == model.config.padded_vocab_size


def test_d_ssm_mlp_prefix_is_used():
    """With d_ssm < d_inner the [z0, x0] prefix feeds out_proj: changing x0's projection rows changes logits."""
    model = random_lm(d_inner=96, d_ssm=64)
    ids = random_ids(1, 5)
    with torch.no_grad():
        before = model(ids)[0]
        d_mlp = model.config.d_mlp
        model.backbone.layers[0].mixer.in_proj.weight[d_mlp : 2 * d_mlp].mul_(2.0)
        after = model(ids)[0]
    assert d_mlp == 32
    assert (before - after).abs().max() > 1e-3


def test_zero_state_equals_none():
    model = random_lm()
    ids = random_ids(2, 7)
    with torch.no_grad():
        a = model(ids)[0]
        b = model(ids, model.zero_state(2))[0]
    assert torch.equal(a, b)


def test_bad_input_ids():
    model = random_lm()
    with pytest.raises(ValueError, match="seqlen >= 1"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="state has 1 layers"):
        model(random_ids(1, 3), model.zero_state(1)[:1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_keeps_fp32_state(dtype, tmp_path):
    model32 = ssmrt.load_model(save_hf(hf_model("mamba2-g1"), tmp_path / "m"))
    model = ssmrt.load_model(tmp_path / "m", dtype=dtype)
    ids = random_ids(1, 11)
    with torch.no_grad():
        logits, state = model(ids)
        want, _ = model32(ids)
    assert logits.dtype == dtype
    assert all(s.dtype == torch.float32 and c.dtype == dtype for c, s in state)
    # low-precision weights and activations drift from fp32; bound the drift relative to the logit scale
    scale = want.abs().max().item()
    assert_close(logits.float(), want, atol=0.05 * scale, rtol=0, name=f"{dtype} logits vs fp32")


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_freeze_keeps_A_and_changes_nothing(arch):
    """freeze() keeps A = -exp(A_log) (no kernels for it in a decode step); the outputs are the same, and
    unfreeze() computes it again (so changed weights are seen)."""
    model = random_lm(arch=arch, d_model=32, d_state=8, headdim=8)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, want_state = model(ids)
        model.freeze()
        assert all(layer.mixer.A_frozen is not None for layer in model.backbone.layers)
        got, got_state = model(ids)
        assert torch.equal(got, want)
        pairs = zip(sum(got_state, ()), sum(want_state, ()), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
        model.backbone.layers[0].mixer.A_log.add_(1.0)
        assert torch.equal(model(ids)[0], got)  # frozen: the change is not seen ...
        model.unfreeze()
        assert not torch.equal(model(ids)[0], got)  # ... until unfrozen


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_last_only_runs_the_head_on_the_last_position(arch):
    """forward(last_only=True) gives forward()'s last-position logits and state, and the lm_head sees one position
    per sequence (not all of them, sliced afterwards); a Session's prefill on the torch runner asks for that."""
    from ssmrt.artifact import flatten_states
    from ssmrt.runtime import Session, TorchRunner

    model = random_lm(arch=arch, d_model=32, d_state=8, headdim=8)
    seen = []
    model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    ids = random_ids(3, 9, seed=5)
    with torch.no_grad():
        full, full_state = model(ids)
        last, last_state = model(ids, last_only=True)
    assert seen == [(3, 9, 32), (3, 1, 32)]
    assert last.shape == (3, 1, model.config.padded_vocab_size)
    assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5, name="last-position logits")
    assert all(torch.equal(a, b) for a, b in zip(flatten_states(last_state), flatten_states(full_state), strict=True))
    seen.clear()
    session = Session(TorchRunner(model))
    got = session.prefill(ids[0].tolist())
    assert seen == [(1, 1, 32)]
    assert_close(torch.from_numpy(got), full[0, -1], atol=1e-5, rtol=1e-5, name="prefill logits")

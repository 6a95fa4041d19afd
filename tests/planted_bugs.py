"""Deliberately broken candidates for the parity tool: each bug as an implementation would have it, planted in a
model's weights (then exported or run on torch) or around a runner, with where `compare` should say it entered.

A bug in a layer's weights shows in the states of the first layer it reaches: A_log or the dt bias in that layer's
SSM state, D (which scales only the layer's output, not its state) in the next layer's states.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np

from ssmrt.runtime.backends import Runner

LAYER = 5  # the layer whose weights a layer bug perturbs (models here have 12)


@dataclass(frozen=True)
class Bug:
    name: str
    what: str
    archs: tuple[str, ...]
    model: object = None  # (model) -> a broken copy
    runner: object = None  # (runner) -> a broken wrapper
    # where the verdict must point: ("logits" | "state", layer, step), None where any will do
    expect: tuple = ()


def _layer_param(model, name):
    return getattr(model.backbone.layers[LAYER].mixer, name)


def _a_log(model):
    m = copy.deepcopy(model)
    p = _layer_param(m, "A_log")
    p.data += 1e-3
    return m


def _d_dropped(model):
    m = copy.deepcopy(model)
    _layer_param(m, "D").data.zero_()
    return m


def _dt_bias(model):
    m = copy.deepcopy(model)
    mixer = m.backbone.layers[LAYER].mixer
    p = mixer.dt_bias if model.config.arch == "mamba2" else mixer.dt_proj.bias
    p.data += 2e-2
    return m


def _dt_limit_ignored(model):
    m = copy.deepcopy(model)
    assert model.config.dt_limit != (0.0, float("inf")), "the model must have a dt limit for this bug to matter"
    cfg = dataclasses.replace(model.config, dt_min_limit=0.0, dt_max_limit=float("inf"))
    m.config = cfg
    for layer in m.backbone.layers:
        layer.mixer.config = cfg
    return m


class _Wrapped(Runner):
    """A runner that delegates to another one, changing what it returns."""

    def __init__(self, inner: Runner, what: str):
        self.inner, self.what = inner, what
        self.config, self.dtype, self.device_kind = inner.config, inner.dtype, inner.device_kind
        self.logits_mode, self.name = inner.logits_mode, inner.name

    def zero_state(self, batch):
        return self.inner.zero_state(batch)

    def to_numpy(self, state):
        return self.inner.to_numpy(state)

    def copy(self, state):
        return self.inner.copy(state)

    def describe(self):
        return f"{self.inner.describe()} with {self.what}"


class StateNotCarried(_Wrapped):
    """Decode steps hand back the state they were given: nothing carries from one step to the next."""

    def forward(self, ids, state):
        logits, new = self.inner.forward(ids, state)
        return logits, (state if np.asarray(ids).shape[1] == 1 else new)


class ConvShifted(_Wrapped):
    """The conv window stored one position off: rolled by one along the width."""

    def forward(self, ids, state):
        logits, new = self.inner.forward(ids, state)
        out = []
        for j, s in enumerate(new):
            if j % 2 == 0:
                s = s.roll(1, -1) if hasattr(s, "roll") else np.roll(s, 1, -1)
            out.append(s)
        return logits, out


class WrongPosition(_Wrapped):
    """Each position of a prompt gets the logits of the position before it."""

    def forward(self, ids, state):
        logits, new = self.inner.forward(ids, state)
        if logits.shape[1] > 1:
            logits = np.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
        return logits, new


BUGS = [
    Bug("state-not-carried", "decode steps do not update the state", ("mamba1", "mamba2"),
        runner=lambda r: StateNotCarried(r, "the state not carried"), expect=("state", 0, 1)),
    Bug("conv-shifted", "the conv state rolled by one position", ("mamba1", "mamba2"),
        runner=lambda r: ConvShifted(r, "the conv state shifted"), expect=("state", 0, 0)),
    Bug("a-log-1e-3", f"layer {LAYER}'s A_log + 1e-3", ("mamba1", "mamba2"), model=_a_log,
        expect=("state", LAYER, 0)),
    Bug("d-dropped", f"layer {LAYER}'s D zeroed", ("mamba1", "mamba2"), model=_d_dropped,
        expect=("state", LAYER + 1, 0)),
    Bug("dt-limit-ignored", "the dt limit not applied", ("mamba2",), model=_dt_limit_ignored,
        expect=("state", None, 0)),
    # a small bug grows with the steps: the layer is certain, not the step it crosses the band at
    Bug("dt-bias-2e-2", f"layer {LAYER}'s dt bias + 2e-2", ("mamba1", "mamba2"), model=_dt_bias,
        expect=("state", LAYER, None)),
    Bug("wrong-position", "the logits of the position before", ("mamba1", "mamba2"),
        runner=lambda r: WrongPosition(r, "the logits of the wrong position"), expect=("logits", None, 0)),
]


# The models the parity suite judges: deep and wide enough that float16 / bfloat16 rounding breaks the fixed
# tolerance table, small enough for CI. The Mamba-2 one has a dt limit that binds, so ignoring it is a bug.
PARITY_CONFIGS = {
    "mamba2": ("mamba2", dict(hidden_size=256, num_hidden_layers=12, state_size=64, num_heads=8, head_dim=64,
                              n_groups=1, expand=2, chunk_size=16, time_step_limit=(0.0, 0.05))),
    "mamba1": ("mamba", dict(hidden_size=256, num_hidden_layers=12, state_size=16)),
}
PARITY_VOCAB = 512
LOGIT_SCALE = 8.0  # the LM head (and embeddings) scaled so the logits span what a trained LM's do, not HF init's 0.02


def parity_model(arch: str, path, seed: int = 0):
    """A random HF checkpoint of PARITY_CONFIGS[arch] saved at path (norms, D and biases perturbed as
    hf_models does); returns path."""
    import torch
    from hf_models import hf_classes, perturbed, save_hf

    family, kw = PARITY_CONFIGS[arch]
    config_cls, model_cls = hf_classes(family)
    torch.manual_seed(seed)
    model = perturbed(model_cls(config_cls(vocab_size=PARITY_VOCAB, **kw)).eval(), seed)
    with torch.no_grad():
        head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        head.mul_(LOGIT_SCALE)
        if head.data_ptr() != emb.data_ptr():
            emb.mul_(LOGIT_SCALE)
    return save_hf(model, path)

"""Reference Mamba-1 / Mamba-2 mixers and the causal LM, in the state conventions of docs/design.md.

Parameter names follow HF transformers (`backbone.embeddings`, `backbone.layers.{i}.mixer.A_log`, ...) so
HF checkpoints load by name; the mamba_ssm layout is mapped in checkpoints.py.

State of one layer: (conv_state (batch, conv_dim, d_conv - 1), ssm_state (batch, d_inner, d_state) for
Mamba-1 or (batch, nheads, headdim, d_state) for Mamba-2). None means zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import dispatch
from ..ops.common import silu
from ..ops.rmsnorm import rmsnorm_ref
from .config import SSMConfig

LayerState = tuple[torch.Tensor, torch.Tensor]

# Parameters that stay float32 whatever the model's dtype (docs/design.md: A, D, dt_bias in fp32).
FP32_PARAMS = ("A_log", "D", "dt_bias", "dt_proj.bias")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm_ref(x, self.weight, self.eps)


def _A(mixer: nn.Module) -> torch.Tensor:
    """A = -exp(A_log) in float32: the frozen copy (MambaLM.freeze) outside an export, else computed."""
    frozen = mixer.A_frozen
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.6
    if frozen is not None and not (torch.compiler.is_compiling() or exporting()):
        return frozen
    return -torch.exp(mixer.A_log.float())


def _conv1d(channels: int, width: int, bias: bool) -> nn.Conv1d:
    # Held as nn.Conv1d so checkpoints' `conv1d.weight` (channels, 1, width) load by name; never called.
    return nn.Conv1d(channels, channels, width, groups=channels, padding=width - 1, bias=bias)


class Mamba1Mixer(nn.Module):
    """Mamba-1: in_proj -> (x, z); x -> conv -> x_proj -> (dt, B, C); selective scan gated by z; out_proj."""

    # A function of dt applied before dt_proj's matmul, or None: the reference of an int8-activation quantised
    # artifact (ssmrt.quantize.dequantized_model) quantises what that matmul reads there.
    dt_input = None

    def __init__(self, config: SSMConfig):
        super().__init__()
        c = config
        self.config = c
        self.in_proj = nn.Linear(c.d_model, 2 * c.d_inner, bias=c.bias)
        self.conv1d = _conv1d(c.d_inner, c.d_conv, c.conv_bias)
        self.x_proj = nn.Linear(c.d_inner, c.dt_rank + 2 * c.d_state, bias=False)
        self.dt_proj = nn.Linear(c.dt_rank, c.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(c.d_inner, c.d_state))
        self.A_frozen: torch.Tensor | None = None  # see MambaLM.freeze
        self.D = nn.Parameter(torch.ones(c.d_inner))
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)

    def forward(
        self,
        hidden: torch.Tensor,
        conv_state: torch.Tensor | None,
        ssm_state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden: (batch, seqlen, d_model) -> (out, new_conv_state, new_ssm_state)."""
        c = self.config
        batch, seqlen, _ = hidden.shape
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        x, conv_state = dispatch.causal_conv1d(
            x, self.conv1d.weight.squeeze(1), self.conv1d.bias, conv_state, "silu"
        )
        dt, B, C = torch.split(self.x_proj(x), [c.dt_rank, c.d_state, c.d_state], dim=-1)
        if c.mixer_rms_eps is not None:
            dt = rmsnorm_ref(dt, None, c.mixer_rms_eps)
            B = rmsnorm_ref(B, None, c.mixer_rms_eps)
            C = rmsnorm_ref(C, None, c.mixer_rms_eps)
        if self.dt_input is not None:
            dt = self.dt_input(dt)
        # dt_proj's bias goes into the scan (delta_bias, fp32), not into the matmul.
        delta = dt @ self.dt_proj.weight.t()
        A = _A(self)
        y, ssm_state = dispatch.selective_scan(
            x,
            delta,
            A,
            B.reshape(batch, seqlen, 1, c.d_state),
            C.reshape(batch, seqlen, 1, c.d_state),
            self.D.float(),
            z,
            self.dt_proj.bias.float(),
            True,
            ssm_state,
        )
        return self.out_proj(y), conv_state, ssm_state


class Mamba2Mixer(nn.Module):
    """Mamba-2: in_proj -> [z0, x0, z, xBC, dt]; xBC -> conv -> (x, B, C); SSD; gated RMSNorm; out_proj."""

    def __init__(self, config: SSMConfig):
        super().__init__()
        c = config
        self.config = c
        d_in_proj = 2 * c.d_inner + 2 * c.ngroups * c.d_state + c.nheads
        self.in_proj = nn.Linear(c.d_model, d_in_proj, bias=c.bias)
        self.conv1d = _conv1d(c.conv_dim, c.d_conv, c.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(c.nheads))
        self.A_log = nn.Parameter(torch.zeros(c.nheads))
        self.A_frozen: torch.Tensor | None = None  # see MambaLM.freeze
        self.D = nn.Parameter(torch.ones(c.d_ssm if c.D_has_hdim else c.nheads))
        if c.rmsnorm:
            self.norm = RMSNorm(c.d_ssm, c.gated_norm_eps)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)

    def forward(
        self,
        hidden: torch.Tensor,
        conv_state: torch.Tensor | None,
        ssm_state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden: (batch, seqlen, d_model) -> (out, new_conv_state, new_ssm_state)."""
        c = self.config
        batch, seqlen, _ = hidden.shape
        gn = c.ngroups * c.d_state
        z0, x0, z, xBC, dt = torch.split(
            self.in_proj(hidden), [c.d_mlp, c.d_mlp, c.d_ssm, c.conv_dim, c.nheads], dim=-1
        )
        xBC, conv_state = dispatch.causal_conv1d(
            xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, conv_state, "silu"
        )
        x, B, C = torch.split(xBC, [c.d_ssm, gn, gn], dim=-1)
        A = _A(self)
        D = self.D.float()
        if c.D_has_hdim:
            D = D.reshape(c.nheads, c.headdim)
        y, ssm_state = dispatch.ssd_scan(
            x.reshape(batch, seqlen, c.nheads, c.headdim),
            dt,
            A,
            B.reshape(batch, seqlen, c.ngroups, c.d_state),
            C.reshape(batch, seqlen, c.ngroups, c.d_state),
            D,
            self.dt_bias.float(),
            True,
            c.dt_limit,
            ssm_state,
            c.chunk_size,
        )
        y = y.reshape(batch, seqlen, c.d_ssm)
        if c.rmsnorm:
            y = dispatch.gated_rmsnorm(
                y, self.norm.weight, z, c.gated_norm_eps, c.d_ssm // c.ngroups, c.norm_before_gate
            )
        else:
            y = y * silu(z)
        if c.d_mlp > 0:
            y = torch.cat([silu(z0) * x0, y], dim=-1)
        return self.out_proj(y), conv_state, ssm_state


class Block(nn.Module):
    """Add -> Norm -> Mixer (mamba_ssm's Block), returning (hidden, residual)."""

    def __init__(self, config: SSMConfig):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = (Mamba1Mixer if config.arch == "mamba1" else Mamba2Mixer)(config)

    def forward(self, hidden, residual, conv_state, ssm_state):
        hidden, residual = dispatch.add_rmsnorm(hidden, residual, self.norm.weight, self.norm.eps,
                                                self.residual_in_fp32)
        hidden, conv_state, ssm_state = self.mixer(hidden, conv_state, ssm_state)
        return hidden, residual, conv_state, ssm_state


class Backbone(nn.Module):
    def __init__(self, config: SSMConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)


class MambaLM(nn.Module):
    """Causal LM: embedding -> n_layer blocks -> norm_f(hidden + residual) -> lm_head (tied unless said).

    forward(input_ids (batch, seqlen) int, state=None) -> (logits (batch, seqlen, padded_vocab), new_state);
    any seqlen >= 1, where seqlen == 1 is a decode step. last_only=True: logits (batch, 1, padded_vocab) of the
    last position only, the only ones a prompt's prefill needs.
    """

    def __init__(self, config: SSMConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embeddings.weight.dtype

    def cast(self, dtype: torch.dtype) -> MambaLM:
        """Cast weights to dtype in place, keeping A_log, D and the dt biases in float32."""
        self.to(dtype)
        for name, p in self.named_parameters():
            if name.endswith(FP32_PARAMS):
                p.data = p.data.float()
        return self

    def freeze(self) -> MambaLM:
        """Keep every mixer's A = -exp(A_log) instead of computing it on each call (two kernels a layer in a
        decode step). For inference runners, which also capture the step: weights changed afterwards need
        freeze() again (and a new runner). An export always computes A from A_log."""
        for layer in self.backbone.layers:
            layer.mixer.A_frozen = (-torch.exp(layer.mixer.A_log.detach().float())).contiguous()
        return self

    def unfreeze(self) -> MambaLM:
        for layer in self.backbone.layers:
            layer.mixer.A_frozen = None
        return self

    def zero_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        ssm_state_dtype: torch.dtype = torch.float32,
    ) -> tuple[LayerState, ...]:
        """The empty state: conv state in the activation dtype, SSM state in float32 by default."""
        device = device if device is not None else self.backbone.embeddings.weight.device
        conv_shape, ssm_shape = self.config.state_shapes(batch_size)
        return tuple(
            (
                torch.zeros(conv_shape, dtype=self.dtype, device=device),
                torch.zeros(ssm_shape, dtype=ssm_state_dtype, device=device),
            )
            for _ in range(self.config.n_layer)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        state: tuple[LayerState, ...] | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, tuple[LayerState, ...]]:
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch, seqlen) with seqlen >= 1, got {tuple(input_ids.shape)}")
        if state is not None and len(state) != self.config.n_layer:
            raise ValueError(f"state has {len(state)} layers, the model has {self.config.n_layer}")
        hidden = self.backbone.embeddings(input_ids)
        residual = None
        new_state = []
        for i, layer in enumerate(self.backbone.layers):
            conv_state, ssm_state = state[i] if state is not None else (None, None)
            hidden, residual, conv_state, ssm_state = layer(hidden, residual, conv_state, ssm_state)
            new_state.append((conv_state, ssm_state))
        if last_only:
            # The final norm and the head act per position: the other positions' rows of the (vocab, d_model)
            # head, the largest matmul of a prefill, would be computed only to be dropped.
            hidden, residual = hidden[:, -1:], residual[:, -1:]
        norm_f = self.backbone.norm_f
        hidden, _ = dispatch.add_rmsnorm(hidden, residual, norm_f.weight, norm_f.eps, False)
        return self.lm_head(hidden), tuple(new_state)

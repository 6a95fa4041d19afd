"""SSMConfig: the one description of a Mamba-1 / Mamba-2 language model that every part of ssmrt reads.

It round-trips through JSON (`to_dict` / `from_dict`) so an exported artifact carries it in its metadata.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

ARCHS = ("mamba1", "mamba2")


@dataclass
class SSMConfig:
    arch: str  # "mamba1" (selective scan) or "mamba2" (SSD)
    d_model: int
    n_layer: int
    vocab_size: int  # the tokenizer's vocabulary; embeddings are padded up to padded_vocab_size
    pad_vocab_size_multiple: int = 1
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    norm_eps: float = 1e-5
    # shared mixer sizes
    d_inner: int = 0  # expand * d_model; 0 -> 2 * d_model
    d_state: int = 16
    d_conv: int = 4
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj bias
    # Mamba-1
    dt_rank: int = 0  # 0 -> ceil(d_model / 16)
    mixer_rms_eps: float | None = None  # FalconMamba: weightless RMS norms on dt, B, C
    # Mamba-2
    headdim: int = 64
    ngroups: int = 1
    d_ssm: int = 0  # width of the SSM part; 0 -> d_inner (anything narrower adds a gated MLP prefix)
    chunk_size: int = 256
    D_has_hdim: bool = False  # D per channel (nheads, headdim) instead of per head
    rmsnorm: bool = True  # gated RMSNorm after the scan (else y * silu(z))
    norm_before_gate: bool = False
    gated_norm_eps: float = 1e-5
    dt_min_limit: float = 0.0
    dt_max_limit: float = math.inf
    # tokens
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # where it came from ("hf:mamba2", "mamba_ssm", ...), informational
    source: str = ""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.d_inner == 0:
            self.d_inner = 2 * self.d_model
        if self.dt_rank == 0:
            self.dt_rank = math.ceil(self.d_model / 16)
        if self.d_ssm == 0:
            self.d_ssm = self.d_inner
        if self.arch == "mamba2":
            if self.d_ssm % self.headdim != 0:
                raise ValueError(f"d_ssm ({self.d_ssm}) must be a multiple of headdim ({self.headdim})")
            if self.nheads % self.ngroups != 0:
                raise ValueError(f"ngroups ({self.ngroups}) must divide nheads ({self.nheads})")
            if self.d_ssm > self.d_inner:
                raise ValueError(f"d_ssm ({self.d_ssm}) cannot exceed d_inner ({self.d_inner})")

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_size_multiple)
        return -(-self.vocab_size // m) * m

    @property
    def nheads(self) -> int:
        return self.d_ssm // self.headdim

    @property
    def d_mlp(self) -> int:
        """Mamba-2 only: width of the gated MLP that runs beside the SSM when d_ssm < d_inner."""
        return self.d_inner - self.d_ssm

    @property
    def conv_dim(self) -> int:
        if self.arch == "mamba1":
            return self.d_inner
        return self.d_ssm + 2 * self.ngroups * self.d_state

    @property
    def dt_limit(self) -> tuple[float, float]:
        return (self.dt_min_limit, self.dt_max_limit)

    def state_shapes(self, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(conv_state, ssm_state) shapes of one layer, in the conventions of docs/design.md."""
        conv = (batch, self.conv_dim, self.d_conv - 1)
        if self.arch == "mamba1":
            return conv, (batch, self.d_inner, self.d_state)
        return conv, (batch, self.nheads, self.headdim, self.d_state)

    def to_dict(self) -> dict:
        d = asdict(self)
        # JSON has no infinity
        d["dt_max_limit"] = None if math.isinf(self.dt_max_limit) else self.dt_max_limit
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SSMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {unknown}")
        d = dict(d)
        if d.get("dt_max_limit", 0.0) is None:
            d["dt_max_limit"] = math.inf
        return cls(**d)

"""SSMConfig: the one description of a Mamba-1 / Mamba-2 language model that every part of ssmrt reads.

It round-trips through JSON (`to_dict` / `from_dict`) so an exported artifact carries it in its metadata.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, asdict, dataclass, fields

from ..errors import SsmrtError

ARCHS = ("mamba1", "mamba2")


class _Names(dict):
    def __missing__(self, key):
        return _DEFAULT_NAMES.get(key, key)


# Placeholders of ConfigError templates that are not SSMConfig fields.
_DEFAULT_NAMES = {"dt_limit": "dt_min_limit, dt_max_limit"}


def _esc(text: str) -> str:
    """text fit for a ConfigError template (braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")


def _shown(v) -> str:
    return _esc(repr(v))


class ConfigError(SsmrtError, ValueError):
    """An SSMConfig that would build a broken model (or none). The message is a template naming fields as
    {field}, so a checkpoint reader can show its own keys instead (render); str() names SSMConfig's fields.
    Also a ValueError, which SSMConfig raised before it had this class."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.render())

    def render(self, names: dict[str, str] | None = None) -> str:
        return self.template.format_map(_Names(names or {}))


_INT_FIELDS = ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "d_inner", "d_state", "d_conv",
               "dt_rank", "headdim", "ngroups", "d_ssm", "chunk_size")
# 0 asks for the default (see the field comments), so only a negative value is wrong before defaults apply.
_DEFAULTED_FIELDS = ("d_inner", "dt_rank", "d_ssm")
_FLOAT_FIELDS = ("norm_eps", "gated_norm_eps", "dt_min_limit", "dt_max_limit")
_BOOL_FIELDS = ("tie_embeddings", "residual_in_fp32", "conv_bias", "bias", "D_has_hdim", "rmsnorm",
                "norm_before_gate")
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


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
        self._check_values()
        if self.d_inner == 0:
            self.d_inner = 2 * self.d_model
        if self.dt_rank == 0:
            self.dt_rank = -(-self.d_model // 16)  # integer ceil: no float overflow for huge sizes
        if self.d_ssm == 0:
            self.d_ssm = self.d_inner
        if self.arch == "mamba2":
            if self.d_ssm > self.d_inner:
                raise ConfigError(f"{{d_ssm}} ({self.d_ssm}) cannot exceed {{d_inner}} ({self.d_inner})")
            if self.d_ssm % self.headdim != 0:
                raise ConfigError(f"{{d_ssm}} ({self.d_ssm}) must be a multiple of {{headdim}} ({self.headdim})")
            if self.nheads % self.ngroups != 0:
                raise ConfigError(f"{{ngroups}} ({self.ngroups}) must divide the number of heads ({self.nheads})")

    def _check_values(self):
        """Types and ranges of each field, before the defaults derive anything from them: a zero or negative
        size, a non-positive epsilon (0/0 -> NaN in a norm) or a dt limit outside 0 <= min <= max builds a
        model that crashes or answers NaN, so none is accepted."""
        if not isinstance(self.arch, str) or self.arch not in ARCHS:
            raise ConfigError(f"{{arch}} must be one of {_shown(ARCHS)}, got {_shown(self.arch)}")
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if not _is_int(v):
                raise ConfigError(f"{{{name}}} must be an integer, got {_shown(v)}")
            if name in _DEFAULTED_FIELDS:
                if v < 0:
                    raise ConfigError(f"{{{name}}} must be a positive integer (or 0 for the default), got {v}")
            elif v < 1:
                raise ConfigError(f"{{{name}}} must be a positive integer, got {v}")
        for name in _FLOAT_FIELDS:
            if not _is_real(getattr(self, name)):
                raise ConfigError(f"{{{name}}} must be a number, got {_shown(getattr(self, name))}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{{{name}}} must be true or false, got {_shown(getattr(self, name))}")
        for name in _TOKEN_FIELDS:
            v = getattr(self, name)
            if v is not None and not _is_int(v):
                raise ConfigError(f"{{{name}}} must be an integer or null, got {_shown(v)}")
        if not isinstance(self.source, str):
            raise ConfigError(f"{{source}} must be a string, got {_shown(self.source)}")
        eps = [("norm_eps", self.norm_eps)]
        if self.arch == "mamba1" and self.mixer_rms_eps is not None:
            if not _is_real(self.mixer_rms_eps):
                raise ConfigError(f"{{mixer_rms_eps}} must be a number or null, got {_shown(self.mixer_rms_eps)}")
            eps.append(("mixer_rms_eps", self.mixer_rms_eps))
        if self.arch == "mamba2":
            eps.append(("gated_norm_eps", self.gated_norm_eps))
        for name, v in eps:
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{{{name}}} must be a positive finite number, got {v}")
        if self.arch == "mamba2":
            lo, hi = self.dt_min_limit, self.dt_max_limit
            # NaN fails every comparison, so it lands here too; an infinite max means no upper limit.
            if not (math.isfinite(lo) and 0 <= lo <= hi):
                raise ConfigError(f"{{dt_limit}} must be (min, max) with 0 <= min <= max and min finite, "
                                  f"got ({lo}, {hi})")

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
    def from_dict(cls, d: dict, where: str | os.PathLike | None = None) -> SSMConfig:
        """The inverse of to_dict. where: the file d came from, for the messages (an artifact's metadata).
        Raises ConfigError (an SsmrtError): one line naming the field and what was expected."""
        at = f"{where}: config" if where is not None else "config"
        if not isinstance(d, dict):
            raise ConfigError(_esc(at) + f": expected a JSON object, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known), key=str)
        if unknown:
            raise ConfigError(_esc(at) + f": unknown fields {_shown(unknown)}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(_esc(at) + f": missing fields {_shown(missing)}")
        d = dict(d)
        if d.get("dt_max_limit", 0.0) is None:
            d["dt_max_limit"] = math.inf
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(_esc(at) + ": " + e.template) from None

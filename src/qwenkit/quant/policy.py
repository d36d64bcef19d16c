"""Which module gets which weight format.

A policy is written as a short spec: a default format for the decoder linears followed by
``role=format`` overrides, e.g. ``int4-g32,o_proj=int8,down_proj=int8,lm_head=int8``.
Roles are the module names of the model: ``qkv_proj``, ``o_proj``, ``gate_up_proj``,
``down_proj`` (decoder linears), ``lm_head`` and ``embed_tokens``. Formats: ``none`` (keep fp32),
``int8`` (per output channel) and ``int4-g32`` / ``int4-g64`` / ``int4-g128`` (group-wise);
``embed_tokens`` takes ``int8`` (rows dequantized on lookup) or ``none``.

Named methods (what `--quantization` / `--method` accept) expand to specs; ``auto`` is resolved
by `resolve_method` (see its docstring for why it picks what it picks).
"""
from __future__ import annotations

from dataclasses import dataclass

LINEAR_ROLES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ROLES = (*LINEAR_ROLES, "lm_head", "embed_tokens")
LINEAR_FORMATS = ("none", "int8", "int4-g32", "int4-g64", "int4-g128")
EMBEDDING_FORMATS = ("none", "int8")

METHODS: dict[str, str] = {
    "none": "none,embed_tokens=none",
    "int8": "int8",
    "int4-g32": "int4-g32,lm_head=int8",
    "int4-g128": "int4-g128,lm_head=int8",
    "int4": "int4-g32,lm_head=int8",
    "int4-all": "int4-g32,lm_head=int4-g32",  # the fewest bytes per token: fastest single stream
    # the example: int4 everywhere except the attention output and FFN-down (the
    # projections fed by the largest-outlier activations) and the head
    "mixed": "int4-g32,o_proj=int8,down_proj=int8,lm_head=int8",
    # seed 003: attention at 4 bits, the (sensitive) FFN kept at 8 bits
    "mixed-ffn8": "int4-g32,gate_up_proj=int8,down_proj=int8,lm_head=int8",
}
# See resolve_method for why.
AUTO_METHOD = "int8"


@dataclass(frozen=True)
class QuantPolicy:
    """Format per role; `spec` is the canonical string form (round-trips through `parse`)."""

    qkv_proj: str = "none"
    o_proj: str = "none"
    gate_up_proj: str = "none"
    down_proj: str = "none"
    lm_head: str = "none"
    embed_tokens: str = "none"

    def format_for(self, role: str) -> str:
        if role not in ROLES:
            raise KeyError(f"unknown module role {role!r}; roles: {', '.join(ROLES)}")
        return getattr(self, role)

    @property
    def is_quantized(self) -> bool:
        return any(self.format_for(r) != "none" for r in ROLES)

    @property
    def spec(self) -> str:
        return ",".join(f"{r}={self.format_for(r)}" for r in ROLES)

    def as_dict(self) -> dict[str, str]:
        return {r: self.format_for(r) for r in ROLES}

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> QuantPolicy:
        return parse(",".join(f"{k}={v}" for k, v in d.items()), default="none")


def parse(spec: str, default: str | None = None) -> QuantPolicy:
    """``"int4-g32,lm_head=int8"`` -> QuantPolicy. Named methods are expanded first.

    The leading bare format applies to the four decoder linears and the head; the embedding
    defaults to int8 whenever anything is quantized (it is a lookup: it costs no speed).
    """
    spec = METHODS.get(spec.strip(), spec.strip())
    values: dict[str, str] = {}
    base = default
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" in item:
            role, fmt = (s.strip() for s in item.split("=", 1))
            if role not in ROLES:
                raise ValueError(f"unknown module role {role!r} in {spec!r}; roles: {', '.join(ROLES)}")
            values[role] = fmt
        else:
            if base is not None and values:
                raise ValueError(f"the default format must come first in {spec!r}")
            base = item
    base = base or "none"
    for role in (*LINEAR_ROLES, "lm_head"):
        values.setdefault(role, base)
    any_quant = any(values[r] != "none" for r in (*LINEAR_ROLES, "lm_head"))
    values.setdefault("embed_tokens", "int8" if any_quant else "none")
    for role, fmt in values.items():
        allowed = EMBEDDING_FORMATS if role == "embed_tokens" else LINEAR_FORMATS
        if fmt not in allowed:
            raise ValueError(f"format {fmt!r} is not valid for {role}; choose from {', '.join(allowed)}")
    return QuantPolicy(**values)


def resolve_method(method: str) -> str:
    """Map ``auto`` to a concrete method; leave the others alone.

    ``auto`` = the fastest method whose perplexity stays within 2% of the fp32-dequantized model
    (`qwenkit eval quant`), where "fastest" counts batched decode, prefill and serving, not only
    one stream. That is int8: the best quality of the formats, and the fastest from a few rows
    on, because its kernel does half the floating-point work per weight of int4's (one scale
    per 128 columns with VNNI vs one per 32 weights and row). ``int4-all`` reads the fewest
    bytes per token, so it is the single-stream pick. Measurements: docs/benchmarks.md.
    """
    return AUTO_METHOD if method == "auto" else method


def method_names() -> list[str]:
    return ["auto", *METHODS]

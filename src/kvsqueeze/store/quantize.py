"""KIVI-style asymmetric group quantization of K/V: the arithmetic, with no store.

KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
arXiv 2402.02750) found that keys have a few outlier *channels* while values have no
channel structure, so keys are quantized per channel (a group is G consecutive tokens
sharing one scale and zero point per channel) and values per token (a group is G
consecutive channels of one token). Quantizing keys per token instead (the naive
scheme, `key_axis="token"`) lets an outlier channel set the scale of every other
channel of the token, which is what makes naive 2-bit collapse.

Codes are unsigned b-bit integers packed in planes along the channel axis: with m
bytes per token, an int4 byte j holds channel j (low nibble) and channel j + m (high
nibble), an int2 byte channels j, j + m, j + 2m, j + 3m (bits 0-1, 2-3, 4-5, 6-7).
Scale and zero point are fp16; a code c stands for c * scale + zero. Codes are
computed against the fp16-rounded scale and zero, so the round-trip error is half a
step plus fp16 rounding of the range's ends.

Everything is a function of tensors whose leading axes are free, so a flat store
(store/quantized_kv.py) and a paged store (a block = a key group) share it: a key
group is a [..., G, d] tensor, a value row is one token's self-contained bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

BITS = (8, 4, 2)
FP16_MAX = 65504.0


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes [..., n] (each < 2**bits) into bytes [..., m], m = n * bits / 8.

    Planar: byte j holds codes j, j + m, j + 2m, ... from its low bits up, so
    unpacking is a few whole-row shifts and one concatenation (no interleaving),
    and a kernel can dot each plane with the matching slice of the query."""
    _check_bits(bits)
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    n = codes.shape[-1]
    if n % per:
        raise ValueError(f"{n} codes do not fill whole bytes of {per} {bits}-bit codes")
    planes = codes.to(torch.uint8).unflatten(-1, (per, n // per)).unbind(-2)
    packed = planes[0].clone()
    for i, plane in enumerate(planes[1:], start=1):
        packed |= plane << (i * bits)
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack: bytes [..., m] to uint8 codes [..., m * 8 / bits]."""
    _check_bits(bits)
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    planes = [(packed >> shift) & mask for shift in range(0, 8 - bits, bits)]
    return torch.cat([*planes, packed >> (8 - bits)], dim=-1)  # the top plane needs no mask


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"kv bits must be one of {BITS}, got {bits}")


def quantize_along(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantization of x, one (scale, zero) per slice along `dim`.
    Returns (codes uint8 shaped like x, scale fp16, zero fp16 with `dim` kept as 1)."""
    x = x.float()
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    if bool((hi.abs() > FP16_MAX).any() | (lo.abs() > FP16_MAX).any()):
        raise ValueError("K/V values beyond the fp16 range cannot take an fp16 scale and zero point")
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).half()
    # A constant slice has no range: any nonzero scale codes it exactly as its zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = lo.half()
    # One reciprocal per group and a multiply per element: a division per element is
    # several times slower on CPU, and the codes may differ only at exact ties.
    codes = torch.round((x - zero.float()) * scale.float().reciprocal()).clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


@dataclass(frozen=True)
class KVQuantizer:
    """KIVI's quantizer (arXiv 2402.02750): keys per channel over groups of `group`
    tokens, values per token over groups of `group` channels (capped at head_dim),
    `bits`-bit codes with an fp16 scale and zero point per group. `key_axis="token"`
    is the naive baseline that quantizes keys per token like values."""

    bits: int = 4
    group: int = 32
    key_axis: Literal["channel", "token"] = "channel"

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.group < 1:
            raise ValueError(f"quantization group must be >= 1, got {self.group}")
        if self.key_axis not in ("channel", "token"):
            raise ValueError(f"key_axis must be 'channel' or 'token', got {self.key_axis!r}")

    @property
    def keys_per_channel(self) -> bool:
        return self.key_axis == "channel"

    def code_bytes(self, head_dim: int) -> int:
        """Bytes of one token's packed codes (keys or values)."""
        self.channel_group(head_dim)
        return head_dim * self.bits // 8

    def channel_group(self, head_dim: int) -> int:
        """Channels per value group (and per key group with per-token keys)."""
        group = min(self.group, head_dim)
        if head_dim % group or (head_dim * self.bits) % 8:
            raise ValueError(f"head_dim {head_dim} is not a multiple of the channel group {group} (or of whole bytes)")
        return group

    def row_bytes(self, head_dim: int) -> int:
        """Bytes of a per-token row: packed codes, then fp16 scales, then fp16 zeros."""
        return self.code_bytes(head_dim) + 4 * (head_dim // self.channel_group(head_dim))

    # ------------------------------------------------------------ per-channel keys
    def quantize_key_groups(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys [..., G, d] (one token group each) to (codes [..., G, d*bits/8] uint8,
        scale [..., d] fp16, zero [..., d] fp16): one scale and zero per channel."""
        self.code_bytes(keys.shape[-1])
        codes, scale, zero = quantize_along(keys, self.bits, dim=-2)
        return pack(codes, self.bits), scale.squeeze(-2), zero.squeeze(-2)

    def dequantize_keys(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Packed key codes [..., d*bits/8] with each token's group scale and zero
        [..., d] (broadcast to the codes' leading axes) to keys [..., d] in `dtype`."""
        return torch.addcmul(zero.to(dtype), unpack(codes, self.bits).to(dtype), scale.to(dtype))

    # ------------------------------------------------------------- per-token rows
    def quantize_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Values (or naive keys) [..., d] to self-contained rows [..., row_bytes] uint8:
        codes, then one fp16 scale and zero per group of channels of that token."""
        d = x.shape[-1]
        group = self.channel_group(d)
        codes, scale, zero = quantize_along(x.reshape(*x.shape[:-1], d // group, group), self.bits, dim=-1)
        meta = torch.cat([scale.squeeze(-1), zero.squeeze(-1)], dim=-1)
        return torch.cat([pack(codes.flatten(-2), self.bits), meta.view(torch.uint8)], dim=-1)

    def dequantize_rows(self, rows: torch.Tensor, head_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Inverse of quantize_rows: rows [..., row_bytes] to [..., head_dim] in `dtype`."""
        group = self.channel_group(head_dim)
        n_codes, n_groups = self.code_bytes(head_dim), head_dim // group
        meta = rows[..., n_codes:].contiguous().view(torch.float16).to(dtype)
        scale, zero = meta[..., :n_groups, None], meta[..., n_groups:, None]
        codes = unpack(rows[..., :n_codes], self.bits).to(dtype)
        return torch.addcmul(zero, codes.unflatten(-1, (n_groups, group)), scale).flatten(-2)

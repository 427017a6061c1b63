"""QuantizedKV: the prefill quantized whole (key groups counted from each head's newest
entry, a shorter first group with its own scales), decode appends through the
residual window, eviction on quantized entries, int16/int32 positions, and bytes
counted from the tensors."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.store import FlatKV
from kvsqueeze.store.quantize import KVQuantizer
from kvsqueeze.store.quantized_kv import INT16_POSITION_MAX, QuantizedKV

D, G, R = 16, 4, 8


def dense(heads: int, tokens: int, seed: int = 0, dtype: torch.dtype = torch.float32, d: int = D):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(heads, tokens, d, generator=gen).to(dtype), torch.randn(heads, tokens, d, generator=gen).to(
        dtype
    )


def group_sizes(n: int, g: int = G) -> list[int]:
    """A prefilled head's key groups: counted from its newest entry back, the oldest
    n % g entries (when g does not divide n) a shorter first group."""
    return ([n % g] if n % g else []) + [g] * (n // g)


def by_hand(q: KVQuantizer, keys: torch.Tensor, values: torch.Tensor, sizes: list[int]):
    """One head's entries [n, D], the first sum(sizes) quantized, keys in groups of the
    given sizes (each with its own scale and zero point), the rest in full precision:
    what the store must hold, done with quantize.py directly."""
    n_quant = sum(sizes)
    old_k, old_v = keys[:n_quant], values[:n_quant]
    if q.keys_per_channel:
        parts = []
        for group in old_k.split(sizes):
            codes, scale, zero = q.quantize_key_groups(group[None])
            parts.append(q.dequantize_keys(codes[0], scale, zero))
        old_k = torch.cat(parts) if parts else old_k.float()
    else:
        old_k = q.dequantize_rows(q.quantize_rows(old_k), D)
    old_v = q.dequantize_rows(q.quantize_rows(old_v), D)
    return torch.cat([old_k.to(keys.dtype), keys[n_quant:]]), torch.cat([old_v.to(values.dtype), values[n_quant:]])


def assert_head_equals(kv: QuantizedKV, h: int, keys: torch.Tensor, values: torch.Tensor, sizes: list[int]):
    q = kv.quantizer
    want_k, want_v = by_hand(q, keys, values, sizes)
    k, v, _ = kv.head(h)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


@pytest.mark.parametrize("key_axis", ["channel", "token"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_prefill_quantizes_every_kept_entry_with_a_short_first_group(bits, key_axis):
    # Heads keep 0, 1, G-1, G, G+1 and 3G+2 entries: every shape of a first group.
    kept = [0, 1, G - 1, G, G + 1, 3 * G + 2]
    t = max(kept) + 5
    keys, values = dense(len(kept), t, seed=bits)
    gen = torch.Generator().manual_seed(1)
    keep = torch.zeros(len(kept), t, dtype=torch.bool)
    for h, n in enumerate(kept):
        keep[h, torch.randperm(t, generator=gen)[:n]] = True
    q = KVQuantizer(bits=bits, group=G, key_axis=key_axis)
    kv = QuantizedKV.from_dense(keys, values, keep, quantizer=q, residual_len=R)

    assert kv.codes.lengths.tolist() == kv.lengths.tolist() == kept
    assert kv.residual.lengths.tolist() == [0] * len(kept)
    if q.keys_per_channel:
        assert kv.groups.lengths.tolist() == [len(group_sizes(n)) for n in kept]
        assert kv.groups.positions.tolist() == [c for n in kept for c in group_sizes(n)]
    else:
        assert kv.groups.num_tokens == 0
    for h, n in enumerate(kept):
        _, _, p = kv.head(h)
        assert p.dtype == torch.int32 and p.tolist() == keep[h].nonzero().flatten().tolist()
        assert_head_equals(kv, h, keys[h][keep[h]], values[h][keep[h]], group_sizes(n) if q.keys_per_channel else [n])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_a_short_first_group_is_scaled_by_its_own_entries(bits):
    """The first group's padding never widens its range: its round-trip error is
    within half a step of its own entries' range, even next to a group with a range
    a hundred times wider."""
    g = 32
    keys = torch.cat([torch.randn(1, 5, D) * 0.01, torch.randn(1, g, D)], dim=1)
    values = torch.randn(1, g + 5, D)
    q = KVQuantizer(bits=bits, group=g)
    kv = QuantizedKV.from_dense(keys, values, torch.ones(1, g + 5, dtype=torch.bool), quantizer=q, residual_len=0)
    assert kv.groups.positions.tolist() == [5, g]
    first = keys[0, :5]
    step = (first.amax(0) - first.amin(0)) / ((1 << bits) - 1)
    bound = step / 2 + 2**-10 * (first.amax(0).abs() + first.amin(0).abs()) + 1e-6
    assert bool(((kv.head(0)[0][:5] - first).abs() <= bound).all())


def test_decode_appends_fill_the_residual_and_quantize_whole_groups():
    """Token-by-token appends after a prefill with short first groups (heads out of
    phase, some steps skipping heads): the residual crosses R-1, R, R+1, R+G-1 and
    R+G, a group is quantized whenever it reaches R+G, and every head stays exact
    against quantizing its prompt groups, then its decoded groups, by hand."""
    heads, t = 3, 60
    keys, values = dense(heads, t, seed=3)
    q = KVQuantizer(bits=4, group=G)
    start = [5, G, 0]
    keep = torch.arange(t)[None, :] < torch.tensor(start)[:, None]
    kv = QuantizedKV.from_dense(keys, values, keep, quantizer=q, residual_len=R)
    gen = torch.Generator().manual_seed(4)
    decoded = [0] * heads
    nxt = list(start)
    seen_lengths = set()
    for _ in range(40):
        valid = torch.rand(heads, 1, generator=gen) > 0.2
        idx = torch.tensor(nxt)
        kv.append(
            keys[torch.arange(heads), idx][:, None], values[torch.arange(heads), idx][:, None], idx[:, None], valid
        )
        for h in range(heads):
            if valid[h, 0]:
                decoded[h] += 1
                nxt[h] += 1
            n = decoded[h]
            flushed = 0 if n < R + G else (n - R) // G
            assert kv.residual.lengths[h] == n - flushed * G
            seen_lengths.add(int(kv.residual.lengths[h]))
            assert kv.codes.lengths[h] == start[h] + flushed * G
            sizes = group_sizes(start[h]) + [G] * flushed
            assert kv.groups.positions[int(kv.groups.starts[h]) :][: len(sizes)].tolist() == sizes
            assert_head_equals(kv, h, keys[h, : nxt[h]], values[h, : nxt[h]], sizes)
    assert {R - 1, R, R + 1, R + G - 1} <= seen_lengths and max(seen_lengths) == R + G - 1


def test_a_chunk_longer_than_a_group_quantizes_several_groups():
    keys, values = dense(2, 64, seed=5)
    q = KVQuantizer(bits=2, group=G)
    kv = QuantizedKV.from_dense(
        keys[:, :10], values[:, :10], torch.ones(2, 10, dtype=torch.bool), quantizer=q, residual_len=R
    )
    kv.append(keys[:, 10:], values[:, 10:], torch.arange(10, 64))
    # 54 appended: quantized G at a time until fewer than R + G remain (11 groups, 10 left).
    assert kv.codes.lengths.tolist() == [54, 54] and kv.residual.lengths.tolist() == [10, 10]
    for h in range(2):
        assert_head_equals(kv, h, keys[h], values[h], group_sizes(10) + [G] * 11)


@pytest.mark.parametrize("key_axis", ["channel", "token"])
def test_eviction_on_quantized_entries_keeps_their_codes(key_axis):
    """Evicting from a quantized store keeps exactly the chosen entries, dequantized as
    before (codes and group scales untouched), across the short first group, whole
    groups and the residual; emptied groups are dropped; a group count that shrank
    carries on through later appends and evictions."""
    heads, t = 4, 90
    keys, values = dense(heads, t, seed=6)
    q = KVQuantizer(bits=4, group=G, key_axis=key_axis)
    kv = QuantizedKV.from_dense(
        keys[:, :42], values[:, :42], torch.ones(heads, 42, dtype=torch.bool), quantizer=q, residual_len=R
    )
    for i in range(42, 60):  # 18 decoded: two groups quantized, 10 in the residual
        kv.append(keys[:, i : i + 1], values[:, i : i + 1], torch.tensor([i]))
    assert kv.codes.lengths.tolist() == [50] * heads and kv.residual.lengths.tolist() == [10] * heads
    before = [kv.head(h) for h in range(heads)]
    gen = torch.Generator().manual_seed(7)
    keep = torch.rand(heads, 62, generator=gen) > 0.5
    keep[0, :6] = False  # head 0's short first group (2) and the next whole one go entirely
    keep[1] = True
    keep[2, :2] = True  # head 2's first group survives whole...
    keep[2, 2:10] = False  # ...and its next two go
    bytes_before = kv.nbytes
    kv.evict(keep)
    assert kv.nbytes < bytes_before
    assert kv.lengths.tolist() == keep[:, :60].sum(dim=1).tolist()
    if q.keys_per_channel:
        assert kv.groups.lengths.tolist()[1] == 13 and kv.groups.lengths[0] < 12 and kv.groups.lengths[2] < 12
        assert kv.groups.positions.sum() == kv.codes.lengths.sum()
    for h in range(heads):
        k, v, p = kv.head(h)
        mask = keep[h, :60]
        assert torch.equal(k, before[h][0][mask]) and torch.equal(v, before[h][1][mask])
        assert torch.equal(p, before[h][2][mask])
    # Decoding on: appends still quantize whole new groups after the shrunken ones; the
    # entries quantized before are untouched, the residual and the new ones quantized in
    # groups of G from the oldest.
    mid, n_quant = [kv.head(h) for h in range(heads)], kv.codes.lengths.tolist()
    for i in range(60, 90):
        kv.append(keys[:, i : i + 1], values[:, i : i + 1], torch.tensor([i]))
    after = [kv.head(h) for h in range(heads)]
    for h in range(heads):
        nq, flushed = n_quant[h], int(kv.codes.lengths[h]) - n_quant[h]
        assert flushed % G == 0 and kv.residual.lengths[h] < R + G
        assert torch.equal(after[h][0][:nq], mid[h][0][:nq]) and torch.equal(after[h][1][:nq], mid[h][1][:nq])
        tail_k, tail_v = torch.cat([mid[h][0][nq:], keys[h, 60:]]), torch.cat([mid[h][1][nq:], values[h, 60:]])
        want_k, want_v = by_hand(q, tail_k, tail_v, [G] * (flushed // G))
        assert torch.equal(after[h][0][nq:], want_k) and torch.equal(after[h][1][nq:], want_v)
    kv.evict(torch.ones(heads, int(kv.lengths.max()), dtype=torch.bool))
    for h in range(heads):
        for a, b in zip(kv.head(h), after[h], strict=True):
            assert torch.equal(a, b)


def test_evict_needs_a_column_per_entry():
    keys, values = dense(2, 20)
    kv = QuantizedKV.from_dense(
        keys, values, torch.ones(2, 20, dtype=torch.bool), quantizer=KVQuantizer(), residual_len=R
    )
    with pytest.raises(ValueError, match="fewer than the longest"):
        kv.evict(torch.ones(2, 19, dtype=torch.bool))
    with pytest.raises(ValueError, match="residual window"):
        QuantizedKV.from_dense(
            keys, values, torch.ones(2, 20, dtype=torch.bool), quantizer=KVQuantizer(), residual_len=-1
        )


def tensor_bytes(kv: QuantizedKV) -> int:
    parts = (kv.codes, kv.groups, kv.residual)
    names = ("keys", "values", "positions", "lengths", "capacity", "starts")
    return sum(getattr(p, n).numel() * getattr(p, n).element_size() for p in parts for n in names)


@pytest.mark.parametrize("group", [32, 256])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_nbytes_is_codes_scales_zeros_positions_and_the_residual(bits, group):
    heads, t, d = 6, 300, 64
    keys, values = dense(heads, t, dtype=torch.bfloat16, d=d)
    q = KVQuantizer(bits=bits, group=group)
    kv = QuantizedKV.from_dense(keys, values, torch.ones(heads, t, dtype=torch.bool), quantizer=q, residual_len=20)
    assert kv.nbytes == tensor_bytes(kv)
    n_groups = len(group_sizes(t, group))
    value_groups = d // min(group, d)
    per_entry = 2 * d * bits // 8 + 4 * value_groups + 2  # key codes, value codes + fp16 scales and zeros, int16
    per_group = 2 * 2 * d + 4  # fp16 scale and zero per channel, the live count
    metadata = 3 * 3 * heads * 8  # lengths, capacity, starts (int64) of three FlatKVs
    assert kv.nbytes == heads * (t * per_entry + n_groups * per_group) + metadata
    full = FlatKV.from_dense(keys, values, torch.ones(heads, t, dtype=torch.bool))
    assert kv.nbytes < full.nbytes * {8: 0.6, 4: 0.35, 2: 0.22}[bits]
    kv.reserve(64)
    grown, buffers = kv.nbytes, [part.keys.data_ptr() for part in (kv.codes, kv.groups, kv.residual)]
    assert grown == tensor_bytes(kv)
    for i in range(64):
        kv.append(keys[:, :1], values[:, :1], torch.tensor([t + i]))
        assert kv.nbytes == tensor_bytes(kv)
    # The reservation held every append: the quantized parts were never regrown.
    assert [part.keys.data_ptr() for part in (kv.codes, kv.groups)] == buffers[:2] and kv.nbytes <= grown
    kv.trim()
    assert kv.lengths.tolist() == [t + 64] * heads and kv.nbytes < grown and kv.nbytes == tensor_bytes(kv)


def test_positions_are_int16_only_while_every_position_fits():
    keys, values = dense(2, 12)
    q = KVQuantizer(bits=4, group=G)
    keep = torch.ones(2, 12, dtype=torch.bool)
    low = torch.arange(INT16_POSITION_MAX - 11, INT16_POSITION_MAX + 1)  # the last is 32767: still int16
    kv = QuantizedKV.from_dense(keys, values, keep, low, quantizer=q, residual_len=R)
    assert kv.codes.positions.dtype == kv.residual.positions.dtype == torch.int16
    high = QuantizedKV.from_dense(keys, values, keep, low + 1, quantizer=q, residual_len=R)  # 32768: int32
    assert high.codes.positions.dtype == high.residual.positions.dtype == torch.int32
    assert high.head(0)[2].tolist() == (low + 1).tolist()
    # An append past int16's range widens every position once, losing none.
    more_k, more_v = dense(2, 2 * R, seed=1)
    for i in range(2 * R):
        kv.append(more_k[:, i : i + 1], more_v[:, i : i + 1], torch.tensor([INT16_POSITION_MAX + 1 + i]))
        if i == 0:
            assert kv.codes.positions.dtype == kv.residual.positions.dtype == torch.int32
    assert kv.codes.lengths[0] > 12  # groups were quantized after the widening
    want = low.tolist() + list(range(INT16_POSITION_MAX + 1, INT16_POSITION_MAX + 1 + 2 * R))
    for h in range(2):
        assert kv.head(h)[2].tolist() == want
    assert kv.max_position() == want[-1] and kv.dequantized().positions.dtype == torch.int32
    assert kv.nbytes == tensor_bytes(kv)


def test_dequantized_is_a_flat_copy_of_the_same_entries():
    keys, values = dense(3, 30, seed=8)
    keep = torch.rand(3, 30, generator=torch.Generator().manual_seed(9)) > 0.3
    kv = QuantizedKV.from_dense(keys, values, keep, quantizer=KVQuantizer(bits=2, group=G), residual_len=R)
    flat = kv.dequantized()
    assert flat.lengths.tolist() == kv.lengths.tolist()
    for h in range(3):
        for a, b in zip(flat.head(h), kv.head(h), strict=True):
            assert torch.equal(a, b)
    assert kv.max_position() == flat.max_position()


# SmolLM2-135M's per-layer shapes: 3 kv-heads, head_dim 64, bf16; a 2048-token prompt.
SMOL_HEADS, SMOL_D, PROMPT = 3, 64, 2048


@pytest.mark.parametrize(
    ("group", "targets"),
    [
        # The compact setting meets issue 13's targets; the default stays within reach of them.
        (256, {8: 0.53, 4: 0.28, 2: 0.16}),
        (32, {8: 0.572, 4: 0.322, 2: 0.197}),
    ],
)
def test_byte_ratios_at_smollm2_shapes(group, targets):
    keys, values = dense(SMOL_HEADS, PROMPT, dtype=torch.bfloat16, d=SMOL_D)
    full = 2 * SMOL_HEADS * PROMPT * SMOL_D * 2  # K and V in bf16, what eval's kv_bytes_full counts
    everything = torch.ones(SMOL_HEADS, PROMPT, dtype=torch.bool)
    for bits, target in targets.items():
        kv = QuantizedKV.from_dense(
            keys, values, everything, quantizer=KVQuantizer(bits=bits, group=group), residual_len=128
        )
        assert kv.nbytes == tensor_bytes(kv) and kv.nbytes / full <= target, (bits, kv.nbytes / full)
    # keep 0.25 with per-head budgets (Ada-KV-like: 512 per head on average, none a
    # multiple of the group) at scattered positions: int4 under 0.08 at the compact setting.
    gen = torch.Generator().manual_seed(0)
    keep = torch.zeros(SMOL_HEADS, PROMPT, dtype=torch.bool)
    for h, n in enumerate([203, 517, 816]):
        keep[h, torch.randperm(PROMPT, generator=gen)[:n]] = True
    kv = QuantizedKV.from_dense(keys, values, keep, quantizer=KVQuantizer(bits=4, group=group), residual_len=128)
    ratio = kv.nbytes / full
    assert kv.residual.num_tokens == 0 and ratio <= {256: 0.08, 32: 0.082}[group], ratio

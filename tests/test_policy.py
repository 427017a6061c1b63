"""Policies: scorers against naive re-implementations, Ada-KV and Pyramid allocation,
budgets, and the keep masks every preset produces."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kvsqueeze.hf.kvzip import needs_reconstruction
from kvsqueeze.policy import Budget, Policy, ScoreInput, make_policy, policy_names
from kvsqueeze.policy.allocate import AdaKVAllocator, UniformAllocator
from kvsqueeze.policy.names import CROSS_PREFIX
from kvsqueeze.policy.schedule import FlatSchedule, PyramidSchedule
from kvsqueeze.policy.score import (
    H2OScorer,
    KNormScorer,
    RandomScorer,
    SnapKVScorer,
    StreamingLLMScorer,
    TOVAScorer,
    attention_probs,
)
from kvsqueeze.policy.select import keep_mask, ranks_within


def make_input(
    n_valid: list[int], t: int, q_heads: int = 6, kv_heads: int = 2, d: int = 16, window: int = 8, seed: int = 0
) -> ScoreInput:
    """Random prefill of a left-padded batch: sequence i has n_valid[i] real tokens."""
    gen = torch.Generator().manual_seed(seed)
    b = len(n_valid)
    queries = torch.randn(b, q_heads, t, d, generator=gen)
    keys = torch.randn(b, kv_heads, t, d, generator=gen)
    values = torch.randn(b, kv_heads, t, d, generator=gen)
    slot = torch.arange(t)
    valid = slot[None, :] >= (t - torch.tensor(n_valid))[:, None]
    return ScoreInput(queries, keys, values, valid, scaling=d**-0.5, window=window)


def naive_probs(x: ScoreInput, q_start: int, q_end: int) -> torch.Tensor:
    """[b, q_heads, queries, tokens] causal softmax in float64, K/V repeated per group."""
    g = x.group_size
    q = x.queries.double()[:, :, q_start:q_end]
    k = x.keys.double().repeat_interleave(g, dim=1)
    logits = q @ k.transpose(-1, -2) * x.scaling
    t = x.keys.shape[2]
    q_pos = torch.arange(q_start, q_end)
    allowed = (torch.arange(t)[None, :] <= q_pos[:, None])[None] & x.valid[:, None, :]  # [b, nq, t]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def by_group(scores: torch.Tensor, kv_heads: int, how: str = "mean") -> torch.Tensor:
    b, hq, t = scores.shape
    grouped = scores.view(b, kv_heads, hq // kv_heads, t)
    return grouped.mean(dim=2) if how == "mean" else grouped.amax(dim=2)


# ----------------------------------------------------------------------- scorers
def paper_softmax_row(q: list[float], keys: list[list[float]], scaling: float) -> list[float]:
    """softmax_j(q . k_j * scaling) over the keys a query may see, in plain Python."""
    logits = [scaling * sum(a * b for a, b in zip(q, k, strict=True)) for k in keys]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    return [e / sum(exps) for e in exps]


def paper_pool(row: list[float], kernel: int, how: str) -> list[float]:
    """1-D pooling with stride 1 and zero padding kernel // 2 (avg counts the padding)."""
    if how == "none":
        return list(row)
    half, pad = kernel // 2, (0.0 if how == "avg" else -math.inf)
    out = []
    for i in range(len(row)):
        window = [row[j] if 0 <= j < len(row) else pad for j in range(i - half, i + half + 1)]
        out.append(max(window) if how == "max" else sum(window) / kernel)
    return out


def paper_group(rows: list[list[float]], how: str) -> list[float]:
    """Reduce the query heads of a GQA group, token by token, by mean or max."""
    return [max(col) if how == "max" else sum(col) / len(col) for col in zip(*rows, strict=True)]


def paper_snapkv(x: ScoreInput, kernel: int, pool: str, how: str, order: str) -> torch.Tensor:
    """SnapKV as its paper defines it, per head: the last `window` queries vote for the
    prefix keys with their softmax attention (each query over the real keys up to its
    own position), votes are summed over the window and pooled over the prefix; the
    window itself is kept anyway. GQA: reduce the query heads of a group before or
    after pooling. Written with loops, independently of the implementation."""
    b, hq, t, _ = x.queries.shape
    hkv = x.keys.shape[1]
    g = hq // hkv
    w = min(x.window, t)
    out = torch.zeros(b, hkv, t, dtype=torch.float64)
    for bi in range(b):
        real = [j for j in range(t) if x.valid[bi, j]]
        for kv in range(hkv):
            votes = []
            for qh in range(kv * g, (kv + 1) * g):
                total = [0.0] * t
                for i in range(t - w, t):
                    if not x.valid[bi, i]:
                        continue
                    seen = [j for j in real if j <= i and (x.sliding_window is None or i - j < x.sliding_window)]
                    probs = paper_softmax_row(
                        x.queries[bi, qh, i].tolist(), [x.keys[bi, kv, j].tolist() for j in seen], x.scaling
                    )
                    for j, p in zip(seen, probs, strict=True):
                        total[j] += p
                votes.append(total)
            if order == "reduce-then-pool":
                votes = [paper_group(votes, how)]
            pooled = [paper_pool(v[: t - w], kernel, pool) + v[t - w :] for v in votes]
            out[bi, kv] = torch.tensor(paper_group(pooled, how), dtype=torch.float64)
    return out


@pytest.mark.parametrize(
    ("how", "pool", "order"),
    [
        ("mean", "max", "pool-then-reduce"),
        ("max", "max", "pool-then-reduce"),
        ("mean", "avg", "reduce-then-pool"),
        ("max", "avg", "pool-then-reduce"),
        ("mean", "none", "pool-then-reduce"),
    ],
)
@pytest.mark.parametrize("kernel", [5, 7])
def test_snapkv_equals_paper_definition(how, pool, order, kernel):
    x = make_input([40, 33], t=40, window=8)
    expected = paper_snapkv(x, kernel, pool, how, order)
    got = SnapKVScorer(group_reduce=how, pool=pool, kernel=kernel, pool_order=order)(x)
    assert got.shape == (2, 2, 40)
    real = x.valid[:, None, :].expand_as(got)  # padding slots: pooled zeros vs -inf padding, never kept
    torch.testing.assert_close(got.double()[real], expected[real], atol=1e-5, rtol=1e-5)


def test_snapkv_pools_only_the_prefix_and_orders_differ():
    x = make_input([48], t=48, window=8, seed=5)
    scorer = SnapKVScorer(pool="max")
    sums = attention_probs(x, 40, 48).sum(dim=3)
    # The window's keys keep their own (unpooled) votes: a strong window key does not leak backwards.
    torch.testing.assert_close(scorer(x)[..., 40:], sums.mean(dim=2)[..., 40:])
    assert not torch.equal(scorer(x), SnapKVScorer(pool="max", pool_order="reduce-then-pool")(x))
    # Average pooling and the group mean are both linear: the two orders agree.
    torch.testing.assert_close(SnapKVScorer()(x), SnapKVScorer(pool_order="reduce-then-pool")(x))


def test_snapkv_window_longer_than_prompt():
    x = make_input([10], t=10, window=32)
    torch.testing.assert_close(SnapKVScorer()(x).double(), paper_snapkv(x, 5, "avg", "mean", "pool-then-reduce"))


def test_make_policy_passes_pooling_to_scorers_that_pool():
    default = make_policy("snapkv", keep=0.5).scorer
    assert (default.pool, default.kernel) == ("avg", 5)  # SnapKV's released code and kvpress
    for name in ("snapkv", "ada-snapkv", "pyramidkv", "ada-pyramidkv"):
        scorer = make_policy(name, keep=0.5, pooling="max", kernel=7).scorer
        assert (scorer.pool, scorer.kernel) == ("max", 7)
    assert make_policy("snapkv", keep=0.5, pooling="none").scorer.pool == "none"
    assert make_policy("knorm", keep=0.5, pooling="max", kernel=3).scorer == KNormScorer()  # does not pool
    for bad in ({"pooling": "median"}, {"kernel": 4}, {"kernel": 0}):
        with pytest.raises(ValueError, match="pool"):
            make_policy("snapkv", keep=0.5, **bad)


def test_snapkv_rejects_bad_parameters():
    for kwargs in ({"kernel": 4}, {"pool": "median"}, {"pool_order": "sideways"}):
        with pytest.raises(ValueError):
            SnapKVScorer(**kwargs)


@pytest.mark.parametrize("chunk", [7, 512])
def test_h2o_equals_column_means_of_full_causal_softmax(chunk):
    x = make_input([30, 21], t=30)
    sums = naive_probs(x, 0, 30).sum(dim=2)
    # Each column is divided by the real queries that see its key: 30 - k, or 30 - k for the 21 real ones.
    seen = (30 - torch.arange(30)).double()
    expected = by_group(sums / seen, x.keys.shape[1])
    got = H2OScorer(chunk=chunk)(x)
    torch.testing.assert_close(got.double()[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double()[1, :, 9:], expected[1, :, 9:], atol=1e-5, rtol=1e-5)
    assert bool((got[1, :, :9] == 0).all())  # padding keys: seen by no query


def test_tova_knorm_streamingllm_equal_definitions():
    x = make_input([24, 17], t=24)
    tova = naive_probs(x, 23, 24)[:, :, 0].mean(dim=1, keepdim=True).expand(-1, x.keys.shape[1], -1)
    torch.testing.assert_close(TOVAScorer()(x).double(), tova, atol=1e-5, rtol=1e-5)  # layer-wise
    # KNorm's paper keeps the keys of lowest L2 norm: score = -sqrt(sum of squares).
    b, h, t, _ = x.keys.shape
    norms = torch.zeros(b, h, t, dtype=torch.float64)
    for i, j, k in itertools.product(range(b), range(h), range(t)):
        norms[i, j, k] = -math.sqrt(sum(v * v for v in x.keys[i, j, k].tolist()))
    torch.testing.assert_close(KNormScorer()(x).double(), norms)
    recency = StreamingLLMScorer()(x)
    assert recency.shape == (2, 2, 24)
    assert bool((recency[..., 1:] > recency[..., :-1]).all())


def test_attention_probs_rows_sum_to_one_and_padding_queries_are_zero():
    x = make_input([20, 12], t=20)
    probs = attention_probs(x, 0, 20)  # [b, hkv, g, q, t]
    assert probs.shape == (2, 2, 3, 20, 20)
    rows = probs.sum(dim=-1)
    torch.testing.assert_close(rows[0], torch.ones_like(rows[0]))
    torch.testing.assert_close(rows[1, :, :, 8:], torch.ones_like(rows[1, :, :, 8:]))
    assert bool((rows[1, :, :, :8] == 0).all())
    assert bool((probs[1, ..., :8] == 0).all())  # nobody attends to padding keys
    future = torch.ones(20, 20, dtype=torch.bool).triu(1)
    assert bool((probs[..., future] == 0).all())  # causal


def test_random_scorer_is_deterministic_per_seed():
    x = make_input([16, 16], t=16)
    a, b = RandomScorer(seed=3)(x), RandomScorer(seed=3)(x)
    assert torch.equal(a, b)
    assert a.shape == (2, 2, 16)
    assert not torch.equal(a, RandomScorer(seed=4)(x))
    p1 = make_policy("random", keep=0.5, window=2, seed=5)
    p2 = make_policy("random", keep=0.5, window=2, seed=5)
    assert torch.equal(p1.keep_mask(x, 0, 1), p2.keep_mask(x, 0, 1))


# ----------------------------------------------------------------------- selection
def test_keep_mask_keeps_top_counts_per_head():
    scores = torch.tensor([[[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]]])
    assert torch.equal(ranks_within(scores), torch.tensor([[[3, 0, 1, 2], [0, 1, 2, 3]]]))
    keep = keep_mask(scores, torch.tensor([[2, 3]]))
    assert keep.tolist() == [[[False, True, True, False], [True, True, True, False]]]
    # Ties are broken by position, so the count is always exact.
    tied = keep_mask(torch.zeros(1, 1, 5), torch.tensor([[2]]))
    assert tied.tolist() == [[[True, True, False, False, False]]]


# ----------------------------------------------------------------------- Ada-KV
def skewed_scores(b: int = 2, h: int = 4, t: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(b, h, t, generator=gen)
    scores[:, 0] += 5.0  # head 0 dominates
    scores[:, 2] *= 0.01  # head 2 barely registers
    return scores


def test_adakv_is_nonuniform_keeps_uniform_total_and_safeguard():
    scores = skewed_scores()
    budget = torch.tensor([16, 9])
    alpha = 0.2
    counts = AdaKVAllocator(alpha=alpha)(scores, budget)
    assert counts.shape == (2, 4)
    uniform = UniformAllocator()(scores, budget)
    assert torch.equal(counts.sum(dim=-1), uniform.sum(dim=-1))
    assert torch.equal(counts.sum(dim=-1), 4 * budget)
    floor = torch.floor(budget * alpha).long()
    assert bool((counts >= floor[:, None]).all())
    for i in range(2):
        assert len(set(counts[i].tolist())) > 1, "skewed scores should give a non-uniform split"
        assert counts[i, 0] > budget[i]  # the dominant head takes more than its uniform share
        assert counts[i, 2] == floor[i]  # the weak head is held at its safeguard
        assert counts[i].max() <= scores.shape[-1]


def test_adakv_alpha_one_is_uniform_and_alpha_zero_has_no_safeguard():
    scores = skewed_scores()
    budget = torch.tensor([16, 5])
    assert torch.equal(AdaKVAllocator(alpha=1.0)(scores, budget), UniformAllocator()(scores, budget))
    greedy = AdaKVAllocator(alpha=0.0)(scores, budget)
    assert torch.equal(greedy[:, 0], 4 * budget)  # head 0 wins every slot
    assert torch.equal(greedy.sum(dim=-1), 4 * budget)


def test_adakv_picks_the_global_top_scores():
    scores = skewed_scores(b=1)
    counts = AdaKVAllocator(alpha=0.0, pool_kernel=1)(scores, torch.tensor([20]))
    # The paper's rule with no safeguard: the kept set is exactly the global top-(heads x B).
    threshold = scores.flatten().sort(descending=True).values[4 * 20 - 1]
    assert torch.equal(counts[0], (scores[0] >= threshold).sum(dim=-1))


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_adakv_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        AdaKVAllocator(alpha=alpha)


# ----------------------------------------------------------------------- Pyramid
PYRAMID_CASES = [(64, 30, 32), (40, 30, 32), (37, 7, 16), (101, 5, 32), (33, 9, 32), (1000, 32, 32), (45, 3, 8)]


@pytest.mark.parametrize("budget,num_layers,window", PYRAMID_CASES)
def test_pyramid_mean_is_exact_and_budgets_fall_with_depth(budget, num_layers, window):
    schedule = PyramidSchedule()
    mean = torch.tensor([budget, budget + 1, budget + 13, budget + 7])
    layers = torch.stack([schedule(mean, i, num_layers, window) for i in range(num_layers)], dim=1)
    assert torch.equal(layers.sum(dim=1), mean * num_layers)  # mean over layers exactly the budget
    assert bool((layers[:, :-1] >= layers[:, 1:]).all())  # never rises with depth
    assert bool((layers[:, 0] > layers[:, -1]).all())
    assert bool((layers >= window).all())  # the window is always affordable
    # The ends follow the PyramidKV line: window + extra*(2 - 1/beta) down to window + extra/beta.
    extra = (mean - window).double()
    assert bool(((layers[:, 0] - (window + extra * (2 - 1 / 20))).abs() <= 1).all())
    assert bool(((layers[:, -1] - (window + extra / 20)).abs() <= 1).all())


@pytest.mark.parametrize("budget", [1, 5, 31, 32])
def test_pyramid_budget_within_window_stays_flat(budget):
    schedule = PyramidSchedule()
    b = torch.tensor([budget])
    assert [int(schedule(b, i, 12, 32)) for i in range(12)] == [budget] * 12


def test_single_layer_and_flat_schedule_keep_the_budget():
    b = torch.tensor([50, 7])
    assert torch.equal(PyramidSchedule()(b, 0, 1, 8), b)
    assert all(torch.equal(FlatSchedule()(b, i, 6, 8), b) for i in range(6))


# ----------------------------------------------------------------------- budgets
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"keep": 0.0}, {"keep": 1.5}, {"keep": -0.2}, {"tokens": 0}, {"tokens": -1}, {"keep": 0.5, "tokens": 4}],
)
def test_budget_validation(kwargs):
    with pytest.raises(ValueError):
        Budget(**kwargs)


def test_budget_per_head():
    n_valid = torch.tensor([100, 7, 1])
    assert Budget(keep=0.25).per_head(n_valid).tolist() == [25, 2, 1]
    assert Budget(tokens=10).per_head(n_valid).tolist() == [10, 10, 10]
    assert Budget(keep=1.0).is_full and not Budget(keep=0.5).is_full


def test_policy_rejects_negative_window():
    with pytest.raises(ValueError):
        Policy(name="x", scorer=None, window=-1)


# kvzip scores by a context reconstruction the model runs (hf/kvzip.py): not a direct keep_mask.
DIRECT = [n for n in policy_names() if not needs_reconstruction(make_policy(n))]


# ----------------------------------------------------------------------- presets
def test_every_preset_builds():
    names = policy_names()
    assert len(names) == len(set(names))
    for required in (
        "full",
        "snapkv",
        "h2o",
        "streamingllm",
        "knorm",
        "tova",
        "tova-head",
        "random",
        "pyramidkv",
        "chunkkv",
        "expected-attention",
        "criticalkv",
        "defensivekv",
    ):
        assert required in names
        assert f"ada-{required}" in names or required == "full"
    for name in names:
        policy = make_policy(name, keep=0.25, window=8)
        assert isinstance(policy, Policy)
        assert policy.name == name
        assert policy.compresses == (name != "full")
    assert isinstance(make_policy("ada-snapkv", keep=0.3, alpha=0.4).allocator, AdaKVAllocator)
    assert make_policy("ada-snapkv", keep=0.3, alpha=0.4).allocator.alpha == 0.4
    assert isinstance(make_policy("pyramidkv", keep=0.3).schedule, PyramidSchedule)
    assert make_policy("streamingllm", keep=0.3).sinks == 4


def test_unknown_policy_names_itself():
    with pytest.raises(ValueError, match="snapkvv"):
        make_policy("snapkvv", keep=0.5)


@pytest.mark.parametrize("name", ["full", "snapkv", "ada-h2o"])
def test_presets_validate_budget(name):
    with pytest.raises(ValueError):
        make_policy(name, keep=0.0)
    with pytest.raises(ValueError):
        make_policy(name, keep=1.2)
    with pytest.raises(ValueError):
        make_policy(name, tokens=-1)
    with pytest.raises(ValueError):
        make_policy(name, keep=0.5, tokens=8)


def test_bad_group_reduce():
    with pytest.raises(ValueError, match="group"):
        make_policy("snapkv", keep=0.5, group_reduce="median")


NUM_LAYERS = 4
WINDOW = 8
T = 96
N_VALID = [96, 80]  # the second sequence has 16 slots of left padding


@pytest.fixture(scope="module")
def prefill() -> ScoreInput:
    return make_input(N_VALID, t=T, window=WINDOW, seed=7)


@pytest.mark.parametrize("name", [n for n in DIRECT if not n.startswith(CROSS_PREFIX)])
def test_preset_keep_mask(name, prefill):
    keep = 0.25
    policy = make_policy(name, keep=keep, window=WINDOW, alpha=0.2)
    valid = prefill.valid[:, None, :].expand(2, 2, T)
    masks = torch.stack([policy.keep_mask(prefill, i, NUM_LAYERS) for i in range(NUM_LAYERS)])  # [L, b, h, t]
    assert masks.dtype == torch.bool and masks.shape == (NUM_LAYERS, 2, 2, T)
    assert not bool((masks & ~valid).any()), "padding must never be kept"
    if name == "full":
        assert bool((masks == valid).all())
        return

    budget = torch.tensor([round(n * keep) for n in N_VALID])  # [24, 20]
    per_head = masks.sum(dim=-1)  # [L, b, h]
    # On average over layers and heads, each head keeps exactly keep x its real tokens.
    assert torch.equal(per_head.sum(dim=(0, 2)), budget * NUM_LAYERS * 2)
    if name.endswith("streamingllm"):
        for i, n in enumerate(N_VALID):
            assert bool(masks[:, i, :, T - n : T - n + 4].all()), "attention sinks are kept"
    for layer in range(NUM_LAYERS):
        layer_budget = policy.schedule(budget, layer, NUM_LAYERS, WINDOW)
        for i in range(2):  # the window is kept, up to half of the layer's budget
            newest = min(WINDOW, int(layer_budget[i]) // 2)
            assert bool(masks[layer, i, :, T - newest :].all()), "the observation window is always kept"
        assert torch.equal(per_head[layer].sum(dim=-1), 2 * layer_budget)  # layer total = uniform total
        if name.startswith("ada-"):  # the paper's safeguard: protected + int(alpha x the rest)
            protected = torch.minimum(layer_budget // 2, torch.tensor(WINDOW))
            protected += (layer_budget - protected).clamp_max(4) if name.endswith("streamingllm") else 0
            floor = protected + torch.floor((layer_budget - protected) * 0.2).long()
            assert bool((per_head[layer] >= floor[:, None]).all())
        else:
            assert bool((per_head[layer] == layer_budget[:, None]).all())
    if "pyramidkv" in name:
        layer_totals = per_head.sum(dim=(1, 2))
        assert layer_totals[0] > layer_totals[-1]


@pytest.mark.parametrize("name", ["snapkv", "ada-snapkv", "h2o", "knorm", "tova"])
def test_keep_mask_follows_the_scores(name, prefill):
    """Outside the protected window, the kept tokens are the highest-scoring ones."""
    policy = make_policy(name, keep=0.25, window=WINDOW)
    mask = policy.keep_mask(prefill, 0, 1)
    scores = policy.scorer(prefill).float()
    for b, n in enumerate(N_VALID):
        for h in range(2):
            free = slice(T - n, T - WINDOW)
            kept, dropped = scores[b, h, free][mask[b, h, free]], scores[b, h, free][~mask[b, h, free]]
            assert kept.min() >= dropped.max()


def test_ada_policy_splits_unevenly_on_skewed_heads():
    x = make_input([64], t=64, q_heads=4, kv_heads=4, window=4, seed=3)
    keys = x.keys.clone()
    keys[:, 1] *= 0.01  # head 1 has tiny keys: KNorm scores it highest everywhere
    x = ScoreInput(x.queries, keys, x.values, x.valid, x.scaling, x.window)
    mask = make_policy("ada-knorm", keep=0.25, window=4, alpha=0.2).keep_mask(x, 0, 1)
    counts = mask.sum(dim=-1)[0]
    assert int(counts.sum()) == 4 * 16
    assert int(counts[1]) > 16 and int(counts.min()) >= 4
    uniform = make_policy("knorm", keep=0.25, window=4).keep_mask(x, 0, 1).sum(dim=-1)[0]
    assert uniform.tolist() == [16, 16, 16, 16]


@pytest.mark.parametrize("name", DIRECT)
def test_short_prompts_are_kept_whole(name, prefill):
    policy = make_policy(name, tokens=200, window=WINDOW)
    valid = prefill.valid[:, None, :].expand(2, 2, T)
    for mask in policy.keep_masks(dict.fromkeys(range(NUM_LAYERS), prefill), NUM_LAYERS).values():
        assert torch.equal(mask, valid)


@pytest.mark.parametrize("name", DIRECT)
def test_short_sequence_in_a_batch_is_kept_whole(name):
    n_valid = [96, 30]
    x = make_input(n_valid, t=96, window=WINDOW, seed=11)
    policy = make_policy(name, tokens=40, window=WINDOW)
    valid = x.valid[:, None, :].expand(2, 2, 96)
    kept = 0
    for mask in policy.keep_masks(dict.fromkeys(range(NUM_LAYERS), x), NUM_LAYERS).values():
        assert torch.equal(mask[1], valid[1]), "a 30-token prompt fits a 40-token budget in every layer"
        kept += int(mask[0].sum())
        if name != "full":
            assert int(mask[0].sum()) < 2 * 96
    assert kept == (2 * 96 * NUM_LAYERS if name == "full" else 2 * 40 * NUM_LAYERS)


@pytest.mark.parametrize("keep", [0.6, 0.75, 0.9])
@pytest.mark.parametrize("name", ["pyramidkv", "ada-pyramidkv"])
def test_pyramid_keeps_its_mean_when_the_top_layers_would_exceed_the_prompt(name, keep, prefill):
    """With a large keep ratio the linear pyramid would give the first layers more than
    the prompt holds; the pyramid flattens instead, so the claimed ratio is what is kept."""
    policy = make_policy(name, keep=keep, window=WINDOW)
    masks = torch.stack([policy.keep_mask(prefill, i, NUM_LAYERS) for i in range(NUM_LAYERS)])
    budget = torch.tensor([round(n * keep) for n in N_VALID])
    per_layer = masks.sum(dim=(2, 3))  # [L, b]
    assert torch.equal(per_layer.sum(dim=0), 2 * NUM_LAYERS * budget)
    assert bool((per_layer[:-1] >= per_layer[1:]).all())
    assert bool((per_layer[0] > per_layer[-1]).all())


def test_pyramid_limit_caps_the_top_and_keeps_the_mean():
    schedule = PyramidSchedule()
    budget, limit = torch.tensor([75, 30, 90]), torch.tensor([100, 100, 90])
    layers = torch.stack([schedule(budget, i, 8, 8, limit=limit) for i in range(8)], dim=1)
    assert torch.equal(layers.sum(dim=1), 8 * budget)
    assert bool((layers <= limit[:, None]).all())
    assert bool((layers[:, :-1] >= layers[:, 1:]).all())
    assert layers[0, 0] == 100 and layers[0, -1] < 75  # capped at the prompt, still a pyramid
    assert layers[2].tolist() == [90] * 8  # budget == prompt: nothing to move
    # Without the cap the schedule is unchanged.
    assert torch.equal(layers[1], torch.stack([schedule(budget, i, 8, 8)[1] for i in range(8)]))


def test_tokens_budget_keeps_that_many_per_head(prefill):
    policy = make_policy("snapkv", tokens=17, window=WINDOW)
    assert policy.keep_mask(prefill, 0, NUM_LAYERS).sum(dim=-1).tolist() == [[17, 17], [17, 17]]


def test_keep_ratio_rounds_per_sequence():
    x = make_input([50, 7], t=50, window=2, seed=2)
    counts = make_policy("h2o", keep=0.3, window=2).keep_mask(x, 0, 1).sum(dim=-1)
    assert counts.tolist() == [[15, 15], [2, 2]]
    assert math.isclose(counts[0, 0].item() / 50, 0.3)

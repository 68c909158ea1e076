"""Core engine: selection keys, the statistics update, policies, the Pruner's schedule, the sampler."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gpuprune as gp
from gpuprune.backend import TorchBackend
from gpuprune.keys import composite_key, fmix32, hash32, orderable, split_seed
from gpuprune.plan import shard_indices
from gpuprune.sizes import owned_size

POLICY_NAMES = ["uniform", "epsilon_greedy", "ucb", "infobatch", "static", "full"]
B = TorchBackend("cpu")


def top_k_by_score(score, k, seed):
    return B.top_k(score, score.numel(), k, seed).long()


def random_k(n, k, seed):
    return B.top_k(None, n, k, seed).long()


class Stats(gp.LossStats):
    """LossStats plus the backend's update, for hand-computed cases."""

    def __init__(self, n, decay=0.9):
        super().__init__(n)
        self.decay = decay

    def observe(self, ids, losses, epoch=0):
        B.observe_(self.tensors(), ids, losses, self.decay, epoch)


def feed(pruner: gp.Pruner, plan: gp.Plan, seed: int = 0, batch: int = 64) -> None:
    """Observe a deterministic pseudo-random loss for every planned sample."""
    g = torch.Generator().manual_seed(seed * 1000 + plan.epoch)
    losses = torch.rand(pruner.num_samples, generator=g) * (1 + torch.arange(pruner.num_samples) % 7)
    for i in range(0, len(plan), batch):
        idx = plan.indices[i:i + batch]
        pruner.observe(idx, losses[idx.long()])


# ---------------------------------------------------------------- keys and selection
def test_fmix32_known_values():
    def ref(h):
        h ^= h >> 16; h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13; h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)
    xs = [0, 1, 2, 0xFFFFFFFF, 123456789, 2**31]
    assert fmix32(torch.tensor(xs)).tolist() == [ref(x) for x in xs]
    assert ref(0) == 0


def test_hash32_is_a_bijection_on_a_range():
    h = hash32(torch.arange(1 << 16), seed=12345)
    assert h.unique().numel() == 1 << 16
    assert int(h.min()) >= 0 and int(h.max()) < 2**32


def test_orderable_preserves_float_order_with_nan_lowest_and_signed_zero_equal():
    vals = torch.tensor([float("nan"), float("-inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0,
                         float("inf")])
    o = orderable(vals).tolist()
    assert o[0] == o[1]                    # NaN ranks as -inf
    assert o[4] == o[5]                    # -0 == +0
    assert o[1:5] == sorted(o[1:5]) and o[5:] == sorted(o[5:])
    assert len(set(o[1:5])) == 4 and len(set(o[5:])) == 4
    assert all(-2**31 <= v < 2**31 for v in o)


def test_composite_key_orders_by_score_then_hash():
    score = torch.tensor([1.0, 3.0, 2.0, 3.0])
    key = composite_key(score, seed=7)
    assert key.unique().numel() == 4
    assert int(key[1]) > int(key[2]) > int(key[0]) and int(key[3]) > int(key[2])
    assert top_k_by_score(score, 2, seed=7).sort().values.tolist() == [1, 3]
    assert torch.equal(composite_key(None, 7, 4), hash32(torch.arange(4), 7))


def test_top_k_exact_with_all_ties_and_nan_never_preferred():
    score = torch.full((100,), 0.5)
    score[:10] = float("nan")
    for k in (0, 1, 50, 90, 100):
        sel = top_k_by_score(score, k, seed=3)
        assert sel.numel() == k and sel.unique().numel() == k
        if 0 < k <= 90:
            assert int(sel.min()) >= 10  # no NaN sample while finite ones remain
    assert B.top_k(score, 100, 50, 3).dtype == torch.int32
    with pytest.raises(ValueError, match="k must be in"):
        B.top_k(None, 5, 6, 0)


def test_top_k_cpu_matches_torch_topk_set():
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 5, (5000,), generator=g).float()  # many ties
    key = composite_key(score, seed=99)
    ours = top_k_by_score(score, 1234, 99).sort().values
    ref = torch.topk(key, 1234).indices.sort().values
    assert torch.equal(ours, ref)


def test_tied_scores_spread_over_whole_index_range():
    # all scores tied: a positional tie-break would pick 0..k-1; ours must be uniform over [0, N)
    n, k = 10_000, 1_000
    sel = top_k_by_score(torch.zeros(n), k, seed=2024)
    counts = torch.bincount(sel // 1000, minlength=10).double()  # 10 bins of 1000 ids, expect 100
    chi2 = float(((counts - 100) ** 2 / 100).sum())
    assert chi2 < 27.9  # 99.9% quantile of chi2 with 9 dof
    other = top_k_by_score(torch.zeros(n), k, seed=2025)
    assert len(set(sel.tolist()) & set(other.tolist())) < 200  # ~100 expected by chance


def test_random_k_is_uniform_and_seed_dependent():
    hits = torch.zeros(200)
    for s in range(400):
        hits[random_k(200, 50, seed=s)] += 1
    # each id picked with probability 1/4: mean 100, binomial sd ~8.7
    assert abs(float(hits.mean()) - 100) < 1e-9
    assert float(hits.min()) > 60 and float(hits.max()) < 140
    # a uniform draw is the top-k of equal scores: the same set as score=None
    assert torch.equal(random_k(200, 50, 9).sort().values,
                       top_k_by_score(torch.zeros(200), 50, 9).sort().values)


def test_shuffle_order_depends_on_the_set_only():
    ids = torch.tensor([5, 1, 9, 3, 7], dtype=torch.int32)
    a = B.shuffle(ids, 42)
    b = B.shuffle(ids.flip(0), 42)
    assert torch.equal(a, b) and sorted(a.tolist()) == [1, 3, 5, 7, 9]
    assert not torch.equal(B.shuffle(torch.arange(50), 1), B.shuffle(torch.arange(50), 2))


def test_cpu_numpy_fast_paths_equal_the_int64_torch_formulas():
    idx = torch.cat([torch.arange(5000), torch.tensor([2**31, 2**32 - 1])])
    for seed in (0, 123, 2**64 - 1, 0xDEADBEEFCAFEBABE):
        lo, hi = split_seed(seed)
        assert torch.equal(hash32(idx, seed), fmix32(fmix32(idx ^ lo) ^ hi))
    x = torch.randn(5000) * 1e3
    x[::7], x[::11], x[::13], x[::17] = float("nan"), -0.0, float("inf"), float("-inf")
    x[::23], x[::29] = 1e-45, -1e-45
    s = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x) + 0.0
    b = s.view(torch.int32).long()
    assert torch.equal(orderable(x), torch.where(b >= 0, b, b ^ 0x7FFFFFFF))


# ---------------------------------------------------------------- the statistics update
def test_update_hand_computed_single_updates():
    bank = Stats(3, decay=0.5)
    bank.observe(torch.tensor([0]), torch.tensor([2.0]))          # first visit: mean = x, var = 0
    assert bank.mean.tolist() == [2.0, 0.0, 0.0] and bank.var.tolist() == [0.0, 0.0, 0.0]
    bank.observe(torch.tensor([0]), torch.tensor([4.0]))          # d = 2, a = .5
    # mean = 2 + .5 * 2 = 3 ; var = .5 * (0 + .5 * 4) = 1
    assert bank.mean[0].item() == 3.0 and bank.var[0].item() == 1.0
    assert bank.seen.tolist() == [True, False, False]
    assert bank.last_epoch.tolist() == [0, -1, -1]
    bank.observe(torch.tensor([1]), torch.tensor([1.0]), epoch=4)
    assert bank.last_epoch.tolist() == [0, 4, -1]


def test_update_duplicates_merge_exactly_not_last_writer():
    bank = Stats(2, decay=0.5)
    bank.observe(torch.tensor([1]), torch.tensor([1.0]))
    bank.observe(torch.tensor([1, 0, 1]), torch.tensor([2.0, 5.0, 4.0]))
    # sample 1: old (mean 1, var 0); group {2, 4}: m = 3, w = 1, a = 1 - .5**2 = .75
    # mean = 1 + .75 * 2 = 2.5; var = .25 * 0 + .75 * 1 + .75 * .25 * 4 = 1.5
    assert bank.mean.tolist() == [5.0, 2.5]
    assert bank.var.tolist() == [0.0, 1.5]


def test_update_group_of_one_equals_finch_update_and_order_free():
    a = Stats(1, decay=0.8)
    for x in [1.0, 3.0, 2.0, 7.0]:
        a.observe(torch.tensor([0]), torch.tensor([x]))
    mu, var, alpha = 1.0, 0.0, 0.2
    for x in [3.0, 2.0, 7.0]:
        d = x - mu
        mu += alpha * d
        var = (1 - alpha) * (var + alpha * d * d)
    assert a.mean.item() == pytest.approx(mu, rel=1e-6) and a.var.item() == pytest.approx(var, rel=1e-6)
    b1, b2 = Stats(1), Stats(1)
    b1.observe(torch.tensor([0, 0, 0]), torch.tensor([1.0, 2.0, 6.0]))
    b2.observe(torch.tensor([0, 0, 0]), torch.tensor([6.0, 1.0, 2.0]))
    assert torch.equal(b1.mean, b2.mean) and torch.equal(b1.var, b2.var)


def test_update_skips_and_counts_nonfinite():
    bank = Stats(3, decay=0.5)
    bank.observe(torch.tensor([0, 1, 2, 2]),
                 torch.tensor([float("nan"), float("inf"), 1.0, float("-inf")]))
    assert bank.seen.tolist() == [False, False, True]
    assert bank.mean.tolist() == [0.0, 0.0, 1.0]
    assert torch.isfinite(bank.var).all()
    assert int(bank.nonfinite) == 3
    assert bank.last_epoch.tolist() == [-1, -1, 0]


def test_float64_losses_beyond_float32_saturate_and_are_recorded():
    bank = Stats(3, decay=0.5)
    bank.observe(torch.tensor([0, 1, 2]), torch.tensor([1e300, -1e300, float("nan")],
                                                        dtype=torch.float64))
    f32max = torch.finfo(torch.float32).max
    assert bank.mean.tolist() == [f32max, -f32max, 0.0]
    assert bank.seen.tolist() == [True, True, False]
    assert int(bank.nonfinite) == 1


def test_exact_segment_sums_equal_the_sequential_ones():
    # the distributed merge sums duplicates one rank of occurrence at a time (deterministic on
    # CUDA); it must give the bits of the sequential per-id sums
    from gpuprune.update import _segment_sums
    seg = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2])
    vals = torch.tensor([0.1, 1e16, -1e16, 3.0, 1e-8, 1.0, -1.0, 7.0], dtype=torch.float64)
    expected = [((0.1 + 1e16) - 1e16)] * 3 + [3.0] + [((1e-8 + 1.0) - 1.0) + 7.0] * 4
    assert _segment_sums(seg, [vals], exact=False)[0].tolist() == expected
    first = torch.ones(8, dtype=torch.bool)
    first[1:] = seg[1:] != seg[:-1]
    pos = torch.arange(8)
    occurrence = pos - torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
    out = torch.zeros(8, dtype=torch.float64)
    for r in range(int(occurrence.max()) + 1):
        out.index_add_(0, seg, torch.where(occurrence == r, vals, torch.zeros_like(vals)))
    assert out[seg].tolist() == expected


# ---------------------------------------------------------------- policies through the Pruner
def make(policy: str, n: int = 500, keep: float = 0.3, **kw) -> gp.Pruner:
    return gp.Pruner(n, keep=keep, policy=policy, num_epochs=kw.pop("num_epochs", 8), seed=11, **kw)


def infobatch_expected_count(stats: gp.LossStats, ratio: float) -> int:
    seen = stats.seen
    s = stats.mean.double()
    mean = s[seen].sum() / max(int(seen.sum()), 1)
    n_below = int((seen & (s < mean)).sum())
    return stats.num_samples - n_below + math.floor((1 - ratio) * n_below)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_plans_are_unique_in_range_and_exactly_k(policy):
    p = make(policy)
    for epoch in range(6):
        expected = None
        if policy == "infobatch" and not p.is_full_epoch(epoch):
            expected = infobatch_expected_count(p.stats, p.policy.ratio)
        plan = p.plan(epoch)
        idx = plan.indices
        assert idx.dtype == torch.int32 and idx.dim() == 1
        assert idx.unique().numel() == idx.numel()
        assert int(idx.min()) >= 0 and int(idx.max()) < 500
        if policy == "full":
            assert len(plan) == 500 and plan.full
        elif policy == "infobatch":
            assert len(plan) == expected
        else:
            assert len(plan) == p.k == 150
        feed(p, plan)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_same_seed_and_epoch_give_same_plan_and_epochs_differ(policy):
    a, b = make(policy), make(policy)
    plans = []
    for epoch in range(4):
        pa, pb = a.plan(epoch), b.plan(epoch)
        assert torch.equal(pa.indices, pb.indices)
        plans.append(pa.indices.clone())
        feed(a, pa)
        feed(b, pb)
    assert not torch.equal(plans[1], plans[2])   # at least the order changes every epoch
    c = gp.Pruner(500, keep=0.3, policy=policy, num_epochs=8, seed=12)
    assert not torch.equal(c.plan(0).indices, plans[0])


def test_uniform_subsets_change_between_epochs():
    p = make("uniform")
    s0 = set(p.plan(0).indices.tolist())
    s1 = set(p.plan(1).indices.tolist())
    assert s0 != s1 and len(s0 & s1) < 100  # ~45 shared expected for 150 of 500


def test_static_subset_is_fixed_and_follows_scores():
    p = make("static")
    s0 = set(p.plan(0).indices.tolist())
    feed(p, p.plan(0))
    assert set(p.plan(1).indices.tolist()) == s0
    scores = torch.arange(500, dtype=torch.float32)
    q = gp.Pruner(500, keep=0.3, policy=gp.Static(scores), seed=1)
    assert sorted(q.plan(0).indices.tolist()) == list(range(350, 500))
    with pytest.raises(ValueError, match="one score per sample: got 500 scores for num_samples=400"):
        gp.Pruner(400, policy=gp.Static(scores))


def test_static_scores_are_hashed_once_at_construction(monkeypatch):
    """config() (read by every plan, checkpoint and cross-rank check) reports the scores by a
    digest computed once, not by rehashing all N scores on each call."""
    import hashlib
    from types import SimpleNamespace

    from gpuprune.policies import static
    scores = torch.arange(500, dtype=torch.float32)
    digest = hashlib.sha256(scores.numpy().tobytes()).hexdigest()[:16]
    policy = gp.Static(scores)
    assert policy.config() == {"name": "static", "scores": f"sha256:{digest}:500"}
    assert gp.Static().config() == {"name": "static", "scores": None}

    def no_hash(*args):
        raise AssertionError("settings() rehashed the scores")
    monkeypatch.setattr(static, "hashlib", SimpleNamespace(sha256=no_hash))   # this module's only
    p = gp.Pruner(500, keep=0.3, policy=policy, seed=1)
    p.plan(0)
    assert p.state_dict()["config"]["policy"]["scores"] == f"sha256:{digest}:500"


def test_ucb_prefers_unseen_then_high_upper_bound():
    p = gp.Pruner(6, keep=0.5, policy=gp.UCB(c=1.0), seed=0)
    p.plan(0)
    # samples 0..3 seen with losses; 4, 5 unseen -> chosen first
    p.observe(torch.tensor([0, 1, 2, 3]), torch.tensor([5.0, 1.0, 0.5, 0.1]))
    assert set(p.plan(1).indices.tolist()) == {4, 5, 0}
    p.observe(torch.tensor([4, 5, 0]), torch.tensor([0.2, 0.3, 0.4]))
    score = p.stats.mean + p.stats.var.sqrt()
    expected = set(torch.topk(score, 3).indices.tolist())
    assert set(p.plan(2).indices.tolist()) == expected


def test_ucb_var_option_and_c_zero_is_greedy_on_mean():
    p = gp.Pruner(4, keep=0.5, policy=gp.UCB(c=0.0), seed=0)
    p.plan(0)
    p.observe(torch.arange(4), torch.tensor([0.1, 0.9, 0.5, 0.7]))
    assert set(p.plan(1).indices.tolist()) == {1, 3}
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        gp.UCB(uncertainty="range")


def test_epsilon_greedy_exploit_and_explore_split():
    n = 1000
    p = gp.Pruner(n, keep=0.2, policy=gp.EpsilonGreedy(epsilon=0.25), seed=5)
    p.plan(0)
    for i in range(0, n, 100):
        idx = torch.arange(i, i + 100)
        p.observe(idx, idx.float())          # loss = index: the top ids are the best exploits
    sel = set(p.plan(1).indices.tolist())
    k, m = 200, math.floor(0.25 * 200)
    top = set(range(n - (k - m), n))
    assert top <= sel                          # all k - m exploits
    explore = sel - top
    assert len(explore) == m and max(explore) < n - (k - m)
    assert min(explore) < 400                  # spread over the rest, not adjacent to the top


def test_infobatch_weights_counts_and_annealing():
    n = 1000
    p = gp.Pruner(n, prune_ratio=0.5, policy=gp.InfoBatch(delta=0.75), num_epochs=8, seed=3)
    assert p.schedule.final_full_epochs == 2  # epochs >= 0.75 * 8 = 6 train on full data
    plan0 = p.plan(0)                        # nothing seen: all kept, every weight 1
    assert len(plan0) == n and bool((plan0.weights == 1).all())
    p.observe(torch.arange(n), torch.arange(n, dtype=torch.float32))  # below the mean: ids < 499.5
    plan1 = p.plan(1)
    assert len(plan1) == 500 + 250
    w = dict(zip(plan1.indices.tolist(), plan1.weights.tolist()))
    assert all(w[i] == 2.0 for i in w if i < 500) and all(w[i] == 1.0 for i in w if i >= 500)
    assert sum(1 for i in w if i < 500) == 250
    # the returned loss is the weighted mean
    idx = torch.tensor([plan1.indices[0].item(), 999])
    loss = torch.tensor([1.0, 1.0], requires_grad=True)
    out = p.observe(idx, loss)
    assert out.item() == pytest.approx((w[idx[0].item()] * 1.0 + 1.0) / 2)
    out.backward()
    assert loss.grad.tolist() == pytest.approx([w[idx[0].item()] / 2, 0.5])
    for epoch in range(2, 8):
        plan = p.plan(epoch)
        if epoch >= 6:
            assert plan.full and len(plan) == n and plan.weights is None
        feed(p, plan)


def test_infobatch_needs_num_epochs():
    with pytest.raises(ValueError, match="needs num_epochs"):
        gp.Pruner(10, policy="infobatch")


def test_warmup_and_final_full_epochs_and_selection_interval():
    p = gp.Pruner(200, keep=0.25, policy="uniform", num_epochs=10, warmup_epochs=2,
                  final_full_epochs=3, selection_interval=2, seed=0)
    sizes, sets = [], []
    for epoch in range(10):
        plan = p.plan(epoch)
        sizes.append(len(plan))
        sets.append(frozenset(plan.indices.tolist()))
        feed(p, plan)
    assert sizes == [200, 200, 50, 50, 50, 50, 50, 200, 200, 200]
    assert sets[2] == sets[3] and sets[4] == sets[5]     # reused between selections
    assert sets[3] != sets[4]
    assert p.rounds == 5
    assert [r["reselected"] for r in p.history] == [False, False, True, False, True, False, True,
                                                    False, False, False]
    stats = p.selection_stats()
    assert stats["rounds"] == 5
    assert stats["always"] + stats["never"] + stats["sometimes"] == pytest.approx(1.0)
    assert float(stats["frequency"].sum()) == pytest.approx(50 * 5 / 5)
    with pytest.raises(ValueError, match=r"epoch must be <= 9 \(the schedule has num_epochs=10\)"):
        p.plan(10)


def test_schedule_steps_match_what_the_sampler_yields():
    s = gp.Schedule(num_epochs=6, warmup_epochs=1, final_full_epochs=1)
    for world, drop in ((1, False), (2, False), (3, True)):
        p = gp.Pruner(103, keep=0.4, policy="uniform", num_epochs=6, warmup_epochs=1,
                      final_full_epochs=1, seed=0)
        assert p.schedule == s
        samplers = [gp.PrunedSampler(p, num_replicas=world, rank=r, drop_last=drop)
                    for r in range(world)]
        steps = 0
        for epoch in range(6):
            for smp in samplers:
                smp.set_epoch(epoch)
            loader = DataLoader(range(103), batch_size=8, sampler=samplers[0], drop_last=drop)
            got = sum(1 for _ in loader)
            assert got == s.steps(epoch, 103, p.k, 8, world_size=world, drop_last=drop)
            steps += got
        assert steps == s.total_steps(103, p.k, 8, world_size=world, drop_last=drop)
    # 6 epochs: 2 full (103 samples -> 13 batches), 4 pruned (41 -> 6 batches)
    assert s.total_steps(103, 41, 8) == 2 * 13 + 4 * 6
    with pytest.raises(ValueError, match="needs a schedule with num_epochs"):
        gp.Schedule().total_steps(10, 5, 2)
    with pytest.raises(ValueError, match="final_full_epochs=2 needs num_epochs"):
        gp.Schedule(final_full_epochs=2)


def test_total_steps_is_one_answer_for_the_pruner_and_the_dali_iterator():
    """Pruner.total_steps and PrunedDALIIterator.total_steps give the same count for every shard
    count and drop policy, the Schedule's formula; for InfoBatch both raise unless upper_bound=True,
    and then both give the bound that counts every pruned epoch full."""
    pytest.importorskip("nvidia.dali")
    import numpy as np

    from gpuprune.dali import ArraySource, LastBatchPolicy, build_iterator
    n, bs = 103, 8
    x, y = np.zeros((n, 2, 2, 1), np.uint8), np.arange(n, dtype=np.int64)
    hand = {("uniform", 1, False): 13 + 5 * 6,        # 1 warm-up epoch of 103, 5 pruned of k=41
            ("infobatch", 1, False): 6 * 13}          # the bound: every epoch counted with 103
    for policy in ("uniform", "infobatch"):
        for world, drop in ((1, False), (2, False), (3, True)):
            p = gp.Pruner(n, keep=0.4, policy=policy, num_epochs=6, warmup_epochs=1, seed=0)
            it = build_iterator(p, ArraySource(x, y), batch_size=bs, shard_id=world - 1,
                                num_shards=world,
                                last_batch_policy=LastBatchPolicy.DROP if drop else
                                LastBatchPolicy.PARTIAL)
            k = p.k if p.policy.exact_k else n
            want = p.schedule.total_steps(n, k, bs, world_size=world, drop_last=drop)
            assert want == hand.get((policy, world, drop), want)
            bound = p.total_steps(bs, world_size=world, drop_last=drop, upper_bound=True)
            assert bound == it.total_steps(upper_bound=True) == want, (policy, world, drop)
            if p.policy.exact_k:
                assert p.total_steps(bs, world_size=world, drop_last=drop) == it.total_steps()
                continue
            for call in (lambda: p.total_steps(bs, world_size=world, drop_last=drop),
                         it.total_steps):
                with pytest.raises(ValueError, match="not known in advance; pass upper_bound=True"):
                    call()
    # world_size defaults to the Pruner's (1 without a process group)
    p = gp.Pruner(n, keep=0.4, policy="uniform", num_epochs=6, warmup_epochs=1)
    assert p.total_steps(bs) == p.total_steps(bs, world_size=1) == 43
    assert p.total_steps(bs, world_size=2) == 7 + 5 * 3

def test_plan_is_cached_and_cannot_go_back():
    p = make("ucb")
    assert p.plan(3) is p.plan(3)
    with pytest.raises(ValueError, match="must not go back"):
        p.plan(2)


def test_overlap_history_is_the_jaccard_index_of_consecutive_plans():
    p = gp.Pruner(100, keep=0.3, policy="uniform", num_epochs=6, warmup_epochs=1,
                  final_full_epochs=1, seed=4)
    sets = []
    for epoch in range(6):
        sets.append(set(p.plan(epoch).indices.tolist()))
    hist = p.history
    assert hist[0]["overlap"] is None
    for e in range(1, 6):
        a, b = sets[e - 1], sets[e]
        assert hist[e]["overlap"] == pytest.approx(len(a & b) / len(a | b))
    assert hist[1]["overlap"] == pytest.approx(0.3)       # full -> pruned: 30 of 100
    assert [r["size"] for r in hist] == [100, 30, 30, 30, 30, 100]
    # float64 Jaccard of whole counts: exactly Python's division, read as Python floats
    for e in range(1, 6):
        a, b = sets[e - 1], sets[e]
        assert type(hist[e]["overlap"]) is float and hist[e]["overlap"] == len(a & b) / len(a | b)
    # a restored history (floats) continued by new plans (device scalars) reads the same
    q = gp.Pruner(100, keep=0.3, policy="uniform", num_epochs=6, warmup_epochs=1,
                  final_full_epochs=1, seed=4)
    r = gp.Pruner(100, keep=0.3, policy="uniform", num_epochs=6, warmup_epochs=1,
                  final_full_epochs=1, seed=4)
    for epoch in range(3):
        q.plan(epoch)
    r.load_state_dict(q.state_dict())
    for epoch in range(3, 6):
        r.plan(epoch)
    assert r.history == hist


@pytest.mark.parametrize("policy", ["ucb", "epsilon_greedy", "uniform", "infobatch", "static"])
def test_resume_gives_bit_identical_future_plans(policy, tmp_path):
    ref = make(policy, warmup_epochs=1, selection_interval=2)
    for epoch in range(3):
        feed(ref, ref.plan(epoch))
    path = tmp_path / "ckpt.pt"
    gp.save_checkpoint(ref.state_dict(), path)
    resumed = make(policy, warmup_epochs=1, selection_interval=2)
    resumed.load_state_dict(gp.load_checkpoint(path))
    for epoch in range(3, 8):
        a, b = ref.plan(epoch), resumed.plan(epoch)
        assert torch.equal(a.indices, b.indices)
        assert (a.weights is None) == (b.weights is None)
        if a.weights is not None:
            assert torch.equal(a.weights, b.weights)
        feed(ref, a)
        feed(resumed, b)
    for key, value in ref.state_dict()["stats"].items():
        assert torch.equal(value, resumed.state_dict()["stats"][key]), key
    assert ref.history == resumed.history


def test_load_state_dict_rejects_other_config():
    a = make("ucb")
    b = gp.Pruner(500, keep=0.4, policy="ucb", num_epochs=8, seed=11)
    with pytest.raises(ValueError, match="checkpoint was made with k=150, this Pruner has k=200"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(keep=0.0), ValueError, "keep must be > 0.0"),
    (dict(keep=1.5), ValueError, "keep must be <= 1.0"),
    (dict(keep=-0.1), ValueError, "keep must be > 0.0"),
    (dict(keep="half"), TypeError, "keep must be a real number"),
    (dict(prune_ratio=1.0), ValueError, "prune_ratio must be < 1.0"),
    (dict(keep=0.5, prune_ratio=0.5), ValueError, "not both"),
    (dict(policy="greedy"), ValueError, "policy must be one of"),
    (dict(policy=3), TypeError, "policy must be a name or a Policy"),
    (dict(policy=gp.UCB), TypeError, "write policy=UCB()"),
    (dict(epsilon=0.5, policy="epsilon_greedy"), TypeError,
     r"unexpected keyword argument 'epsilon'; .*policy=gpuprune.EpsilonGreedy\(epsilon=...\)"),
    (dict(c=-1.0), TypeError, r"policy=gpuprune.UCB\(c=...\)"),
    (dict(warmup_epochs=-1), ValueError, "warmup_epochs must be >= 0"),
    (dict(selection_interval=0), ValueError, "selection_interval must be >= 1"),
    (dict(final_full_epochs=2), ValueError, "needs num_epochs"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(decay=1.0), ValueError, "decay must be < 1.0"),
    (dict(device="meta"), ValueError, "device must be a cpu or cuda device"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_pruner_constructor_errors(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        gp.Pruner(100, **kwargs)


@pytest.mark.parametrize("make_policy, exc, msg", [
    (lambda: gp.EpsilonGreedy(epsilon=1.5), ValueError, "epsilon must be <= 1.0"),
    (lambda: gp.UCB(c=-3.0), ValueError, "c must be >= 0.0"),
    (lambda: gp.UCB(drift=-1.0), ValueError, "drift must be >= 0.0"),
    (lambda: gp.InfoBatch(delta=5.0), ValueError, "delta must be <= 1.0"),
    (lambda: gp.InfoBatch(ratio=1.0), ValueError, "ratio must be < 1.0"),
    (lambda: gp.Static(torch.arange(3)), TypeError, "scores must be a floating torch.Tensor"),
])
def test_policy_settings_are_checked_by_their_policy(make_policy, exc, msg):
    with pytest.raises(exc, match=msg):
        make_policy()


def test_pruner_zero_samples_rejected():
    with pytest.raises(ValueError, match="num_samples must be >= 1, got num_samples=0"):
        gp.Pruner(0)


def test_cpu_device_specs_are_normalised():
    p = gp.Pruner(10, policy="ucb", device="cpu:0")
    assert p.device == torch.device("cpu")
    plan = p.plan(0)
    p.observe(plan.indices, torch.ones(len(plan)))
    assert p.plan(1).indices.device == torch.device("cpu")


def test_observe_returns_plain_mean_without_weights():
    p = make("ucb")
    p.plan(0)
    loss = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    out = p.observe(torch.tensor([0, 1, 2]), loss)
    assert out.item() == 3.0
    assert p.observe(torch.empty(0, dtype=torch.long), torch.empty(0)).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy", ["ucb", "infobatch"])
def test_observe_of_half_precision_losses_does_not_overflow(dtype, policy):
    p = gp.Pruner(4096, keep=0.5, policy=policy, num_epochs=4, seed=0)
    p.plan(0)
    p.observe(torch.arange(4096), torch.cat([torch.full((2048,), 0.5), torch.full((2048,), 5.0)]))
    plan = p.plan(1)
    ids = plan.indices
    loss = torch.full((len(ids),), 20.0, dtype=dtype, requires_grad=True)
    out = p.observe(ids, loss)
    assert out.dtype == dtype and torch.isfinite(out)
    w = (plan.weights if plan.weights is not None else torch.ones(len(ids)))
    assert out.float().item() == pytest.approx(float((20.0 * w).mean()), rel=1e-2)


# ---------------------------------------------------------------- sharding, sampler, dataset
def test_shard_indices_equal_sizes_and_cover():
    idx = torch.arange(10)
    shards = [shard_indices(idx, r, 3) for r in range(3)]
    assert [s.numel() for s in shards] == [4, 4, 4]
    allv = torch.cat(shards).tolist()
    assert set(allv) == set(range(10)) and len(allv) - 10 == 2   # 2 padded duplicates
    dropped = [shard_indices(idx, r, 3, drop_last=True) for r in range(3)]
    assert [s.numel() for s in dropped] == [3, 3, 3]
    assert sorted(torch.cat(dropped).tolist()) == list(range(9))
    assert shard_indices(torch.arange(0), 0, 2).numel() == 0
    with pytest.raises(ValueError, match="rank must be <= 2"):
        shard_indices(idx, 3, 3)
    # owned_size: the leading entries of a shard that are not wrap-around padding (10 over 3 ranks:
    # rank 0 owns positions 0, 3, 6, 9; ranks 1 and 2 own 3 and pad one)
    assert [owned_size(10, r, 3) for r in range(3)] == [4, 3, 3]
    assert [shards[r][owned_size(10, r, 3):].tolist() for r in range(3)] == [[], [0], [1]]
    assert torch.cat([shards[r][:owned_size(10, r, 3)] for r in range(3)]).sort().values.tolist() \
        == list(range(10))


def test_sampler_len_matches_plan_and_yields_it():
    p = make("ucb")
    s = p.sampler()
    for epoch in range(3):
        s.set_epoch(epoch)
        plan = p.plan(epoch)
        assert len(s) == len(plan)
        assert list(s) == plan.indices.tolist()
        feed(p, plan)
    shards = [gp.PrunedSampler(p, num_replicas=2, rank=r) for r in range(2)]
    for sh in shards:
        sh.set_epoch(3)
    got = list(shards[0]) + list(shards[1])
    assert sorted(got) == sorted(p.plan(3).indices.tolist())


def test_indexed_dataset_and_three_line_loop_on_digits():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    ds = TensorDataset(torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y))
    assert gp.IndexedDataset(ds)[5][2] == 5
    assert gp.IndexedDataset([10, 20])[1] == (20, 1)
    with pytest.raises(TypeError, match="map-style dataset"):
        gp.IndexedDataset(5)
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.1, 0.1, generator=g)
    # lr 0.1: at 0.5 the final accuracy swung from 0.42 to 0.95 with the plan order alone
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = gp.Pruner(len(ds), keep=0.5, policy="ucb", seed=0)
    loader = DataLoader(gp.IndexedDataset(ds), batch_size=64, sampler=pruner.sampler())
    seen = 0
    for epoch in range(6):
        loader.sampler.set_epoch(epoch)
        for xb, yb, idx in loader:
            loss = pruner.observe(idx, torch.nn.functional.cross_entropy(model(xb), yb,
                                                                         reduction="none"))
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(idx)
    assert seen == 6 * gp.budget(0.5, len(ds)) == 6 * 899
    acc = (model(ds.tensors[0]).argmax(1) == ds.tensors[1]).float().mean().item()
    assert acc > 0.8
    assert int(pruner.stats.seen.sum()) == len(ds)   # every sample visited (unseen = +inf)


# ---------------------------------------------------------------- static scoring helpers
def test_el2n_scores_hand_computed():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x            # logits are the inputs
    x = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    y = torch.tensor([0, 1])
    loader = [(x, y, torch.tensor([1, 0]))]
    s = gp.el2n_scores(Fixed(), loader, 2)
    # sample 1: p = (.5, .5), y = 0 -> ||(-.5, .5)|| = sqrt(.5); sample 0: p = (.75, .25), y = 1
    assert s[1].item() == pytest.approx(math.sqrt(0.5))
    assert s[0].item() == pytest.approx(math.sqrt(0.75**2 + 0.75**2))
    with pytest.raises(ValueError, match="1 of 3 samples"):
        gp.el2n_scores(Fixed(), loader, 3)


def test_forgetting_tracker_counts_transitions():
    t = gp.ForgettingTracker(3)
    seq = [[True, False, False], [False, True, False], [True, False, False], [False, True, False]]
    for row in seq:
        t.update(torch.arange(3), torch.tensor(row))
    # sample 0: T F T F -> 2 forgets; sample 1: F T F T -> 1; sample 2 never learned -> inf
    assert t.counts().tolist() == [2.0, 1.0, float("inf")]
    with pytest.raises(TypeError, match="correct must be a bool"):
        t.update(torch.arange(3), torch.ones(3))


def test_ucb_drift_hand_computed_score():
    from gpuprune.policies.ucb import ucb_score
    mean = torch.tensor([1.0, 1.0, 1.0, 2.0])
    var = torch.tensor([0.0, 0.5, 1.0, 9.0])
    seen = torch.tensor([True, True, True, False])
    age = torch.tensor([0, 2, 1, 5])
    # vbar over seen = 0.5; var_eff = var + 1 * 0.5 * age = [0, 1.5, 1.5, -]
    got = ucb_score(mean, var, seen, c=2.0, age=age, drift=1.0)
    assert got[:3].tolist() == pytest.approx([1.0, 1.0 + 2 * 1.5 ** 0.5, 1.0 + 2 * 1.5 ** 0.5])
    assert got[3].item() == float("inf")
    assert torch.equal(ucb_score(mean, var, seen, c=2.0, age=age, drift=0.0),
                       ucb_score(mean, var, seen, c=2.0))


def test_ucb_drift_keeps_scores_finite_and_ordered_under_extreme_losses():
    from gpuprune.policies.ucb import ucb_score
    p = gp.Pruner(6, keep=0.5, policy=gp.UCB(drift=1.0), seed=0)
    p.plan(0)
    p.observe(torch.tensor([0, 0, 1, 2, 3, 4, 5]),
              torch.tensor([1e38, -1e38, 1.0, 2.0, 3.0, 4.0, 5.0]))
    age = 1 - p.stats.last_epoch
    score = ucb_score(p.stats.mean, p.stats.var, p.stats.seen, 1.0, "std", age, 1.0)
    assert torch.isfinite(score).all()
    assert score[1:].tolist() == sorted(score[1:].tolist())     # ordered like the means
    assert len(p.plan(1)) == 3


def test_ucb_without_drift_settles_and_with_drift_rotates():
    def rounds_in_use(drift):
        p = gp.Pruner(400, keep=0.25, policy=gp.UCB(drift=drift), seed=0)
        for epoch in range(16):
            feed(p, p.plan(epoch))
        return int((p.stats.selected >= 3).sum())
    settled, rotating = rounds_in_use(0.0), rounds_in_use(1.0)
    assert settled <= 110          # about the same 100 samples every epoch
    assert rotating >= settled + 25


# ---------------------------------------------------------------- plan() is all or nothing; len() reads
@pytest.mark.parametrize("error", [RuntimeError("disk gone"), KeyboardInterrupt()])
@pytest.mark.parametrize("policy", ["ucb", "infobatch"])
def test_an_interrupted_plan_changes_nothing_and_a_retry_counts_once(policy, error, monkeypatch):
    def run(interrupt: bool) -> gp.Pruner:
        p = make(policy)
        for epoch in range(2):
            feed(p, p.plan(epoch))
        if interrupt:
            before = p.state_dict()
            real = type(p.backend).plan
            calls = {"n": 0}

            def plan(self, *args, **kwargs):       # fails once, after the policy has selected
                calls["n"] += 1
                if calls["n"] == 1:
                    raise error
                return real(self, *args, **kwargs)
            monkeypatch.setattr(type(p.backend), "plan", plan)
            with pytest.raises(type(error)):
                p.plan(2)
            after = p.state_dict()
            assert after["checksum"] == before["checksum"]
            assert p.current_plan.epoch == 1
        p.plan(2)
        monkeypatch.undo()
        return p
    retried, clean = run(True), run(False)
    assert retried.rounds == clean.rounds == 3
    assert retried.state_dict()["checksum"] == clean.state_dict()["checksum"]


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_len_only_reads(policy):
    p = make(policy)
    s = p.sampler()
    s.set_epoch(0)
    feed(p, p.plan(0))
    before = p.state_dict()
    s.epoch = 1                                  # a loop's bookkeeping before set_epoch(1)
    if policy == "infobatch":
        with pytest.raises(RuntimeError, match="known once it is planned"):
            len(s)
    else:
        assert len(s) == (500 if policy == "full" else 150)
    assert p.state_dict()["checksum"] == before["checksum"]
    assert p.current_plan.epoch == 0 and len(p.history) == 1
    s.set_epoch(1)
    assert len(s) == len(p.plan(1)) and p.rounds == (0 if policy == "full" else 2)


def test_int_pow_is_binary_exponentiation_with_exact_powers_of_two():
    from gpuprune.update import int_pow
    n = torch.arange(0, 200, dtype=torch.float64)
    assert int_pow(0.5, n, 199).tolist() == [2.0 ** -i for i in range(200)]
    def ref(base, e):                     # squarings from the lowest bit, as the kernel does
        r = 1.0
        while e:
            if e & 1:
                r *= base
            base *= base
            e >>= 1
        return r
    for decay in (0.9, 0.99, 0.3, 0.0):
        assert int_pow(decay, n, 199).tolist() == [ref(decay, i) for i in range(200)]


@pytest.mark.parametrize("policy, interval, determined", [
    ("uniform", 1, [True] * 6), ("static", 1, [True] * 6), ("full", 1, [True] * 6),
    ("ucb", 1, [True, False, False, False, True, True]),             # warm-up and final epochs
    ("infobatch", 2, [True, False, True, False, True, True]),        # reused selections
])
def test_peek_gives_the_next_plan_when_no_loss_can_change_it(policy, interval, determined):
    p = gp.Pruner(300, keep=0.3, policy=policy, num_epochs=6, warmup_epochs=1,
                  final_full_epochs=2, selection_interval=interval, seed=5)
    ref = gp.Pruner(300, keep=0.3, policy=policy, num_epochs=6, warmup_epochs=1,
                    final_full_epochs=2, selection_interval=interval, seed=5)
    got = []
    for epoch in range(6):
        before = p.state_dict()["checksum"]
        peeked = p.peek(epoch)
        assert p.state_dict()["checksum"] == before          # peeking changes nothing
        got.append(peeked is not None)
        plan, expected = p.plan(epoch), ref.plan(epoch)
        assert torch.equal(plan.indices, expected.indices)
        if peeked is not None:
            assert plan is peeked                              # plan() reuses the peeked plan
        feed(p, plan)
        feed(ref, expected)
    assert got == determined
    assert p.state_dict()["checksum"] == ref.state_dict()["checksum"]


def test_tree_sum_has_a_fixed_order_and_seen_mean_ignores_unseen():
    from gpuprune.stats import tree_sum
    x = torch.tensor([1e16, 1.0, -1e16, 1.0, 3.0], dtype=torch.float64)
    # ((1e16 + 1) + (-1e16 + 1)) + (3 + 0): pairs first, then their sums
    assert tree_sum(x).item() == ((1e16 + 1.0) + (-1e16 + 1.0)) + (3.0 + 0.0)
    assert tree_sum(torch.empty(0, dtype=torch.float64)).item() == 0.0
    perm = torch.tensor([4, 2, 0, 3, 1])
    assert tree_sum(x[perm]).item() == ((3.0 + -1e16) + (1e16 + 1.0)) + (1.0 + 0.0)
    s = Stats(4)
    s.observe(torch.tensor([1, 3]), torch.tensor([2.0, 4.0]))
    assert s.seen_mean(torch.tensor([100.0, 2.0, 100.0, 4.0])).item() == 3.0
    assert Stats(3).seen_mean(torch.ones(3)).item() == 0.0


def test_mask_lookup_keeps_out_of_range_ids_in_range():
    """An out-of-range id (a GPU batch the observe path flags as invalid) must neither index out of
    bounds (a device-side assert on a GPU) nor wrap: -1 read the last sample's bit."""
    from gpuprune.plan import mask_lookup, pack_mask
    bits = pack_mask(torch.arange(16) == 15)             # only id 15 marked, 2 bytes
    assert mask_lookup(bits, torch.tensor([15, 14, 0])).tolist() == [True, False, False]
    assert mask_lookup(bits, torch.tensor([-1, -9, -2**40])).tolist() == [False] * 3
    assert mask_lookup(bits, torch.tensor([16, 10**6, 2**40])).tolist() == [True] * 3   # -> 15
    plan = gp.Plan(1, torch.tensor([15, 3], dtype=torch.int32), False, 16, 4.0, bits)
    assert plan.weights_of(torch.tensor([15, 3, -1], dtype=torch.int16)).tolist() == [4.0, 1.0, 1.0]
    assert plan.weights_of(torch.tensor([15, 3])).dtype == torch.float32


def test_masked_mean_sums_the_masked_values_in_the_fixed_tree_order():
    """The one mean over seen samples (LossStats.seen_mean, UCB's drift scale, InfoBatch's
    threshold): masked entries count as 0 in the tree and not in the count."""
    from gpuprune.stats import masked_mean
    x = torch.tensor([1e16, 100.0, -1e16, 1.0, 3.0], dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, True])
    # tree over [1e16, 0, -1e16, 1, 3, 0, 0, 0]: ((1e16 + 0) + (-1e16 + 1)) + ((3 + 0) + 0) = 3
    # (-1e16 + 1 rounds to -1e16), over 4 masked entries; a left-to-right sum would give 1.0
    m = masked_mean(x, mask)
    assert m.dtype == torch.float64 and m.shape == () and m.item() == 0.75
    assert masked_mean(x, torch.zeros(5, dtype=torch.bool)).item() == 0.0
    s = Stats(5)
    s.observe(torch.tensor([0, 2, 3, 4]), torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(s.seen_mean(x), m)

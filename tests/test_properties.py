"""Property-based tests (hypothesis): invariants of every policy and of the score state.

Random dataset sizes, keep fractions, seeds, batches with duplicate ids and NaN/inf/huge losses:

* every plan is unique, in range and exactly k long (InfoBatch: ``N - n_below +
  floor((1 - r) * n_below)``), with the documented weights;
* the statistics stay finite (variance >= 0) whatever the losses;
* the backend's update matches a plain-Python, one-call-at-a-time reference of the update rule in
  the :mod:`gpuprune.update` docstring;
* checkpoints round-trip at any point, shards cover plans, samplers resume any position;
* the persistent state stays within 24 bytes per sample for every policy and phase.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpuprune as gp
from gpuprune.stats import masked_mean
from gpuprune.backend import TorchBackend
from gpuprune.plan import shard_indices

B = TorchBackend("cpu")

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
F32_MAX = float(np.finfo(np.float32).max)

finite_losses = st.floats(-1e3, 1e3, width=32)
any_losses = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),         # the whole float32 line
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, F32_MAX, -F32_MAX]),
    st.floats(0, 10, width=32),
)


@st.composite
def batches(draw, n: int, losses=any_losses, max_batches: int = 6):
    """A list of (ids, losses) batches over n samples; small n makes duplicates common."""
    out = []
    for _ in range(draw(st.integers(0, max_batches))):
        size = draw(st.integers(0, 3 * n + 2))
        ids = draw(st.lists(st.integers(0, n - 1), min_size=size, max_size=size))
        xs = draw(st.lists(losses, min_size=size, max_size=size))
        out.append((ids, xs))
    return out


def as_tensors(ids, xs):
    return torch.tensor(ids, dtype=torch.long), torch.tensor(xs, dtype=torch.float32)


def assert_state_finite(stats: gp.LossStats) -> None:
    assert bool(torch.isfinite(stats.mean).all())
    assert bool(torch.isfinite(stats.var).all())
    assert bool((stats.var >= 0).all())
    assert bool((stats.last_epoch >= -1).all())


def observe(stats: gp.LossStats, ids, xs, decay: float, epoch: int = 0) -> None:
    B.observe_(stats.tensors(), *as_tensors(ids, xs), decay, epoch)


# ---------------------------------------------------------------- the reference update
def f32(x: float) -> float:
    return float(np.float32(x))


def reference_observe(state: dict, ids, xs, decay: float, epoch: int) -> None:
    """One ``observe`` call, written from the update.py docstring in plain Python floats.

    Each sample's finite values in the call form one group (size c, mean m, population variance w)
    of weight ``a = 1 - decay**c`` (``a = 1`` on the first visit), mixed into the old state.
    """
    groups: dict[int, list[float]] = {}
    for i, x in zip(ids, xs):
        if math.isfinite(x):
            groups.setdefault(i, []).append(x)
        else:
            state["nonfinite"] += 1
    for i, g in groups.items():
        c = len(g)
        m = math.fsum(g) / c
        w = math.fsum((x - m) ** 2 for x in g) / c
        mean, var = state["mean"][i], state["var"][i]
        a = 1.0 if state["last_epoch"][i] < 0 else 1.0 - decay ** c
        d = m - mean
        state["mean"][i] = f32(mean + a * d)
        state["var"][i] = f32(min((1 - a) * var + a * w + a * (1 - a) * d * d, F32_MAX))
        state["last_epoch"][i] = epoch


def new_reference(n: int) -> dict:
    return {"mean": [0.0] * n, "var": [0.0] * n, "last_epoch": [-1] * n, "nonfinite": 0}


def assert_matches_reference(bank: gp.LossStats, ref: dict) -> None:
    assert bank.last_epoch.tolist() == ref["last_epoch"]
    assert int(bank.nonfinite) == ref["nonfinite"]
    # float64 arithmetic in both; they differ only in how the group sums are formed (shifted
    # sums there, two passes here), so a few float32 ulps plus a little cancellation on var
    torch.testing.assert_close(bank.mean, torch.tensor(ref["mean"]), rtol=4e-7, atol=1e-6)
    torch.testing.assert_close(bank.var, torch.tensor(ref["var"]), rtol=4e-6, atol=1e-5)


@FAST
@given(data=st.data(), n=st.integers(1, 12), decay=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
       epochs=st.integers(1, 3))
def test_observe_matches_sequential_python_reference(data, n, decay, epochs):
    losses = st.one_of(finite_losses, st.sampled_from([math.nan, math.inf, -math.inf]))
    bank = gp.LossStats(n)
    ref = new_reference(n)
    for epoch in range(epochs):
        for ids, xs in data.draw(batches(n, losses)):
            observe(bank, ids, xs, decay, epoch)
            reference_observe(ref, ids, xs, decay, epoch)
    assert_matches_reference(bank, ref)


@FAST
@given(data=st.data(), n=st.integers(1, 40), decay=st.floats(0.0, 0.999))
def test_state_stays_finite_for_any_float32_losses(data, n, decay):
    bank = gp.LossStats(n)
    expected_nonfinite = 0
    for ids, xs in data.draw(batches(n)):
        observe(bank, ids, xs, decay)
        expected_nonfinite += sum(not math.isfinite(x) for x in xs)
        assert_state_finite(bank)
    assert int(bank.nonfinite) == expected_nonfinite


# ---------------------------------------------------------------- policies through the Pruner
def infobatch_expectation(bank: gp.LossStats, ratio: float):
    """The documented InfoBatch outcome: the below-mean set, the kept count and the scale.

    The mean is the float64 mean of the seen samples' EMA losses, summed as the policy does. Of the
    samples below it a share q = max(0.1, 1 - ratio) is kept (the official code's clamp above
    ratio 0.9), weighted 1 / q.
    """
    s = bank.mean.double()
    seen = bank.seen
    # the policy's fixed-order float64 sum: a naive sum may round the last bit of the mean the
    # other way, and a loss next to it then falls on the other side
    mean = masked_mean(s, seen)
    below = seen & (s < mean)
    n_below = int(below.sum())
    q = max(0.1, 1.0 - ratio)
    kept = bank.num_samples - n_below + math.floor(q * n_below)
    return below, n_below, kept, float(np.float32(1.0 / q))


POLICY_NAMES = ["uniform", "epsilon_greedy", "ucb", "infobatch", "static", "full"]


@pytest.mark.slow
@FAST
@given(data=st.data(), policy=st.sampled_from(POLICY_NAMES), n=st.integers(1, 150),
       keep=st.floats(1e-3, 1.0), seed=st.integers(-(2**63), 2**64 - 1),
       decay=st.sampled_from([0.0, 0.5, 0.9]))
def test_every_plan_keeps_the_documented_invariants(data, policy, n, keep, seed, decay):
    chosen = policy
    if policy == "epsilon_greedy":
        chosen = gp.EpsilonGreedy(epsilon=data.draw(st.floats(0.0, 1.0)))
    elif policy == "ucb":
        chosen = gp.UCB(c=data.draw(st.floats(0.0, 1e3)),
                        uncertainty=data.draw(st.sampled_from(["std", "var"])),
                        drift=data.draw(st.sampled_from([0.0, 1.0])))
    elif policy == "static" and data.draw(st.booleans()):
        chosen = gp.Static(torch.tensor(data.draw(st.lists(any_losses, min_size=n, max_size=n)),
                                        dtype=torch.float32))
    pruner = gp.Pruner(n, keep=keep, policy=chosen, num_epochs=100, final_full_epochs=0,
                       seed=seed, decay=decay)
    k = gp.budget(keep, n)
    assert 1 <= k <= n and k == max(1, math.floor(keep * n + 0.5))
    for epoch in range(3):
        for ids, xs in data.draw(batches(n, max_batches=3)):
            pruner.observe(*as_tensors(ids, xs))
        assert_state_finite(pruner.stats)
        if policy == "infobatch":
            ratio = pruner.policy.ratio
            below, n_below, kept, scale = infobatch_expectation(pruner.stats, ratio)
        selected_before = pruner.stats.selected.clone()
        plan = pruner.plan(epoch)
        idx = plan.indices.long()
        assert plan.indices.dtype == torch.int32 and idx.dim() == 1
        assert idx.unique().numel() == idx.numel()
        assert len(idx) == 0 or (int(idx.min()) >= 0 and int(idx.max()) < n)
        if policy == "full":
            assert len(plan) == n and plan.weights is None and plan.full
            continue
        assert not plan.full
        # every planned sample is counted once in ``selected``
        bump = pruner.stats.selected - selected_before
        assert bump.sum() == len(plan) and bool((bump[idx] == 1).all())
        if policy != "infobatch":
            assert len(plan) == k and plan.weights is None
            continue
        assert len(plan) == kept
        w = plan.weights
        assert w is not None and w.dtype == torch.float32 and w.shape == idx.shape
        rescaled = idx[w != 1.0]
        assert bool((w[w != 1.0] == scale).all())
        assert rescaled.numel() == math.floor(max(0.1, 1.0 - ratio) * n_below) or scale == 1.0
        assert bool(below[rescaled].all())                     # only well-learned ones rescaled
        in_plan = torch.zeros(n, dtype=torch.bool)
        in_plan[idx] = True
        assert bool(in_plan[~below].all())                    # every other sample is kept
        # the loss returned by observe applies the same weights
        j = idx[: min(5, len(idx))]
        loss = torch.linspace(0.5, 1.5, len(j))
        expected = (loss * w[: len(j)]).sum() / max(len(j), 1)
        assert torch.equal(pruner.observe(j, loss), expected)
        assert_state_finite(pruner.stats)


@FAST
@given(policy=st.sampled_from(["uniform", "epsilon_greedy", "ucb", "infobatch"]),
       n=st.integers(2, 80), seed=st.integers(0, 2**32), data=st.data())
def test_checkpoint_round_trip_at_any_step_gives_the_same_future(policy, n, seed, data):
    """state_dict/load_state_dict at a random point, then identical plans and state."""
    def make():
        return gp.Pruner(n, keep=0.4, policy=policy, num_epochs=6, seed=seed)
    a, b = make(), make()
    script = [data.draw(batches(n, max_batches=2)) for _ in range(4)]
    cut = data.draw(st.integers(0, 7))                 # checkpoint between two half-epochs
    step = 0
    for epoch in range(4):
        pa = a.plan(epoch)
        for half in (0, 1):
            if step == cut:
                b.load_state_dict(a.state_dict())
            if step >= cut:
                pb = b.plan(epoch)
                assert torch.equal(pa.indices, pb.indices)
                assert (pa.weights is None) == (pb.weights is None)
                assert pa.weights is None or torch.equal(pa.weights, pb.weights)
            for ids, xs in script[epoch][half::2]:
                t = as_tensors(ids, xs)
                la = a.observe(*t)
                if step >= cut:
                    lb = b.observe(*t)
                    assert torch.equal(la, lb) or (la.isnan() and lb.isnan())
            step += 1
    for key, value in a.state_dict()["stats"].items():
        assert torch.equal(value, b.state_dict()["stats"][key]), key
    assert a.state_dict()["checksum"] == b.state_dict()["checksum"]


# ---------------------------------------------------------------- sharding and sampler state
@FAST
@given(n=st.integers(0, 60), world=st.integers(1, 7), drop_last=st.booleans())
def test_shards_are_equal_and_cover_the_plan(n, world, drop_last):
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [shard_indices(ids, r, world, drop_last) for r in range(world)]
    sizes = {len(s) for s in shards}
    assert len(sizes) == 1
    size = sizes.pop()
    assert size == (n // world if drop_last else -(-n // world))
    merged = torch.stack(shards, 1).reshape(-1) if size else torch.empty(0, dtype=torch.long)
    if drop_last or n == 0:
        assert torch.equal(merged, ids[: len(merged)])
    else:
        assert torch.equal(merged[:n], ids)             # all of them, in order, then the padding
        assert torch.equal(merged[n:], ids.repeat(world)[: len(merged) - n])


@FAST
@given(n=st.integers(1, 60), keep=st.floats(0.05, 1.0), world=st.integers(1, 4),
       drop_last=st.booleans(), data=st.data())
def test_sampler_resumes_any_position_of_any_shard(n, keep, world, drop_last, data):
    pruner = gp.Pruner(n, keep=keep, policy="uniform", seed=n)
    samplers = [gp.PrunedSampler(pruner, num_replicas=world, rank=r, drop_last=drop_last)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(1)
    full = [list(s) for s in samplers]
    consumed = data.draw(st.integers(0, len(full[0])))
    state = samplers[0].state_dict(consumed=consumed)
    for r in range(world):
        t = gp.PrunedSampler(pruner, num_replicas=world, rank=r, drop_last=drop_last)
        t.load_state_dict(state)
        assert len(t) == len(full[r]) - consumed
        assert list(t) == full[r][consumed:]


# ---------------------------------------------------------------- memory of the state
def state_bytes(obj) -> int:
    """Bytes of the distinct tensor storages an object keeps (a shared storage counts once),
    found by walking its attributes: an independent count of what Pruner.nbytes() reports."""
    storages: dict[int, int] = {}
    seen: set[int] = set()

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            st = value.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif hasattr(value, "__dict__") and id(value) not in seen and not isinstance(value, type):
            seen.add(id(value))
            for v in vars(value).values():
                visit(v)

    visit(obj)
    return sum(storages.values())


@settings(max_examples=30, deadline=None)
@given(policy=st.sampled_from(["uniform", "epsilon_greedy", "ucb", "static", "infobatch", "full"]),
       n=st.integers(1, 3000), keep=st.floats(0.01, 1.0), seed=st.integers(0, 2**32),
       warmup=st.booleans())
def test_persistent_state_is_at_most_24_bytes_per_sample(policy, n, keep, seed, warmup):
    """LossStats: 16 B/sample. After plan(): + 4 B per planned id (int32 ids; the selection is the
    plan's set), + for InfoBatch one bit per sample (the rescaled mask). So at most 20.125 B/sample
    in every phase: warm-up, pruned, final full epochs."""
    scalars = 2 * 8                                    # nonfinite and invalid_batches (int64)
    assert state_bytes(gp.LossStats(n)) == 16 * n + scalars
    pruner = gp.Pruner(n, keep=keep, policy=policy, num_epochs=3, warmup_epochs=int(warmup),
                       final_full_epochs=1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    pruner.observe(torch.arange(n), torch.rand(n, generator=g))
    for epoch in range(3):                             # warm-up or pruned, pruned, final full
        plan = pruner.plan(epoch)
        expected = 16 * n + scalars + 4 * len(plan)
        if plan.rescaled is not None:
            expected += -(-n // 8)
        expected += 8 * epoch                          # one float64 overlap per plan after the first
        expected += 8                                  # the epoch a compiled step reads (int64)
        assert state_bytes(pruner) == pruner.nbytes() == expected
        assert expected - scalars - 8 - 8 * epoch <= 24 * n  # per-sample part (O(1) terms aside)

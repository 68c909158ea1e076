"""gpuprune.state: the Pruner's saved state, its checksum, and the validation of the whole of it.

A state edited and re-checksummed must not load when no Pruner of this configuration could have
saved it (issue 22, item 3): every field is checked, and so are the facts that tie the fields
together (the history is a run of this schedule; ``rounds``, ``selected``, the plan agree with it).
"""

from __future__ import annotations

import math

import pytest
import torch

import gpuprune as gp
from gpuprune.plan import mask_lookup, pack_mask

from conftest import edited, feed, make

N = 20


def trained(policy: str = "infobatch", epochs: int = 4, **kw) -> gp.Pruner:
    """A Pruner that planned ``epochs`` epochs of a 6-epoch run, every planned sample observed."""
    p = gp.Pruner(N, keep=0.5, policy=policy, num_epochs=6, seed=1, **kw)
    for epoch in range(epochs):
        plan = p.plan(epoch)
        p.observe(plan.indices, torch.linspace(0.1, 2.0, len(plan)) * (epoch + 1))
    return p


def set_record(i: int, **fields):
    return lambda h: [*h[:i], {**h[i], **fields}, *h[i + 1:]]


def refused(policy: str, state: dict, match: str) -> None:
    """Loading ``state`` raises naming ``match`` and changes nothing of a fresh Pruner."""
    p = trained(policy, epochs=2)
    before = p.state_dict()
    with pytest.raises(ValueError) as info:
        p.load_state_dict(state)
    assert match in str(info.value), str(info.value)
    assert p.state_dict()["checksum"] == before["checksum"] and p.history == before["history"]


# ---------------------------------------------------------------- issue 22, item 3
@pytest.mark.parametrize("changes, match", [
    (dict(rounds=10**9), "state_dict['rounds']=1000000000, but the history holds 2 pruned plans"),
    (dict(history=set_record(1, overlap="x")),
     "state_dict['history'][1]['overlap'] must be a float in [0, 1], got 'x'"),
    (dict(history=lambda h: [h[0], {}, *h[2:]]),
     "state_dict['history'][1] must be a dict with exactly the keys"),
    (dict(history=lambda h: h + [h[-1]] * 1000),
     "state_dict['history'][2]['epoch']=1 does not follow the previous record's epoch 1"),
    (dict(stats__nonfinite=torch.tensor(2**62)),
     "state_dict['stats']['nonfinite'] must lie in [0, 2**53], got 4611686018427387904"),
], ids=["rounds=10**9", "overlap='x'", "a record {}", "1002 records for 2 epochs", "nonfinite=2**62"])


def test_edited_and_resealed_states_of_issue_22_are_refused(changes, match):
    refused("infobatch", edited(trained("infobatch", epochs=2).state_dict(), **changes), match)


def test_an_infobatch_plan_of_one_id_is_refused_even_when_everything_else_agrees():
    """The plan cut to 1 id, its history record and ``selected`` edited to match: only the policy
    knows that InfoBatch keeps every sample at or above the mean, so a plan of 1 id is not one."""
    state = trained("infobatch", epochs=2).state_dict()
    ids = state["plan"]["indices"]
    keep = ids[:1]
    selected = state["stats"]["selected"].clone()
    selected[ids.long()] -= 1
    selected[keep.long()] += 1
    edited(state, plan__indices=keep, history=set_record(1, size=1), stats__selected=selected)
    refused("infobatch", state, "state_dict['plan']['indices'] holds 1 ids (")


def test_an_infobatch_plan_must_keep_the_count_and_weight_of_its_below_mean_mask():
    p = trained("infobatch", epochs=2)
    state = p.state_dict()
    plan = p.current_plan
    q = 1.0 / plan.weight
    below = mask_lookup(plan.rescaled, torch.arange(N))
    n_below = int(below.sum())
    assert len(plan) == N - n_below + math.floor(q * n_below)        # what the check requires
    refused("infobatch", edited(p.state_dict(), plan__weight=plan.weight * 2),
            "an InfoBatch plan rescales its kept below-mean samples by 1/q")
    # one more sample marked below the mean: the plan should have kept fewer
    more = below.clone()
    more[plan.indices[~below[plan.indices.long()]][0].long()] = True
    refused("infobatch", edited(state, plan__rescaled=pack_mask(more)), "InfoBatch keeps all")


@pytest.mark.parametrize("changes, match", [
    (dict(history=set_record(1, full=True)), "state_dict['history'][1]['full']=True, but this "
                                             "schedule makes it False for epoch 1"),
    (dict(history=set_record(1, reselected=False)), "['reselected']=False, but this schedule"),
    (dict(history=set_record(0, overlap=0.5)), "['overlap'] must be None for the first plan"),
    (dict(history=set_record(1, overlap=True)), "must be a float in [0, 1], got True"),
    (dict(history=set_record(1, overlap=1.5)), "must be a float in [0, 1], got 1.5"),
    (dict(history=set_record(1, size=7)), "['size']=7, but epoch 1 plans 10 samples"),
    (dict(history=set_record(1, epoch=9)), "['epoch'] must be <= 5"),
    (dict(history=lambda h: h[:1]), "state_dict['rounds']=2, but the history holds 1 pruned plans"),
    (dict(epoch=2), "state_dict['epoch']=2, but the last plan in the history is of epoch 1"),
    (dict(history=[]), "state_dict['rounds']=2, but the history holds 0 pruned plans"),
    (dict(history="h"), "state_dict['history'] must be a list, got str"),
    (dict(selection_epoch=0), "state_dict['selection_epoch']=0, but the history's current "
                              "selection was drawn in epoch 1"),
    (dict(stats__selected=lambda t: torch.where(t > 0, t - 1, t)),
     "state_dict['stats']['selected'] sums to"),
    (dict(stats__invalid_batches=torch.tensor(-1)), "['invalid_batches'] must lie in [0, 2**53]"),
    (dict(plan__rescaled=torch.ones(2, dtype=torch.uint8)),
     "state_dict['plan']['rescaled'] must be None or a (3,) uint8 tensor"),
    (dict(plan__rescaled=torch.ones(3, dtype=torch.uint8)),
     "Uniform() does not rescale losses, but the plan marks rescaled samples"),
], ids=lambda v: v if isinstance(v, str) else None)


def test_every_field_and_every_tie_between_fields_is_checked(changes, match):
    refused("uniform", edited(trained("uniform", epochs=2).state_dict(), **changes), match)


def test_rescaled_bits_past_the_last_sample_are_refused():
    p = gp.Pruner(19, keep=0.5, policy="infobatch", num_epochs=6, seed=1)   # 3 bytes, 5 spare bits
    p.observe(p.plan(0).indices, torch.linspace(0.1, 2.0, 19))
    p.plan(1)
    state = p.state_dict()
    bits = state["plan"]["rescaled"].clone()
    bits[-1] |= 0x80                                          # sample 23 of 19
    q = gp.Pruner(19, keep=0.5, policy="infobatch", num_epochs=6, seed=1)
    with pytest.raises(ValueError, match="marks samples past num_samples=19"):
        q.load_state_dict(edited(state, plan__rescaled=bits))


@pytest.mark.parametrize("policy", ["ucb", "epsilon_greedy", "uniform", "infobatch", "static",
                                    "full"])


@pytest.mark.parametrize("kw", [{}, dict(warmup_epochs=1, selection_interval=2)],
                         ids=["plain", "warmup-interval"])


def test_every_state_a_run_saves_loads_at_every_epoch(policy, kw):
    """The checks refuse nothing a real run saves: every epoch of every policy and schedule."""
    p = gp.Pruner(N, keep=0.4, policy=policy, num_epochs=6, seed=3, **kw)
    q = gp.Pruner(N, keep=0.4, policy=policy, num_epochs=6, seed=3, **kw)
    q.load_state_dict(p.state_dict())                     # before any plan
    for epoch in range(6):
        plan = p.plan(epoch)
        p.observe(plan.indices, torch.rand(len(plan), generator=torch.Generator().manual_seed(epoch)))
        q.load_state_dict(p.state_dict())
        assert q.history == p.history and q.rounds == p.rounds
        assert torch.equal(q.current_plan.indices, plan.indices)


# ---------------------------------------------------------------- (from test_core.py)
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

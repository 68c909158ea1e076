"""Extending a run (issue 19): ``Pruner.load_state_dict(state, extend=True)`` continues a
checkpoint of a shorter run with more epochs.

The rule, checked here by reference equivalence: the extended run is bit for bit the run a Pruner
created with the new ``num_epochs`` from the start trains (every plan's ids, order, weights and
rescaled set; the statistics; the history), so its plans equal the saved run's for every epoch
before the saved run's first final full-data epoch. Derived final full-data epochs (InfoBatch's
annealing, ``num_epochs - floor(delta * num_epochs)``) are derived again; an explicit
``final_full_epochs`` keeps its count and moves to the new end. A checkpoint that already planned
an epoch the longer schedule makes a different kind is refused, naming the epoch; so is any other
difference of the configuration. Losses are a deterministic function of (sample, epoch)
(conftest's ``feed``), so both runs see the same ones.
"""

from __future__ import annotations

import pytest
import torch

import gpuprune as gp

from conftest import feed

N = 300


def pruner(num_epochs: int, **kw) -> gp.Pruner:
    return gp.Pruner(N, **{"keep": 0.3, "policy": "ucb", "seed": 7, **kw}, num_epochs=num_epochs)


def run(p: gp.Pruner, epochs) -> list[gp.Plan]:
    """Plan and train ``epochs`` (every planned sample observed once)."""
    plans = []
    for e in epochs:
        plans.append(p.plan(e))
        feed(p, plans[-1], seed=3)
    return plans


def assert_same_plans(a: list[gp.Plan], b: list[gp.Plan]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.epoch, x.full, x.weight) == (y.epoch, y.full, y.weight)
        assert torch.equal(x.indices, y.indices), x.epoch
        assert (x.rescaled is None) == (y.rescaled is None)
        if x.rescaled is not None:
            assert torch.equal(x.rescaled, y.rescaled)


def assert_same_state(a: gp.Pruner, b: gp.Pruner) -> None:
    for name, t in a.stats.state_dict().items():
        assert torch.equal(t, b.stats.state_dict()[name]), name
    assert a.history == b.history and a.rounds == b.rounds


#: (settings, saved num_epochs, epoch of the checkpoint, new num_epochs, the saved run's first
#: final full-data epoch, the new one's)
CASES = {
    "ucb-warmup-final": (dict(policy="ucb", warmup_epochs=1, final_full_epochs=1), 5, 3, 8, 4, 7),
    "infobatch": (dict(policy="infobatch"), 8, 5, 12, 7, 10),
    "uniform-interval-2": (dict(policy="uniform", selection_interval=2, final_full_epochs=2),
                           6, 2, 9, 4, 7),
    "static": (dict(policy=gp.Static(torch.arange(N).float())), 4, 1, 6, 4, 6),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_an_extended_run_is_the_longer_run_bit_for_bit(case, tmp_path):
    settings, old_e, saved_at, new_e, old_final, new_final = CASES[case]
    short = pruner(old_e, **settings)
    assert short.schedule.num_epochs - short.schedule.final == old_final
    saved_plans = run(short, range(saved_at + 1))
    path = tmp_path / "ckpt.pt"
    gp.save_checkpoint({"pruner": short.state_dict()}, path)
    # the rest of the short run, for its plans before its final full-data epochs
    saved_plans += run(short, range(saved_at + 1, old_e))

    longer = pruner(new_e, **settings)
    assert longer.schedule.num_epochs - longer.schedule.final == new_final
    longer.load_state_dict(gp.load_checkpoint(path)["pruner"], extend=True)
    reference = pruner(new_e, **settings)
    ref_plans = run(reference, range(saved_at + 1))
    assert_same_state(longer, reference)

    # a round trip of the extended state: it is the longer run's now
    again = pruner(new_e, **settings)
    again.load_state_dict(longer.state_dict())
    with pytest.raises(ValueError, match=rf"num_epochs={new_e}, more than this Pruner's "
                                         rf"num_epochs={old_e}"):
        pruner(old_e, **settings).load_state_dict(longer.state_dict(), extend=True)

    rest = range(saved_at + 1, new_e)
    got, want, round_trip = run(longer, rest), run(reference, rest), run(again, rest)
    assert_same_plans(got, want)
    assert_same_plans(round_trip, want)
    assert_same_state(longer, reference)
    assert_same_plans(saved_plans[:old_final], (ref_plans + want)[:old_final])
    assert [p.full for p in want] == [e >= new_final or e < settings.get("warmup_epochs", 0)
                                      for e in rest]


def test_final_full_epochs_move_to_the_new_end():
    """An explicit final_full_epochs=2 keeps its count; InfoBatch's annealing is derived again:
    floor(0.875 * 8) = 7 -> one annealing epoch; floor(0.875 * 16) = 14 -> two."""
    short, longer = pruner(5, final_full_epochs=2), pruner(9, final_full_epochs=2)
    run(short, range(3))
    longer.load_state_dict(short.state_dict(), extend=True)
    assert [longer.is_full_epoch(e) for e in range(9)] == [False] * 7 + [True] * 2
    short, longer = pruner(8, policy="infobatch"), pruner(16, policy="infobatch")
    run(short, range(7))
    longer.load_state_dict(short.state_dict(), extend=True)
    assert (short.schedule.final, longer.schedule.final) == (1, 2)
    assert [e for e in range(16) if longer.is_full_epoch(e)] == [14, 15]


def test_a_checkpoint_past_the_old_first_final_epoch_is_refused():
    short = pruner(4, warmup_epochs=1, final_full_epochs=1)
    run(short, range(4))                            # epoch 3 was a final full-data epoch
    longer = pruner(6, warmup_epochs=1, final_full_epochs=1)
    with pytest.raises(ValueError) as err:
        longer.load_state_dict(short.state_dict(), extend=True)
    assert str(err.value) == (
        "cannot extend this checkpoint: its run (num_epochs=4) planned epoch 3 as a full-data "
        "epoch, which with num_epochs=6 is pruned; its final full-data (InfoBatch: annealing) "
        "epochs start at epoch 3. Extend from a checkpoint saved before epoch 3 was planned, or "
        "keep num_epochs=4")
    assert longer.current_plan is None and longer.history == []     # nothing was loaded
    assert not longer.stats.mean.any()

    short = pruner(8, policy="infobatch")
    run(short, range(8))                                        # epoch 7: annealing
    with pytest.raises(ValueError, match=r"planned epoch 7 as a full-data epoch, which with "
                                         r"num_epochs=16 is pruned"):
        pruner(16, policy="infobatch").load_state_dict(short.state_dict(), extend=True)


def test_an_annealing_epoch_the_longer_run_anneals_too_extends():
    """InfoBatch, 8 -> 9 epochs: floor(0.875 * 9) = 7 = floor(0.875 * 8), so epoch 7 anneals in
    both runs, and a checkpoint taken there continues as the 9-epoch run from the start."""
    short = pruner(8, policy="infobatch")
    run(short, range(8))
    longer, reference = pruner(9, policy="infobatch"), pruner(9, policy="infobatch")
    longer.load_state_dict(short.state_dict(), extend=True)
    run(reference, range(8))
    assert_same_plans(run(longer, [8]), run(reference, [8]))
    assert_same_state(longer, reference)


def test_what_extend_refuses():
    short = pruner(4)
    run(short, range(2))
    state = short.state_dict()
    cases = [
        (pruner(6, keep=0.4), ValueError, r"checkpoint was made with k=90, this Pruner has "
                                          r"k=120"),
        (pruner(6, seed=8), ValueError, r"checkpoint was made with seed=7, this Pruner has seed=8"),
        (pruner(3), ValueError, r"checkpoint was made with schedule.num_epochs=4, more than this "
                                r"Pruner's num_epochs=3: extend=True only lengthens a run"),
        (gp.Pruner(N, keep=0.3, policy="ucb", seed=7), ValueError,
         r"extend=True continues a run for more epochs, but this Pruner has no num_epochs"),
        (pruner(6, final_full_epochs=5), ValueError,
         r"the checkpoint's run had num_epochs=4, which this Pruner's arguments do not allow: "
         r"final_full_epochs must be <= 4"),
    ]
    for p, exc, message in cases:
        with pytest.raises(exc, match=message):
            p.load_state_dict(state, extend=True)
        assert p.current_plan is None and p.history == []
    with pytest.raises(TypeError, match="extend must be a bool"):
        pruner(6).load_state_dict(state, extend=1)
    open_ended = gp.Pruner(N, keep=0.3, policy="ucb", seed=7)
    open_ended.plan(0)
    with pytest.raises(ValueError, match=r"num_epochs=None \(an open-ended run\)"):
        pruner(6).load_state_dict(open_ended.state_dict(), extend=True)
    same = pruner(4)                                     # the same num_epochs: a plain load
    same.load_state_dict(state, extend=True)
    assert same.history == short.history


def test_a_callable_keep_schedule_extends_bit_for_bit():
    """keep as a callable of the epoch gives each epoch the same size whatever num_epochs is, so
    the extended run is the longer run from the start: 0.6, 0.5, 0.4, ... of N = 300 per epoch."""
    def keep(e):
        return max(0.2, 0.6 - 0.1 * e)
    saved = pruner(4, keep=keep)
    run(saved, range(3))
    longer = pruner(7, keep=keep)
    longer.load_state_dict(saved.state_dict(), extend=True)
    fresh = pruner(7, keep=keep)
    assert_same_plans(run(longer, range(3, 7)), run(fresh, range(7))[3:])
    assert [h["size"] for h in longer.history] == [180, 150, 120, 90, 60, 60, 60]
    assert_same_state(longer, fresh)


def test_a_shaped_keep_schedule_whose_sizes_change_is_refused_and_changes_nothing():
    """("linear", 0.6, 0.2) spreads over the run's length: epoch 1 keeps 0.6 - 0.4/3 of N (140
    samples) over 4 epochs, 0.6 - 0.4/6 (160) over 7, so a checkpoint that planned it is refused,
    naming the epoch and both budgets."""
    saved = pruner(4, keep=("linear", 0.6, 0.2))
    run(saved, range(2))
    assert [h["size"] for h in saved.history] == [180, 140]
    longer = pruner(7, keep=("linear", 0.6, 0.2))
    with pytest.raises(ValueError, match=r"epoch 1 a budget of 140 samples, which over "
                                         r"num_epochs=7 is 160"):
        longer.load_state_dict(saved.state_dict(), extend=True)
    assert longer.history == [] and longer.current_plan is None

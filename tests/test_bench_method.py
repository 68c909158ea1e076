"""The benchmark's method: the equal-time baseline on hand-computed numbers, the work a sweep
plans, the learning-rate schedules, and the exploitation measurement."""

from __future__ import annotations

import math

import pytest
import torch

from gpuprune.bench.budget import (evaluations, planned_work, project,
                                   step_budget_samples)
from gpuprune.bench.config import BenchConfig, base_method, charged_clock, uses_refresh
from gpuprune.bench.equal_time import (Rung, accuracy_at_steps, cost_scatter, equal_time,
                                       equivalent_steps, fit_cost, grid_steps, rungs_to_add)
from gpuprune.bench.config import step_budget
from gpuprune.bench.train import exploitation_of, lr_factor, onecycle_factor, schedule_factor
from gpuprune.pruner import Pruner
from gpuprune.sizes import budget


# ------------------------------------------------------------------------------ equal time
# A hand-made ladder on the line seconds = 1 + 0.1 * steps, full run = 200 steps.
LADDER = [Rung(50, 6.0, 80.0), Rung(100, 11.0, 85.0), Rung(200, 21.0, 90.0)]


def test_fit_cost_is_the_least_squares_line():
    assert fit_cost(LADDER) == pytest.approx((1.0, 0.1))
    # noisy times: slope = cov / var by hand. xs 50, 100, 200 (mean 350/3); ys 6, 12, 21 (mean 13)
    noisy = [Rung(50, 6.0, 80.0), Rung(100, 12.0, 85.0), Rung(200, 21.0, 90.0)]
    mx, my = 350 / 3, 13.0
    b = ((50 - mx) * (6 - my) + (100 - mx) * (12 - my) + (200 - mx) * (21 - my)) / \
        ((50 - mx) ** 2 + (100 - mx) ** 2 + (200 - mx) ** 2)
    assert fit_cost(noisy) == pytest.approx((my - b * mx, b))
    assert fit_cost([Rung(100, 5.0, 80.0)]) == pytest.approx((0.0, 0.05))   # one run: origin
    with pytest.raises(ValueError, match="at least one"):
        fit_cost([])
    with pytest.raises(ValueError, match="positive"):
        fit_cost([Rung(50, 9.0, 80.0), Rung(100, 5.0, 85.0)])     # longer but faster: no line


def test_cost_scatter_is_the_rms_relative_residual():
    assert cost_scatter(LADDER) == pytest.approx(0.0, abs=1e-12)          # exactly on the line
    # line through (100, 10), (200, 20), (300, 36): b = 0.13, a = -4 -> 9, 22, 35
    rungs = [Rung(100, 10.0, 0.0), Rung(200, 20.0, 0.0), Rung(300, 36.0, 0.0)]
    assert fit_cost(rungs) == pytest.approx((-4.0, 0.13))
    rms = math.sqrt(((1 / 9) ** 2 + (2 / 22) ** 2 + (1 / 35) ** 2) / 3)
    assert cost_scatter(rungs) == pytest.approx(rms)
    assert math.isnan(cost_scatter(LADDER[:2]))


def test_equal_time_interpolates_on_hand_numbers():
    # 16 s = 150 steps on the line; between 100 (85 %) and 200 (90 %): 85 + 50/100 * 5 = 87.5
    et = equal_time(LADDER, 16.0, 200)
    assert et.steps == pytest.approx(150.0) and et.fraction == pytest.approx(0.75)
    assert et.acc == pytest.approx(87.5) and et.status == "interpolated"
    # 8.5 s = 75 steps: 80 + 25/50 * 5 = 82.5
    assert equal_time(LADDER, 8.5, 200).acc == pytest.approx(82.5)
    # exactly a rung's time gives its accuracy
    assert equal_time(LADDER, 11.0, 200).acc == pytest.approx(85.0)
    # slower than full data: compared with full data
    slow = equal_time(LADDER, 30.0, 200)
    assert slow.status == "slower" and slow.acc == 90.0 and slow.fraction == pytest.approx(1.45)
    # faster than the shortest rung: no comparison
    fast = equal_time(LADDER, 3.0, 200)
    assert fast.status == "outside" and math.isnan(fast.acc)


def test_accuracy_at_steps_averages_equal_lengths_and_refuses_outside():
    rungs = [Rung(10, 1.0, 70.0), Rung(10, 1.1, 72.0), Rung(30, 3.0, 81.0)]
    assert accuracy_at_steps(rungs, 10) == pytest.approx(71.0)
    assert accuracy_at_steps(rungs, 20) == pytest.approx(76.0)
    assert math.isnan(accuracy_at_steps(rungs, 9.9)) and math.isnan(accuracy_at_steps(rungs, 31))
    assert equivalent_steps(3.0, (1.0, 0.5)) == pytest.approx(4.0)


def test_rungs_to_add_brackets_every_method_on_the_grid():
    full = Rung(1000, 100.0, 90.0)           # line through the origin: 0.1 s per step
    grid = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
    assert grid_steps(0.3, 1000) == 300 and grid_steps(0.0001, 1000) == 1
    # 55 s = 550 steps: needs 500 and 600; 120 s is slower than full data: needs nothing
    assert rungs_to_add([full], [55.0, 120.0], 1000, grid) == [500, 600]
    # full_short at 505 steps stands in for 500 (within 2 % of 1000 steps)
    assert rungs_to_add([full, Rung(505, 50.5, 88.0)], [55.0], 1000, grid) == [600]
    # ... but not when it lies above s*: 50.2 s = 502 steps -> the grid point 500 itself
    assert rungs_to_add([full, Rung(505, 50.5, 88.0)], [50.2], 1000, grid) == [500]
    # between 0.8 and 1.0 the full run is the upper bracket
    assert rungs_to_add([full], [85.0], 1000, grid) == [800]
    # below the grid: 90 % of s*
    assert rungs_to_add([full], [5.0], 1000, grid) == [45, 100]
    # once run, nothing more is needed and the comparison is interpolated
    done = [full, Rung(500, 50.0, 86.0), Rung(600, 60.0, 87.0)]
    assert rungs_to_add(done, [55.0], 1000, grid) == []
    assert equal_time(done, 55.0, 1000).acc == pytest.approx(86.5)


# ------------------------------------------------------------------------------ work counts
def test_step_budget_samples_by_hand():
    # N = 100, batch 30: 4 batches per epoch (30, 30, 30, 10)
    assert step_budget_samples(4, 100, 30) == 100
    assert step_budget_samples(6, 100, 30) == 100 + 60
    assert step_budget_samples(3, 100, 30) == 90
    assert evaluations(30, 5) == 6 and evaluations(7, 3) == 3 and evaluations(1, 1) == 1


def test_planned_work_counts_every_run_by_hand():
    n, n_test, e, bs = 1000, 200, 4, 100
    cfg = BenchConfig(epochs=e, batch_size=bs, prune_ratios=(0.5,), seeds=(0, 1),
                      methods=("full_short", "uniform", "ucb", "ucb+refresh", "el2n"),
                      el2n_seeds=2, el2n_epochs=1, equal_time=False, eval_every=2)
    work = {w.what: w for w in planned_work(cfg, n, n_test)}
    k = budget(0.5, n)                                         # 500
    evals = 2 * n_test                                         # epochs 2 and 4
    assert work["full"].train == 2 * e * n and work["full"].forward == 2 * evals
    assert work["el2n scoring"].train == 2 * 2 * 1 * n and work["el2n scoring"].forward == 2 * 2 * n
    assert work["uniform p=0.5"].train == 2 * e * k and work["ucb p=0.5"].train == 2 * e * k
    assert work["full_short p=0.5"].train == 2 * e * k          # 20 steps of 100 = 2 epochs
    # the pass re-scores the N - k unselected samples before epochs 1, 2, 3
    assert work["ucb+refresh p=0.5"].forward == 2 * (evals + 3 * (n - k))
    # 7 runs per seed (full, 5 methods, EL2N's scoring), each probed before and after
    assert work["reference-step probes"].train == 2 * 7 * 2 * 10 * bs
    assert all(w.exact for w in work.values())
    p = project(list(work.values()), train_rate=1000.0, forward_rate=4000.0)
    train = sum(w.train for w in work.values())
    fwd = sum(w.forward for w in work.values())
    assert p["seconds"] == pytest.approx(train / 1000 + fwd / 4000)
    unit = work["full"].train / 1000 + work["full"].forward / 4000
    assert p["full_run_equivalents"] == pytest.approx(p["seconds"] / unit)


def test_planned_work_matches_a_real_pruner_for_exact_k_policies():
    """The counts come from the same Schedule the Pruner plans with: warm-up epochs included."""
    cfg = BenchConfig(epochs=5, batch_size=64, warmup_epochs=1, prune_ratios=(0.7,),
                      methods=("uniform", "epsilon_greedy"), equal_time=False)
    work = {w.what: w for w in planned_work(cfg, 500, 50)}
    pruner = Pruner(500, prune_ratio=0.7, policy="uniform", num_epochs=5, warmup_epochs=1)
    assert work["uniform p=0.7"].train == sum(len(pruner.plan(e)) for e in range(5))
    assert work["epsilon_greedy p=0.7"].train == work["uniform p=0.7"].train
    assert step_budget(cfg, 500, 0.7) == 8 + 4 * 3               # 1 full epoch, 4 of k = 150


def test_planned_work_estimates_infobatch_and_the_ladder():
    cfg = BenchConfig(epochs=10, prune_ratios=(0.5,), methods=("full_short", "infobatch"))
    work = {w.what: w for w in planned_work(cfg, 1000, 100)}
    ib = work["infobatch p=0.5"]
    # epoch 0 all unseen, 1-7 pruned (700 below the mean, 350 of them kept), 8-9 annealed
    assert ib.train == 1000 + 7 * (300 + 350) + 2 * 1000 and not ib.exact
    ladder = work["ladder (upper estimate)"]
    # fractions 0.5 (covered by full_short), 0.6, 0.7, 0.8 of 80 steps: 48, 56, 64 steps
    assert ladder.train == step_budget_samples(48, 1000, 128) + \
        step_budget_samples(56, 1000, 128) + step_budget_samples(64, 1000, 128)


# ------------------------------------------------------------------------------ config helpers
def test_method_names_and_clock():
    assert base_method("ucb+refresh") == "ucb" and base_method("ucb") == "ucb"
    assert uses_refresh("infobatch+refresh") and not uses_refresh("infobatch")
    assert charged_clock("auto", "cpu") == "cpu" and charged_clock("auto", "cuda") == "wall"
    assert charged_clock("wall", "cpu") == "wall"
    with pytest.raises(ValueError, match="methods must be among"):
        BenchConfig(methods=("ucb+pass",))
    with pytest.raises(ValueError, match="refresh must be one of"):
        BenchConfig(refresh="none")
    assert BenchConfig(ladder=(0.5, 0.25)).ladder == (0.25, 0.5, 1.0)    # sorted, full added
    assert BenchConfig().replace(epochs=3).epochs == 3


# ------------------------------------------------------------------------------ schedules
def test_onecycle_factor_hand_values_and_torch_shape():
    assert onecycle_factor(0.0, 0.3) == pytest.approx(1 / 25)
    assert onecycle_factor(0.3, 0.3) == pytest.approx(1.0)
    assert onecycle_factor(0.15, 0.3) == pytest.approx((1 / 25 + 1) / 2)   # cosine midpoint
    assert onecycle_factor(0.65, 0.3) == pytest.approx((1 + 1 / 25e4) / 2)
    assert onecycle_factor(1.0, 0.3) == pytest.approx(1 / 25e4)
    # torch's OneCycleLR at step s of T is this curve at progress s / T within one step's shift
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    total = 1000
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total, pct_start=0.3,
                                                cycle_momentum=False)
    worst = 0.0
    for s in range(total):
        worst = max(worst, abs(opt.param_groups[0]["lr"] - onecycle_factor(s / total, 0.3)))
        opt.step()
        sched.step()
    assert worst < 0.006                       # max slope ~ pi / 2 / 300 per step
    assert schedule_factor("linear", 0.6, 0.2) == lr_factor(0.6, 0.2)
    with pytest.raises(ValueError, match="lr_schedule"):
        schedule_factor("cosine", 0.5, 0.1)


# ------------------------------------------------------------------------------ exploitation
def _exploit(losses, ids, full=False):
    return exploitation_of(losses, torch.tensor(ids, dtype=torch.int32), epoch=3, full=full)


def test_exploitation_of_hand_case():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])           # mean 4
    e = _exploit(losses, [4, 3])
    assert e["ratio"] == pytest.approx(7.0 / 4.0) and e["top"] == 1.0      # exactly the top 2
    e = _exploit(losses, [0, 4])
    assert e["ratio"] == pytest.approx(5.5 / 4.0) and e["top"] == 0.5
    e = _exploit(losses, [0, 1])
    assert e["ratio"] == pytest.approx(1.5 / 4.0) and e["top"] == 0.0
    e = _exploit(losses, [0, 1, 2, 3, 4], full=True)
    assert e == {"epoch": 3, "full": True, "ratio": pytest.approx(1.0), "top": 1.0}


# ------------------------------------------------------------------------------ keep schedule
def test_sched_methods_plan_the_keep_schedule_by_hand():
    # 4 epochs of 1000 samples: linear 0.8 -> 0.2 keeps 800, 600, 400, 200 (2000 samples, as
    # many as a constant 0.5), batch 100
    cfg = BenchConfig(epochs=4, batch_size=100, prune_ratios=(0.5,),
                      methods=("ucb", "ucb+sched", "uniform+sched"),
                      keep_schedule=("linear", 0.8, 0.2), equal_time=False)
    work = {w.what: w for w in planned_work(cfg, 1000, 100)}
    assert work["ucb+sched p=0.5"].train == 800 + 600 + 400 + 200 == work["ucb p=0.5"].train
    assert work["uniform+sched p=0.5"].train == 2000 and work["ucb+sched p=0.5"].exact
    assert cfg.methods == ("full", "uniform+sched", "ucb", "ucb+sched")
    with pytest.raises(ValueError, match=r"run the keep schedule: give keep_schedule"):
        BenchConfig(methods=("ucb+sched",))
    with pytest.raises(ValueError, match=r"keep\[0\] \(the schedule's shape\) must be one of"):
        BenchConfig(methods=("ucb+sched",), keep_schedule=("step", 0.8, 0.2))
    with pytest.raises(ValueError, match="methods must be among"):
        BenchConfig(methods=("infobatch+sched",), keep_schedule=("linear", 0.8, 0.2))


def test_infobatch_ablations_are_policies_by_hand():
    from gpuprune.bench.config import ALL_METHODS, make_policy
    cfg = BenchConfig(epochs=10, prune_ratios=(0.5,),
                      methods=("infobatch", "infobatch+norescale", "infobatch+noanneal"))
    assert make_policy("infobatch+norescale", cfg, None).rescale is False
    assert make_policy("infobatch+noanneal", cfg, None).delta == 1.0
    assert "infobatch+noanneal" not in ALL_METHODS
    work = {w.what: w for w in planned_work(cfg, 1000, 100)}
    # no annealing: epochs 8 and 9 pruned too (650 samples each, as epochs 1-7), not full
    assert work["infobatch+noanneal p=0.5"].train == 1000 + 9 * 650
    assert work["infobatch+norescale p=0.5"].train == work["infobatch p=0.5"].train

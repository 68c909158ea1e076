"""The coverage guard (issue 19, gpuprune/guard.py): a rank that trains fewer samples than planned
for it, or a plan again, warns with the cause and the fix; a correct loop does not.

In one process: hand-computed boundaries of both checks (the tolerance of one batch), each kind
once per run, the paths that must stay quiet (a loader dropping or padding its last batch, a
mid-epoch restore, a re-score pass, a loop that never observes), the DALI iterator (same
``EpochShard``). Over 2 gloo ranks: a torchrun-style loop (``DistributedDataParallel``,
``PrunedSampler``, ``set_epoch``) is quiet, and the same loop with its loader sharded again by
hand, or without ``set_epoch``, warns on every rank. The frameworks' own re-sharding (Lightning's
wrapper, ``accelerator.prepare``, the Trainer) is asserted in tests/test_integrations_*.py, and
the findings of issue 19 in tests/test_integrations_findings.py. On CUDA: 100 observes under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gpuprune as gp
from gpuprune.refresh import Refresher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from integrations_support import (again_on_observe, again_on_pass,  # noqa: E402
                                  coverage_warnings, run_script, short_warning)

N, BATCH = 200, 16


def pruner(**kw) -> gp.Pruner:
    return gp.Pruner(N, **{"keep": 0.5, "policy": "uniform", "num_epochs": 4, "seed": 1, **kw})


def loader_of(p, batch: int = BATCH, **kw) -> DataLoader:
    sampler_kw = {k: kw.pop(k) for k in ("num_replicas", "rank") if k in kw}
    data = gp.IndexedDataset(TensorDataset(torch.zeros(N, 1)))
    return DataLoader(data, batch_size=batch, sampler=p.sampler(**sampler_kw), **kw)


def train(p, loader, batches: int | None = None) -> list[int]:
    """One pass (or its first ``batches`` batches): observe each batch, return the ids trained."""
    got = []
    for i, (_, idx) in enumerate(loader):
        if batches is not None and i == batches:
            break
        p.observe(idx, torch.ones(len(idx)))
        got += idx.tolist()
    return got


def caught(fn) -> list[str]:
    """The CoverageWarning messages ``fn()`` raises."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always", gp.CoverageWarning)
        fn()
    return coverage_warnings(got)


# ---------------------------------------------------------------- too many: a plan trained again
def test_a_second_pass_without_set_epoch_warns_when_it_starts():
    p = pruner()
    loader = loader_of(p)

    def run():
        for _ in range(3):
            train(p, loader)
    assert caught(run) == [again_on_pass(0, 0)]                # once, at the second pass
    assert [h["epoch"] for h in p.history] == [0]


def test_a_plan_trained_again_warns_once_the_count_passes_the_plan_by_a_batch():
    """A new sampler every epoch, never set_epoch: each serves epoch 0's plan (100 samples, in
    batches of 16: 6 x 16 + 4). The count passes 100 + 16 at the second pass's second batch,
    132 samples; a count of 116 is still within the tolerance."""
    p = pruner()
    got = []

    def run():
        for _ in range(3):
            got.append(train(p, loader_of(p)))
            if len(got) == 1:
                assert p.coverage.observed == 100 and p.coverage.expected == 100
    assert caught(run) == [again_on_observe(0, 132, 0, 100)]
    assert got[0] == got[1] == got[2]                          # the finding: the same samples

    p = pruner()                                              # 100 + 16 samples: no warning
    assert caught(lambda: (train(p, loader_of(p)), train(p, loader_of(p), batches=1))) == []


def test_set_epoch_again_with_the_same_epoch_trains_it_twice_and_warns():
    p = pruner()
    loader = loader_of(p)

    def run():
        for epoch in (0, 0):
            loader.sampler.set_epoch(epoch)
            train(p, loader)
    assert caught(run) == [again_on_observe(0, 132, 0, 100)]


# ---------------------------------------------------------------- too few
@pytest.mark.parametrize("sizes, warns", [([16] * 5 + [5], False), ([16] * 5 + [4], True)])
def test_too_few_warns_below_the_plan_minus_the_largest_batch_less_one(sizes, warns):
    """This rank's share: 100 samples. Trained 85 = 100 - (16 - 1): quiet (a dropped last batch
    could explain it); 84: "trained 84 of the 100 samples planned for it in epoch 0 (84%)"."""
    p = pruner()
    sampler = p.sampler()
    ids = torch.tensor(list(sampler))                        # the pass: 100 ids

    def run():
        at = 0
        for b in sizes:
            p.observe(ids[at:at + b], torch.ones(b))
            at += b
        sampler.set_epoch(1)
    assert caught(run) == ([short_warning(0, sum(sizes), 100, 0)] if warns else [])


def test_each_kind_warns_once_per_run():
    p = pruner()
    loader = loader_of(p)

    def run():
        for epoch in range(4):
            loader.sampler.set_epoch(epoch)
            train(p, loader, batches=3)                      # 48 of 100 every epoch
    assert caught(run) == [short_warning(0, 48, 100, 0)]


def test_an_epoch_without_observations_or_without_a_loader_is_not_checked():
    """A loop that never calls observe (uniform pruning reads no loss), and epochs planned and
    trained without a loader (over pruner.plan(e).indices): nothing to compare, no warning."""
    p = pruner()
    loader = loader_of(p)

    def quiet():
        for epoch in range(4):
            loader.sampler.set_epoch(epoch)
            assert len([i for _, idx in loader for i in idx]) == 100
    assert caught(quiet) == []
    p = pruner()

    def by_hand():
        for epoch in range(4):
            ids = p.plan(epoch).indices[:10]                  # 10 of 100: no loader, no check
            p.observe(ids, torch.ones(10))
    assert caught(by_hand) == []


# ---------------------------------------------------------------- quiet when correct
@pytest.mark.parametrize("loader_kw", [{}, {"drop_last": True}, {"batch": 7}],
                         ids=["plain", "loader-drops-last-batch", "batch-7"])
def test_a_correct_loop_is_quiet(loader_kw):
    p = pruner(warmup_epochs=1, final_full_epochs=1, policy="ucb")
    loader = loader_of(p, **loader_kw)

    def run():
        for epoch in range(4):
            loader.sampler.set_epoch(epoch)
            assert len(train(p, loader)) >= len(loader.sampler) - loader.batch_size + 1
    assert caught(run) == []
    assert [h["epoch"] for h in p.history] == [0, 1, 2, 3]


def test_two_shards_in_one_process_are_counted_together():
    """Ranks simulated in one process (two samplers of 2 over one local Pruner, both trained):
    the guard expects both shares, 50 + 50; observing only one of them warns."""
    p = pruner()
    loaders = [loader_of(p, num_replicas=2, rank=r) for r in range(2)]

    def both():
        for epoch in range(2):
            for loader in loaders:
                loader.sampler.set_epoch(epoch)
                train(p, loader)
    assert caught(both) == []
    p = pruner()
    loaders = [loader_of(p, num_replicas=2, rank=r) for r in range(2)]

    def one():                                   # rank 1's batches are loaded, not observed
        for epoch in range(2):
            for loader in loaders:
                loader.sampler.set_epoch(epoch)
            train(p, loaders[0])
            assert len(list(loaders[1])) == 4
    assert caught(one) == [short_warning(0, 50, 100, 0)]


def test_a_mid_epoch_restore_expects_the_rest_of_the_epoch():
    """Resumed after 48 of epoch 1's 100 samples: the pass serves 52, and training them is
    quiet; training only 32 of them warns, counted against the 52."""
    for batches, want in ((None, []), (2, [short_warning(0, 32, 52, 1)])):
        p = pruner()
        loader = loader_of(p)
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            train(p, loader, batches=3 if epoch == 1 else None)
        state = {"pruner": p.state_dict(), "sampler": loader.sampler.state_dict(consumed=48)}

        q = pruner()
        q.load_state_dict(state["pruner"])
        resumed = loader_of(q)
        resumed.sampler.load_state_dict(state["sampler"])

        def run():
            for epoch in range(1, 3):
                resumed.sampler.set_epoch(epoch)
                train(q, resumed, batches=batches if epoch == 1 else None)
                if epoch == 1:
                    assert q.coverage.expected == 52
        assert caught(run) == want


def test_a_refresh_pass_is_not_counted_as_training():
    """Re-scored samples are observed with trained=False: an epoch trained in half still warns
    after a refresh pass over the other 100 samples (counted, they would hide it), and a whole
    epoch plus the refresh is quiet."""
    x, y = torch.zeros(N, 1), torch.zeros(N, dtype=torch.long)
    model = torch.nn.Linear(1, 2)
    for batches, want in ((None, []), (3, [short_warning(0, 48, 100, 1)])):
        p = pruner(policy="ucb")
        loader = loader_of(p)
        refresher = Refresher(p)

        def run():
            for epoch in range(3):
                result = refresher.run(model, (x, y), epoch)
                assert result.scored == (0 if epoch == 0 else 100)   # before epochs 1, 2
                loader.sampler.set_epoch(epoch)
                train(p, loader, batches=batches if epoch == 1 else None)
        assert caught(run) == want


# ---------------------------------------------------------------- the DALI iterator
def test_the_dali_iterator_is_counted_by_the_same_guard():
    """PrunedDALIIterator (real CPU pipeline): epochs counted up without set_epoch, with DROP and
    FILL (last batch dropped / padded with repeats) are quiet; a loop that takes 2 of each epoch's
    4 batches and abandons the rest with reset() warns."""
    pytest.importorskip("nvidia.dali")
    import numpy as np
    from gpuprune.dali import ArraySource, LastBatchPolicy, build_iterator

    def run(policy, batches=None, padded=False):
        p = pruner()
        source = ArraySource(np.arange(N, dtype=np.int64))
        kw = {"last_batch_padded": True} if padded else {}
        it = build_iterator(p, source, batch_size=30, num_threads=1, output_map=["id"],
                            last_batch_policy=policy, **kw)

        def loop():
            for _ in range(3):
                for k, (b,) in enumerate(it):
                    assert b["id"].tolist() == b["index"].tolist()
                    p.observe(b["index"], torch.ones(len(b["index"])))
                    if k + 1 == batches:
                        it.reset()
                        break
        return caught(loop), [h["epoch"] for h in p.history]

    for policy, padded in ((LastBatchPolicy.PARTIAL, False), (LastBatchPolicy.DROP, False),
                           (LastBatchPolicy.FILL, True)):
        assert run(policy, padded=padded) == ([], [0, 1, 2]), policy
    assert run(LastBatchPolicy.PARTIAL, batches=2) == ([short_warning(0, 60, 100, 0)], [0, 1, 2])


# ---------------------------------------------------------------- 2 gloo ranks
def ddp_worker(out: Path) -> None:
    """A torchrun-style DDP loop (DistributedDataParallel, PrunedSampler, set_epoch per epoch),
    then the same loop with its loader sharded again by hand (every other batch of this rank's
    share, as accelerate's BatchSamplerShard deals them) and without set_epoch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x = torch.randn(N, 4, generator=torch.Generator().manual_seed(0))
    y = (x.sum(1) > 0).long()
    data = gp.IndexedDataset(TensorDataset(x, y))
    record = {}
    for case in ("correct", "sharded again", "no set_epoch"):
        torch.manual_seed(0)
        model = DDP(torch.nn.Linear(4, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        p = gp.Pruner(N, keep=0.5, policy="ucb", num_epochs=3, warmup_epochs=1, seed=2)
        sampler = gp.PrunedSampler(p)
        loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always", gp.CoverageWarning)
            for epoch in range(3):
                if case != "no set_epoch":
                    sampler.set_epoch(epoch)
                for i, (xb, yb, idx) in enumerate(loader):
                    if case == "sharded again" and i % 2 == 1:
                        continue
                    loss = p.observe(idx, torch.nn.functional.cross_entropy(model(xb), yb,
                                                                            reduction="none"))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            p.synchronize()
        record[case] = {"warnings": coverage_warnings(got),
                        "epochs": [h["epoch"] for h in p.history]}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()                # every rank past its last collective before teardown
    dist.destroy_process_group()


def test_two_ranks_correct_loop_is_quiet_and_misuse_warns_on_every_rank(tmp_path):
    run_script([__file__, "--worker", str(tmp_path)], world_size=2, timeout=120)
    for rank in range(2):
        rec = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert rec["correct"] == {"warnings": [], "epochs": [0, 1, 2]}
        # epoch 0 is full: 100 per rank in batches 16 x 6 + 4; every other one: 16 x 3 + 4 = 52
        assert rec["sharded again"] == {"warnings": [short_warning(rank, 52, 100, 0)],
                                        "epochs": [0, 1, 2]}
        assert rec["no set_epoch"] == {"warnings": [again_on_pass(rank, 0)], "epochs": [0]}


def test_a_script_that_warns_fails_under_the_integration_tests_warning_filter(tmp_path):
    """The integration tests run every example with gpuprune's warnings as errors (so a quiet
    example is asserted by its run succeeding); this shows the filter turns a CoverageWarning in
    a subprocess into a failure naming it."""
    script = tmp_path / "no_set_epoch.py"
    script.write_text("import sys\nsys.path.insert(0, sys.argv[1])\nimport test_guard as t\n"
                      "p = t.pruner()\nloader = t.loader_of(p)\nt.train(p, loader)\n"
                      "t.train(p, loader)\n")
    with pytest.raises(AssertionError, match=r"rank 0 exited with 1") as err:
        run_script([str(script), str(Path(__file__).parent)])
    assert f"CoverageWarning: {again_on_pass(0, 0)}" in str(err.value)


# ---------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_the_guard_adds_no_host_sync_per_step(backend):
    """100 observes of a pass the guard counts (a sampler's pass, so both checks run on every
    batch) under set_sync_debug_mode("error"), on both backends: a host synchronisation would
    raise. The same mode raises for a deliberate .item(), so the check can fail."""
    if backend == "cuda":
        pytest.importorskip("cupy")
    dev = torch.device("cuda")
    p = gp.Pruner(100_000, keep=0.5, policy="uniform", num_epochs=2, device=dev, backend=backend)
    sampler = p.sampler()
    ids = torch.tensor(list(sampler), device=dev)             # begins the pass: 50,000 ids
    batches = [(ids[i * 128:(i + 1) * 128], torch.rand(128, device=dev)) for i in range(101)]
    p.observe(*batches[0])                                   # warm-up (first launches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for idx, loss in batches[1:]:
            p.observe(idx, loss)
        with pytest.raises(RuntimeError, match="synchroniz"):
            ids.sum().item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (p.coverage.observed, p.coverage.expected) == (101 * 128, 50_000)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True, metavar="OUT")
    ddp_worker(Path(ap.parse_args().worker))


@pytest.mark.parametrize("body, status, shown", [
    ("print('done')", 0, "done"), ("raise SystemExit(3)", 3, ""),
    ("raise ValueError('boom')", 1, "ValueError: boom"), ("import sys; sys.exit('why')", 1, "why")])
def test_the_launcher_of_multi_process_tests_keeps_the_exit_status(tmp_path, body, status, shown):
    """run_then_exit.py skips interpreter finalisation but not a failure: the status and the
    message a plain ``python script.py`` would give."""
    import subprocess
    script = tmp_path / "s.py"
    script.write_text(body + "\n")
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("run_then_exit.py")),
                        str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == status and shown in r.stdout + r.stderr

"""Hugging Face accelerate (from PyPI), 1 process and 2 processes over gloo on localhost.

The finding of issue 19 is first reproduced without the glue (``accelerator.prepare`` of a loader
over ``pruner.sampler()``: sharded again), then ``examples/accelerate_train.py`` (with
``prepare_data_loader`` and ``scheduler_steps``) is run as users run it. What was trained is what
the loop body received. Processes are started as torchrun starts them (RANK, WORLD_SIZE,
MASTER_ADDR/PORT), with this file as the worker script.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import gpuprune
from gpuprune.data import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from integrations_support import (EXAMPLES, assert_trained_exact_shards,  # noqa: E402
                                  coverage_warnings, dataset_size, read_records, run_script,
                                  shard, short_warning)

BATCH = 64
EPOCHS = 3


def num_samples() -> int:
    return dataset_size(2000)


def worker(out: Path, n: int) -> None:
    """accelerate's own recipe with gpuprune's sampler and nothing else: prepare the loader and a
    OneCycleLR sized as accelerate sizes schedules (the plans' steps times the processes)."""
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    d = load_dataset("auto")
    data = TensorDataset(d.x_train[:n].flatten(1).float().div_(255), d.y_train[:n])
    pruner = gpuprune.Pruner(n, keep=0.5, policy="uniform", num_epochs=EPOCHS, seed=5)
    loader = DataLoader(gpuprune.IndexedDataset(data), batch_size=BATCH, sampler=pruner.sampler())
    model = nn.Linear(data.tensors[0].shape[1], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    planned = pruner.total_steps(BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=planned * accelerator.num_processes)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    received, plans, steps = {}, {}, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gpuprune.CoverageWarning)
        for epoch in range(EPOCHS):
            for x, y, idx in loader:
                received.setdefault(epoch, []).extend(idx.tolist())
                accelerator.backward(pruner.observe(idx, F.cross_entropy(model(x), y,
                                                                         reduction="none")))
                opt.step()
                sched.step()
                opt.zero_grad()
                steps += 1
            plans[epoch] = pruner.current_plan.indices.tolist()
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps({
        "rank": accelerator.process_index, "received": received, "plans": plans,
        "coverage": coverage_warnings(caught),
        "optimizer_steps": steps, "planned_steps": planned,
        "scheduler_steps": sched.scheduler.last_epoch, "scheduler_total": sched.scheduler.total_steps}))
    accelerator.wait_for_everyone()      # every rank past its last collective before teardown
    accelerator.end_training()


def test_two_processes_prepare_shards_again(tmp_path):
    """Finding: with 2 processes, accelerator.prepare(loader) shards gpuprune's per-rank loader
    again: each rank trains ceil(half) of its shard's batches, padded (256 of 500 at N=2000), and
    takes half the optimizer steps (12 instead of 24); the scheduler never finishes. Now loud:
    each rank warns once, when epoch 1 is planned, that it trained 256 of its 500 samples."""
    n = num_samples()
    run_script([__file__, "--worker", str(tmp_path), str(n)], world_size=2, timeout=300)
    per_rank = -(-(n // 2) // 2)
    batches = -(-per_rank // BATCH)
    for r in range(2):
        rec = json.loads((tmp_path / f"rank{r}.json").read_text())
        for epoch in range(EPOCHS):
            mine = shard(rec["plans"][str(epoch)], r, 2)
            got = rec["received"][str(epoch)]
            assert len(mine) == per_rank
            assert len(got) == -(-batches // 2) * BATCH < per_rank    # even_batches pads
            assert set(got) < set(mine)
        assert rec["planned_steps"] == EPOCHS * batches
        assert 2 * rec["optimizer_steps"] == rec["planned_steps"]
        assert rec["scheduler_steps"] < rec["scheduler_total"]
        first = len(rec["received"]["0"])
        assert rec["coverage"] == [short_warning(r, first, per_rank, 0)]
        if n == 2000:
            assert (len(got), len(mine), rec["optimizer_steps"], rec["planned_steps"]) == \
                (256, 500, 12, 24)
            assert rec["coverage"][0].startswith("gpuprune: rank %d trained 256 of the 500 "
                                                 "samples planned for it in epoch 0 (51%%)" % r)


def test_two_processes_example_trains_every_shard_exactly(tmp_path):
    """examples/accelerate_train.py, 2 processes: every rank trains exactly its shard of each
    epoch's plan (warm-up epoch, then UCB), OneCycleLR gets exactly the steps accelerate gives it
    (2 per optimizer step), and the loop, which never calls set_epoch, plans every epoch."""
    n = num_samples()
    run_script([str(EXAMPLES / "accelerate_train.py"), "--limit", str(n), "--record",
                str(tmp_path)], world_size=2, timeout=300)
    records = read_records(tmp_path, 2)
    assert_trained_exact_shards(records, EPOCHS)
    steps = -(-(-(-n // 2)) // BATCH) + 2 * -(-(-(-(n // 2) // 2)) // BATCH)
    for rec in records:
        assert rec["optimizer_steps"] == steps
        assert rec["scheduler_steps"] == rec["scheduler_total"] == 2 * steps
        assert rec["history_epochs"] == [0, 1, 2]


def test_one_process_example_and_accelerate_defaults(tmp_path):
    """One process: accelerate shards nothing, so both the default recipe (no glue) and the
    example train every planned sample with exact step counts."""
    n = num_samples()
    run_script([__file__, "--worker", str(tmp_path / "default"), str(n)], timeout=300)
    rec = json.loads((tmp_path / "default" / "rank0.json").read_text())
    for epoch in range(EPOCHS):
        assert rec["received"][str(epoch)] == rec["plans"][str(epoch)]
    assert rec["coverage"] == []
    assert rec["optimizer_steps"] == rec["planned_steps"] == rec["scheduler_steps"]

    run_script([str(EXAMPLES / "accelerate_train.py"), "--limit", str(n), "--record",
                str(tmp_path / "example")], timeout=300)
    (rec,) = read_records(tmp_path / "example", 1)
    assert_trained_exact_shards([rec], EPOCHS)
    assert rec["optimizer_steps"] == rec["scheduler_steps"] == rec["scheduler_total"] \
        == -(-n // BATCH) + 2 * -(-(n // 2) // BATCH)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)       # accelerate's own reset between tests


def test_prepare_data_loader_refuses_what_it_cannot_fix(accelerator):
    from gpuprune.integrations.accelerate import prepare_data_loader, scheduler_steps
    data = gpuprune.IndexedDataset(TensorDataset(torch.zeros(40, 2), torch.zeros(40)))
    pruner = gpuprune.Pruner(40, keep=0.5, policy="uniform", num_epochs=2)
    with pytest.raises(ValueError, match="does not draw from a gpuprune PrunedSampler"):
        prepare_data_loader(accelerator, DataLoader(data, batch_size=4))
    prepared = accelerator.prepare(DataLoader(data, batch_size=4, sampler=pruner.sampler()))
    with pytest.raises(ValueError, match="already prepared by accelerate, which shards"):
        prepare_data_loader(accelerator, prepared)
    other = DataLoader(data, batch_size=4, sampler=pruner.sampler(num_replicas=2, rank=1))
    with pytest.raises(ValueError, match="deals shard 1 of 2, but this is process 0 of 1"):
        prepare_data_loader(accelerator, other)
    with pytest.raises(TypeError, match="accelerator must be an accelerate.Accelerator"):
        prepare_data_loader(object(), DataLoader(data, batch_size=4, sampler=pruner.sampler()))
    loader = prepare_data_loader(accelerator, DataLoader(data, batch_size=4, sampler=pruner.sampler()))
    assert accelerator.prepare(loader) is loader                  # left alone by prepare
    assert scheduler_steps(accelerator, pruner, 4) == pruner.total_steps(4) == 5 + 5
    info = gpuprune.Pruner(40, policy="infobatch", num_epochs=2)
    with pytest.raises(ValueError, match="pass upper_bound=True"):
        scheduler_steps(accelerator, info, 4)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2, required=True, metavar=("OUT", "N"))
    a = ap.parse_args()
    Path(a.worker[0]).mkdir(parents=True, exist_ok=True)
    worker(Path(a.worker[0]), int(a.worker[1]))

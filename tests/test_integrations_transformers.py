"""The Hugging Face Trainer (transformers from PyPI), 1 process and 2 processes over gloo.

Each finding is first reproduced with the Trainer as a user would adapt it without the glue (a
subclass whose ``_get_train_sampler`` returns ``pruner.sampler()`` and whose ``compute_loss``
calls ``pruner.observe``), then ``examples/transformers_train.py`` (``PruningTrainer``) is run as
users run it. What was trained is the ids whose losses reached ``pruner.observe``. The model is a
tiny ViT built from a config in code (no download).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import gpuprune

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from integrations_support import (EXAMPLES, assert_trained_exact_shards,  # noqa: E402
                                  coverage_warnings, dataset_size, read_records, run_script,
                                  shard, short_warning)

BATCH = 64
EPOCHS = 3


def num_samples() -> int:
    return dataset_size(2000)


def batches(n: int) -> int:
    return -(-n // BATCH)


# ------------------------------------------------------------------ the Trainer without the glue
def worker(out: Path, n: int, warmup: int, accumulate: int) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers_train import Images, tiny_vit
    import torch.nn.functional as F

    class WithIndex(Dataset):
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            return {**self.ds[i], "idx": i}

    received, plans, epoch = {}, {}, [-1]

    class NaiveTrainer(Trainer):      # what a user writes from the Trainer's docs
        def _get_train_sampler(self, dataset=None):
            return pruner.sampler()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            idx = inputs.pop("idx")
            labels = inputs.pop("labels")
            received.setdefault(epoch[0], []).extend(idx.tolist())
            out = model(**inputs)
            loss = pruner.observe(idx, F.cross_entropy(out.logits, labels, reduction="none"))
            return (loss, out) if return_outputs else loss

    class Epochs(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            epoch[0] += 1

        def on_epoch_end(self, args, state, control, **kwargs):
            plans[epoch[0]] = pruner.current_plan.indices.tolist()

    data = Images(n)
    torch.manual_seed(0)
    model = tiny_vit(data[0]["pixel_values"])
    args = TrainingArguments(output_dir=str(out / "trainer"), num_train_epochs=EPOCHS,
                             per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=accumulate, use_cpu=True,
                             save_strategy="no", report_to=[], disable_tqdm=True,
                             remove_unused_columns=False)      # else the collator drops "idx"
    pruner = gpuprune.Pruner(n, keep=0.5, policy="uniform", num_epochs=EPOCHS,
                             warmup_epochs=warmup, seed=7)
    trainer = NaiveTrainer(model=model, args=args, train_dataset=WithIndex(data),
                           callbacks=[Epochs()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gpuprune.CoverageWarning)
        trainer.train()
    rank = args.process_index
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "received": received, "plans": plans, "coverage": coverage_warnings(caught),
        "optimizer_steps": trainer.state.global_step, "max_steps": trainer.state.max_steps,
        "scheduler_steps": trainer.lr_scheduler.last_epoch,
        "planned_steps": sum(-(-batches(len(shard(plans[e], rank, args.world_size))) // accumulate)
                             for e in range(EPOCHS))}))
    # every rank past its last collective, then the process group ends before the interpreter
    # (a gloo rank torn down while its peer still talks to it can abort at exit)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


@pytest.mark.slow
def test_two_processes_trainer_shards_gpuprunes_sampler_again(tmp_path):
    """Finding: with 2 processes the Trainer's accelerator.prepare shards the loader over
    pruner.sampler() again: each rank trains about half its shard (256 of 500 at N=2000). Now
    loud: each rank warns once, when epoch 1 is planned, naming PruningTrainer."""
    n = num_samples()
    run_script([__file__, "--worker", str(tmp_path), str(n), "0", "1"], world_size=2, timeout=180)
    per_rank = -(-(n // 2) // 2)
    for r in range(2):
        rec = json.loads((tmp_path / f"rank{r}.json").read_text())
        for epoch in range(EPOCHS):
            mine = shard(rec["plans"][str(epoch)], r, 2)
            got = rec["received"][str(epoch)]
            assert len(mine) == per_rank
            assert len(got) == -(-batches(per_rank) // 2) * BATCH < per_rank
            assert set(got) < set(mine)
        assert 2 * rec["optimizer_steps"] == rec["planned_steps"]
        assert rec["coverage"] == [short_warning(r, len(rec["received"]["0"]), per_rank, 0)]
        if n == 2000:
            assert (len(got), len(mine)) == (256, 500)


def test_one_process_trainer_sizes_every_epoch_by_the_first():
    """Finding: one process, a full warm-up epoch, gradient accumulation 3: the Trainer sizes
    max_steps (the LR schedule) as 3 x epoch 0's steps, and in the shorter pruned epochs the last,
    incomplete accumulation never steps (it is due at epoch 0's last batch)."""
    import tempfile
    n = num_samples()
    with tempfile.TemporaryDirectory() as tmp:
        run_script([__file__, "--worker", tmp, str(n), "1", "3"], timeout=180)
        rec = json.loads((Path(tmp) / "rank0.json").read_text())
    full, pruned = batches(n), batches(n // 2)
    assert rec["max_steps"] == EPOCHS * -(-full // 3)                    # 3 x 11 at N=2000
    assert rec["planned_steps"] == -(-full // 3) + 2 * -(-pruned // 3)   # 11 + 6 + 6
    assert rec["optimizer_steps"] == -(-full // 3) + 2 * (pruned // 3)   # 11 + 5 + 5
    assert rec["scheduler_steps"] == rec["optimizer_steps"] < rec["max_steps"]
    for epoch in range(EPOCHS):                                          # the data itself is right
        assert rec["received"][str(epoch)] == rec["plans"][str(epoch)]
    assert rec["coverage"] == []                             # so the guard has nothing to say


@pytest.mark.slow
def test_two_processes_example_trains_every_shard_exactly(tmp_path):
    """examples/transformers_train.py (PruningTrainer), 2 processes: every rank trains exactly its
    shard of each epoch's plan (warm-up, then UCB), max_steps and the LR schedule are exactly the
    optimizer steps that run, and every epoch was planned from 0."""
    n = min(1000, num_samples())
    run_script([str(EXAMPLES / "transformers_train.py"), "--limit", str(n), "--record",
                str(tmp_path)], world_size=2, timeout=180)
    records = read_records(tmp_path, 2)
    assert_trained_exact_shards(records, EPOCHS)
    steps = batches(-(-n // 2)) + 2 * batches(-(-(n // 2) // 2))
    for rec in records:
        assert rec["optimizer_steps"] == rec["scheduler_steps"] == rec["scheduler_total"] == steps
        assert rec["history_epochs"] == [0, 1, 2]


@pytest.mark.slow
def test_one_process_example_with_gradient_accumulation(tmp_path):
    """PruningTrainer with accumulation 3 after a full warm-up: every epoch trains its whole plan,
    each ends on an optimizer step, and max_steps is the real count (11 + 6 + 6 at N=2000)."""
    n = num_samples()
    run_script([str(EXAMPLES / "transformers_train.py"), "--limit", str(n), "--accumulate", "3",
                "--record", str(tmp_path)], timeout=180)
    (rec,) = read_records(tmp_path, 1)
    assert_trained_exact_shards([rec], EPOCHS)
    steps = -(-batches(n) // 3) + 2 * -(-batches(n // 2) // 3)
    assert rec["optimizer_steps"] == rec["scheduler_steps"] == rec["scheduler_total"] == steps


# ------------------------------------------------------------------ in-process: losses and errors
def test_per_sample_cross_entropy_hand_computed():
    from gpuprune.integrations.transformers import per_sample_cross_entropy
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    got = per_sample_cross_entropy({"logits": logits}, torch.tensor([0, 1]))
    ln2 = torch.log(torch.tensor(2.0))
    assert torch.allclose(got, torch.stack([ln2, torch.log1p(torch.exp(torch.tensor(2.0)))]))
    # tokens: sample 0 has targets at t=0 (uniform: ln 2) and t=2 (certain-ish), sample 1 none
    tok = torch.tensor([[[0.0, 0.0], [5.0, 5.0], [9.0, -9.0]], [[1.0, 2.0]] * 3])
    labels = torch.tensor([[1, -100, 0], [-100, -100, -100]])
    got = per_sample_cross_entropy((tok,), labels)
    want0 = (ln2 + torch.nn.functional.cross_entropy(tok[0, 2:], labels[0, 2:])) / 2
    assert torch.allclose(got, torch.stack([want0, torch.tensor(0.0)]))
    # causal shift: position t predicts label t + 1
    got = per_sample_cross_entropy((tok[:1],), torch.tensor([[-100, 0, 1]]), shift=True)
    want = torch.nn.functional.cross_entropy(tok[0, :2], torch.tensor([0, 1]))
    assert torch.allclose(got, want.unsqueeze(0))
    with pytest.raises(TypeError, match="pass PruningTrainer\\(per_sample_loss=fn\\)"):
        per_sample_cross_entropy((torch.zeros(2, 3, 4, 5),), torch.zeros(2, dtype=torch.long))


@pytest.fixture
def trainer_parts(tmp_path):
    from accelerate.state import AcceleratorState
    from transformers import TrainingArguments
    from transformers_train import Images, tiny_vit
    data = Images(96)
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2,
                             per_device_train_batch_size=32, use_cpu=True, save_strategy="no",
                             report_to=[], disable_tqdm=True)
    yield data, tiny_vit(data[0]["pixel_values"]), args
    AcceleratorState._reset_state(True)


def test_compute_loss_is_observes_mean_of_per_sample_losses(trainer_parts):
    """One training batch through PruningTrainer.compute_loss: the returned loss is the mean of
    the per-sample cross-entropies of the model's logits, and exactly those losses were recorded
    for exactly those ids (InfoBatch, decay 0: the statistics hold the last loss)."""
    from gpuprune.integrations.transformers import INDEX_KEY, PruningTrainer
    data, model, args = trainer_parts
    pruner = gpuprune.Pruner(len(data), policy="infobatch", num_epochs=2)
    trainer = PruningTrainer(model=model, args=args, train_dataset=data, pruner=pruner)
    loader = trainer.get_train_dataloader()
    loader.set_epoch(0)
    batch = next(iter(loader))
    ids = batch[INDEX_KEY].clone()
    assert ids.tolist() == pruner.plan(0).indices[:32].tolist()
    loss = trainer.compute_loss(model, batch)
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(
            model(pixel_values=torch.stack([data[i]["pixel_values"] for i in ids])).logits,
            torch.stack([data[i]["labels"] for i in ids]), reduction="none")
    assert torch.allclose(loss, want.mean(), atol=1e-6)
    assert torch.allclose(pruner.stats.mean[ids.long()], want, atol=1e-6)


def test_pruning_trainer_refuses_what_does_not_fit(trainer_parts):
    from gpuprune.integrations.transformers import PruningTrainer
    data, model, args = trainer_parts
    with pytest.raises(ValueError, match=r"num_train_epochs=2\) differs from the Pruner's "
                                         r"num_epochs=3: pass num_train_epochs=3"):
        PruningTrainer(model=model, args=args, train_dataset=data,
                       pruner=gpuprune.Pruner(len(data), num_epochs=3))
    with pytest.raises(ValueError, match="train_dataset has 96 samples, the Pruner num_samples=95"):
        PruningTrainer(model=model, args=args, train_dataset=data,
                       pruner=gpuprune.Pruner(95, num_epochs=2))
    with pytest.raises(TypeError, match="pruner must be a gpuprune.Pruner, got int"):
        PruningTrainer(model=model, args=args, train_dataset=data, pruner=3)
    args.max_steps = 5                              # the run has 2 + 2 steps (48 of 96, by 32)
    trainer = PruningTrainer(model=model, args=args, train_dataset=data,
                             pruner=gpuprune.Pruner(len(data), policy="uniform", num_epochs=2))
    with pytest.raises(ValueError, match=r"max_steps=5\) is more than the 4 optimizer steps of "
                                         r"this pruned run's 2 epochs"):
        trainer.train()
    args.max_steps = 3                              # stopping earlier is allowed
    pruner = gpuprune.Pruner(len(data), policy="uniform", num_epochs=2)
    trainer = PruningTrainer(model=model, args=args, train_dataset=data, pruner=pruner)
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.state.max_steps == 3

    class Pairs(Dataset):
        def __len__(self):
            return 96

        def __getitem__(self, i):
            return data[i]["pixel_values"], data[i]["labels"]

    args.max_steps = -1
    trainer = PruningTrainer(model=model, args=args, train_dataset=Pairs(),
                             pruner=gpuprune.Pruner(96, num_epochs=2))
    with pytest.raises(TypeError, match="needs dataset items that are dicts"):
        trainer.train()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=4, required=True, metavar=("OUT", "N", "WARMUP", "ACCUMULATE"))
    a = ap.parse_args()
    worker(Path(a.worker[0]), *map(int, a.worker[1:]))

"""Shared by tests/test_integrations_*.py: local multi-process launches and the per-rank checks.

Every check counts what the model received (the sample ids reaching ``training_step`` /
``compute_loss`` / the loop body, recorded by the scripts), never gpuprune's own bookkeeping, and
compares it with each epoch's plan sharded by an independent formula.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def dataset_size(limit: int) -> int:
    """``limit`` training images when Fashion-MNIST is installed (the issue's figures use 2000 and
    6000), else as many as scikit-learn's digits has, if fewer."""
    from gpuprune.data import load_dataset
    return min(limit, len(load_dataset("auto").y_train))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: PYTHONWARNINGS that makes every gpuprune UserWarning (``gpuprune.CoverageWarning``'s messages
#: start with "gpuprune:") an error, so a script that trains the wrong samples fails. The category
#: is named by the message's start: a filter naming ``gpuprune.CoverageWarning`` itself would be
#: ignored at interpreter start-up, where gpuprune cannot be imported yet
WARNINGS_AS_ERRORS = "error:gpuprune:UserWarning"

#: the end of the warning that a rank trained too few of its samples (gpuprune/guard.py), written
#: out here so the tests check the text users read
SHORT_FIXES = (
    "Something shards the loader again or ends its epochs early: PyTorch Lightning with a sampler "
    "that is not a DistributedSampler (its DistributedSamplerWrapper), or without "
    "gpuprune.integrations.lightning.PruningCallback (it cuts every epoch to the first one's "
    "length); accelerator.prepare(loader) with several processes; the Hugging Face Trainer's own "
    "loader; a break or limit_train_batches. Pass sampler=pruner.sampler() itself and "
    "callbacks=[PruningCallback()] (Lightning), prepare the loader with "
    "gpuprune.integrations.accelerate.prepare_data_loader (accelerate), use "
    "gpuprune.integrations.transformers.PruningTrainer (Trainer); see docs/integrations.md.")


def short_warning(rank: int, trained: int, planned: int, epoch: int) -> str:
    """The coverage guard's whole message for a rank that trained ``trained`` of its ``planned``
    samples of ``epoch``."""
    return (f"gpuprune: rank {rank} trained {trained} of the {planned} samples planned for it in "
            f"epoch {epoch} ({round(100 * trained / planned)}%). {SHORT_FIXES}")


#: how to call set_epoch, the end of the warnings about a plan trained again
SET_EPOCH = ("Call loader.sampler.set_epoch(epoch) before each epoch (epochs count from 0, as "
             "with DistributedSampler), on one sampler kept for the whole run.")


def again_on_pass(rank: int, epoch: int) -> str:
    """The warning when a loader starts a second pass over ``epoch`` without set_epoch."""
    return (f"gpuprune: rank {rank}'s loader starts another pass over epoch {epoch}'s plan without "
            f"set_epoch, so it trains epoch {epoch}'s samples again: a loop that never calls "
            f"set_epoch trains epoch {epoch}'s samples in every epoch. {SET_EPOCH}")


def again_on_observe(rank: int, observed: int, epoch: int, planned: int) -> str:
    """The warning when a rank's count passes its ``planned`` samples by more than a batch."""
    return (f"gpuprune: rank {rank} observed {observed} samples in epoch {epoch}, whose plan gives "
            f"it {planned}: the same plan is being trained again (the loop iterates the loader "
            f"again without set_epoch, or set_epoch({epoch}) was called again), so every epoch "
            f"trains epoch {epoch}'s samples. {SET_EPOCH}")


def run_script(args: list[str], *, world_size: int = 1, timeout: float = 300.0,
               cwd: Path | None = None) -> list[str]:
    """Run ``python args...`` as ``world_size`` processes of one local process group (the
    environment torchrun sets: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; gloo on CPU), or as
    one plain process for ``world_size=1``, with gpuprune's warnings as errors
    (:data:`WARNINGS_AS_ERRORS`: a script that expects one records it itself). Returns each
    process's output; raises AssertionError with the output of a process that failed or ran past
    ``timeout`` seconds. Each process runs through ``run_then_exit.py``, which keeps the script's
    exit status but skips interpreter finalisation (a gloo teardown abort lives there)."""
    base = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            # nothing may come from the Hugging Face hub: models are built from configs in code
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONWARNINGS": WARNINGS_AS_ERRORS}
    envs = [base]
    if world_size > 1:
        port = str(free_port())
        envs = [{**base, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r),
                 "LOCAL_RANK": str(r), "WORLD_SIZE": str(world_size),
                 "LOCAL_WORLD_SIZE": str(world_size)} for r in range(world_size)]
    launcher = str(Path(__file__).with_name("run_then_exit.py"))   # skips finalisation: see there
    procs = [subprocess.Popen([sys.executable, launcher, *args], env=env, cwd=cwd or REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for env in envs]
    outputs, failed = [], []
    for rank, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            failed.append(f"rank {rank} ran past {timeout} s")
        else:
            if p.returncode != 0:
                failed.append(f"rank {rank} exited with {p.returncode}")
        outputs.append(out)
    if failed:
        raise AssertionError("; ".join(failed) + "\n" + "\n".join(
            f"--- rank {r} output (last 4000 characters):\n{o[-4000:]}" for r, o in enumerate(outputs)))
    return outputs


def read_records(folder: Path, world_size: int) -> list[dict]:
    """``folder/rank<r>.json`` of every rank, in rank order."""
    records = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world_size)]
    for rec in records:
        rec["received"] = {int(e): ids for e, ids in rec["received"].items()}
        rec["plans"] = {int(e): ids for e, ids in rec["plans"].items()}
    return records


def shard(plan: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of a plan as DistributedSampler deals one (written out here, not
    gpuprune's code): pad by wrapping around to a multiple of ``world_size``, take every
    ``world_size``-th entry from ``rank``."""
    padded = plan + plan[:(-len(plan)) % world_size]
    return padded[rank::world_size]


def assert_trained_exact_shards(records: list[dict], epochs: int) -> None:
    """Every rank received exactly its shard of every epoch's plan, in plan order."""
    world = len(records)
    plans = records[0]["plans"]
    assert sorted(plans) == list(range(epochs)), f"plans recorded for epochs {sorted(plans)}"
    for rec in records:
        assert rec["plans"] == plans, "the ranks recorded different plans"
        assert sorted(rec["received"]) == list(range(epochs))
        for epoch in range(epochs):
            want = shard(plans[epoch], rec["rank"], world)
            got = rec["received"][epoch]
            assert got == want, (f"rank {rec['rank']} epoch {epoch}: received {len(got)} samples, "
                                 f"its shard of the plan has {len(want)}")


def coverage_warnings(caught) -> list[str]:
    """The messages of the ``gpuprune.CoverageWarning`` warnings among those caught with
    ``warnings.catch_warnings(record=True)``."""
    import gpuprune
    return [str(w.message) for w in caught if issubclass(w.category, gpuprune.CoverageWarning)]

"""``Pruner.observe`` inside ``torch.compile`` (issue 19): a compiled step records the same
statistics as an eager one, bit for bit; ``fullgraph=True`` compiles; the custom ops of
:mod:`gpuprune.library` pass ``torch.library.opcheck``; the coverage guard counts compiled steps.

"The same as eager" is checked by replay: a compiled run records the ids and per-sample losses each
step fed to ``observe`` (a compiled model's losses may differ from an eager model's in the last bit,
which is the model's business, not gpuprune's), then an eager Pruner built alike plans the same
epochs and observes the same batches; plans, statistics and saved state must be equal.

Every compiling case compiles tiny functions with inductor (``dynamic=False``) after
``torch._dynamo.reset()``; the CUDA case is marked ``gpu`` and skips without one.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import gpuprune as gp
from gpuprune.backend import KernelBackend, TorchBackend
from gpuprune.library import OPS_AVAILABLE
from gpuprune.stats import LossStats, StatsTensors

pytestmark = pytest.mark.skipif(not OPS_AVAILABLE, reason="torch.library.custom_op needs torch >= 2.4")

N = 48


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pruner(policy: str = "ucb", **kw) -> gp.Pruner:
    return gp.Pruner(N, keep=0.5, policy=policy, num_epochs=kw.pop("num_epochs", 4), seed=3,
                     backend=kw.pop("backend", "torch"), **kw)


def _assert_same_state(got: gp.Pruner, want: gp.Pruner) -> None:
    """Statistics (every tensor, bit for bit) and the whole saved state equal."""
    a, b = got.stats.state_dict(), want.stats.state_dict()
    for name in b:
        assert torch.equal(a[name], b[name]), name
    assert got.state_dict()["checksum"] == want.state_dict()["checksum"]


def _replay(make, log: list[tuple[int, torch.Tensor, torch.Tensor]]
            ) -> tuple[gp.Pruner, list[torch.Tensor], list[gp.Plan]]:
    """An eager Pruner from ``make()`` fed ``log``'s (epoch, ids, losses): planned as the compiled
    run planned, observing the same batches. Returns it, what each observe returned, its plans."""
    pruner, returned, plans = make(), [], []
    for epoch, ids, losses in log:
        if pruner.current_plan is None or pruner.current_plan.epoch != epoch:
            plans.append(pruner.plan(epoch))
        returned.append(pruner.observe(ids, losses))
    return pruner, returned, plans


def _batches(plan: gp.Plan, size: int = 8):
    for i in range(0, len(plan), size):
        yield plan.indices[i:i + size]


# ---------------------------------------------------------------- a compiled training step
@pytest.mark.parametrize("policy", ["infobatch", "ucb"])
def test_compiled_training_step_records_what_eager_records(policy):
    """``torch.compile(step)`` around forward, ``observe``, backward and the optimizer step:
    InfoBatch's rescaled weights enter the returned loss, UCB's plans depend on every statistic."""
    torch.manual_seed(0)
    x_all, y_all = torch.randn(N, 4), torch.randint(0, 3, (N,))
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    def make() -> gp.Pruner:
        return _pruner(policy)
    pruner = make()

    def step(ids, x, y):
        losses = F.cross_entropy(model(x), y, reduction="none")
        loss = pruner.observe(ids, losses)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach(), losses.detach()

    compiled = torch.compile(step, dynamic=False)
    log, returned, plans = [], [], []
    for epoch in range(4):
        plan = pruner.plan(epoch)
        plans.append(plan)
        for ids in _batches(plan):
            loss, losses = compiled(ids, x_all[ids.long()], y_all[ids.long()])
            log.append((epoch, ids, losses))
            returned.append(loss)
    eager, eager_returned, eager_plans = _replay(make, log)
    assert sum(len(p) < N for p in plans) >= 2                  # pruned epochs happened
    if policy == "infobatch":                                    # and rescaled some losses
        assert any(p.rescaled is not None and bool(p.weights.ne(1).any()) for p in plans)
    for got, want in zip(plans, eager_plans, strict=True):
        assert torch.equal(got.indices, want.indices)
    _assert_same_state(pruner, eager)
    # the returned mean is inductor's reduction: equal to eager's up to its rounding
    torch.testing.assert_close(torch.stack(returned), torch.stack(eager_returned).detach(),
                               rtol=1e-6, atol=0)
    assert pruner.coverage.observed == eager.coverage.observed == len(pruner.current_plan)


# ---------------------------------------------------------------- fullgraph
def _batch_log(pruner: gp.Pruner, epochs: int, nan_at: int = 5):
    """Each epoch's full batches of 8 (one static shape: a short last one would compile again)
    with a repeated id (ids[1] = ids[0]: a duplicate merged as one group) and seeded losses; batch
    ``nan_at`` holds a NaN. Plans as it goes."""
    g = torch.Generator().manual_seed(7)
    for epoch in range(epochs):
        plan = pruner.plan(epoch)
        for ids in _batches(plan):
            if len(ids) < 8:
                continue
            ids = ids.clone()
            ids[1] = ids[0]
            losses = torch.rand(8, generator=g) * 3
            if nan_at == 0:
                losses[2] = float("nan")
            nan_at -= 1
            yield epoch, ids, losses


@pytest.mark.parametrize("policy, graphs", [("ucb", 1), ("infobatch", 2)])
def test_fullgraph_compiles_once_per_kind_of_plan_and_records_what_eager_records(policy, graphs):
    """``fullgraph=True`` on the torch backend: no graph break, one compilation for all epochs
    (the epoch is a tensor, not a specialised int) per kind of plan (InfoBatch: its rescaled
    pruned epochs, and the annealing full one), bit-identical statistics with duplicates and a NaN
    (skipped and counted, never in the statistics; it reaches the returned loss)."""
    def make() -> gp.Pruner:
        return _pruner(policy, num_epochs=5)
    pruner = make()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(pruner.observe, backend=counter, fullgraph=True, dynamic=False)
    log, returned = [], []
    for epoch, ids, losses in _batch_log(pruner, 5):
        returned.append(compiled(ids, losses))
        log.append((epoch, ids, losses))
    assert counter.frame_count == graphs
    eager, eager_returned, plans = _replay(make, log)
    assert sum(p.rescaled is not None for p in plans) == (4 if policy == "infobatch" else 0)
    _assert_same_state(pruner, eager)
    assert int(pruner.stats.nonfinite) == 1
    assert torch.isfinite(pruner.stats.mean).all() and torch.isfinite(pruner.stats.var).all()
    assert [bool(r.isnan()) for r in returned] == [bool(r.isnan()) for r in eager_returned]
    assert sum(bool(r.isnan()) for r in returned) == 1
    torch.testing.assert_close(torch.stack(returned), torch.stack(eager_returned),
                               rtol=1e-6, atol=0, equal_nan=True)
    assert pruner.stats.last_epoch.max() == 4          # written under the epoch of the run


def test_compiled_observe_refuses_what_eager_refuses():
    """Metadata checks run while tracing (with fullgraph=True dynamo wraps the same message in
    ``Unsupported``); a CPU id out of range raises from the op at run time, changing nothing."""
    pruner = _pruner()
    pruner.plan(0)
    ids = pruner.current_plan.indices[:8]
    loose = torch.compile(pruner.observe, dynamic=False)
    with pytest.raises(ValueError, match=r"per_sample_loss must be 1-D"):
        loose(ids, torch.rand(8, 1))
    with pytest.raises(TypeError, match=r"indices must have an integer dtype"):
        loose(ids.float(), torch.rand(8))
    torch._dynamo.reset()
    strict = torch.compile(pruner.observe, fullgraph=True, dynamic=False)
    with pytest.raises(Exception, match=r"per_sample_loss must be 1-D"):
        strict(ids, torch.rand(8, 1))
    before = pruner.stats.state_dict()
    for bad in (N, -1):
        with pytest.raises(ValueError, match=rf"indices must lie in \[0, {N}\), got an index {bad}"):
            strict(torch.tensor([0, 1, bad, 3, 4, 5, 6, 7], dtype=ids.dtype), torch.rand(8))
    after = pruner.stats.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert pruner.coverage.observed == 0


# ---------------------------------------------------------------- the coverage guard
def test_compiled_steps_are_counted_by_the_coverage_guard():
    """The guard's host counter advances at run time in every compiled call (not frozen at trace
    time), trained=False is not counted, and its warning about a plan trained again still fires."""
    pruner = _pruner("uniform")
    sampler = pruner.sampler()
    sampler.set_epoch(0)
    served = list(sampler)                           # the loader's pass: 24 samples expected
    assert len(served) == pruner.coverage.expected == 24
    compiled = torch.compile(pruner.observe, fullgraph=True, dynamic=False)
    ids = torch.tensor(served[:8], dtype=pruner.current_plan.indices.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gp.CoverageWarning)
        for i in range(3):
            compiled(torch.tensor(served[8 * i:8 * i + 8], dtype=ids.dtype), torch.rand(8))
            assert pruner.coverage.observed == 8 * (i + 1)
        compiled(ids, torch.rand(8), trained=False)
        assert pruner.coverage.observed == 24
        compiled(ids, torch.rand(8))                 # 32 <= 24 + one batch of slack: quiet
    with pytest.warns(gp.CoverageWarning, match=r"observed 40 samples in epoch 0"):
        compiled(ids, torch.rand(8))
    assert pruner.coverage.observed == 40


# ---------------------------------------------------------------- the custom ops
def _op_args(n: int = 10, ids=(3, 0, 3, 7, 9, 3), losses=(1.0, 2.0, float("nan"), 0.5, 4.0, 2.5),
             dtype=torch.int64):
    stats = LossStats(n)
    stats.mean[7], stats.var[7], stats.last_epoch[7] = 1.5, 0.25, 0    # one sample seen before
    return (*stats.tensors(), torch.tensor(ids, dtype=dtype), torch.tensor(losses), 0.9,
            torch.tensor(2), "torch")


@pytest.mark.parametrize("ids, last", [
    ((3, 0, 3, 7, 9, 3), [2, -1, -1, 2, -1, -1, -1, 2, -1, 2]),    # id 3 three times (NaN once)
    ((3, 0, 5, 7, 9, 1), [2, 2, -1, 2, -1, -1, -1, 2, -1, 2]),     # distinct: the numpy fast path
], ids=["repeated", "distinct"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_observe_op_passes_opcheck_and_is_the_reference_update(ids, last, dtype, backend):
    """opcheck (schema and declared mutations, fake tensors, AOT dispatch) on CPU tensors, and the
    op's CPU implementation equals the general torch update, whatever ``backend`` says."""
    args = _op_args(ids=ids, dtype=dtype)
    torch.library.opcheck(torch.ops.gpuprune.observe_.default, (*args[:-1], backend))
    got, want = _op_args(ids=ids, dtype=dtype), _op_args(ids=ids, dtype=dtype)
    torch.ops.gpuprune.observe_(*got[:-1], backend)
    TorchBackend(torch.device("cpu"), cpu_fast_paths=False).observe_(
        StatsTensors(*want[:5]), want[5], want[6], 0.9, 2)
    for a, b in zip(got[:5], want[:5]):
        assert torch.equal(a, b)
    assert int(got[3]) == 1 and got[2].tolist() == last


def test_observe_op_by_hand():
    """decay 0.5: a first loss 2.0 sets the mean (variance 0); a second, 4.0, gives
    ``a = 0.5``, ``mean = 2 + 0.5 * 2 = 3``, ``var = 0.5 * 0 + 0.5 * 0.5 * 2**2 = 1``."""
    stats = LossStats(3)
    for loss, epoch in ((2.0, 4), (4.0, 5)):
        torch.ops.gpuprune.observe_(*stats.tensors(), torch.tensor([0]), torch.tensor([loss]), 0.5,
                                    torch.tensor(epoch), "torch")
    assert stats.mean.tolist() == [3.0, 0.0, 0.0] and stats.var.tolist() == [1.0, 0.0, 0.0]
    assert stats.last_epoch.tolist() == [5, -1, -1]


@pytest.mark.parametrize("name", ["observe_", "count_trained", "record_batch"])
def test_ops_are_kept_out_of_cuda_graphs(name):
    """Each op reads host state when it runs, so a CUDA graph must not capture it."""
    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        pytest.skip("this torch has no cudagraph_unsafe tag")
    assert torch.Tag.cudagraph_unsafe in getattr(torch.ops.gpuprune, name).default.tags


def test_count_trained_op_passes_opcheck_and_counts():
    pruner = _pruner()
    ids = torch.arange(5)
    torch.library.opcheck(torch.ops.gpuprune.count_trained.default, (ids, 0))   # 0: no guard
    torch.ops.gpuprune.count_trained(ids, pruner.coverage.key)
    assert pruner.coverage.observed == 5 and pruner.coverage.largest == 5


def test_distributed_log_records_compiled_batches(tmp_path):
    """Under a process group ``observe`` logs the batch for the next merge: a compiled step logs
    through ``gpuprune::record_batch`` at run time exactly what eager logs (a 1-rank gloo group
    stands in for a real one, whose Pruner would not make an EpochSync)."""
    import torch.distributed as dist

    from gpuprune.distributed import EpochSync
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not initialised yet")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        got, want = _pruner(), _pruner()
        for p in (got, want):
            p._sync = EpochSync(dist.group.WORLD, p.device, N)
        compiled = torch.compile(got.observe, fullgraph=True, dynamic=False)
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            ids = torch.randperm(N, generator=g)[:8]
            losses = torch.rand(8, generator=g)
            compiled(ids, losses)
            want.observe(ids, losses)
        assert got._sync.pending == want._sync.pending == 24
        assert torch.equal(got._sync._ids[:24], want._sync._ids[:24])
        assert torch.equal(got._sync._losses[:24], want._sync._losses[:24])
        assert int(got.stats.last_epoch.max()) == -1        # logged, not applied
        assert got.coverage.observed == 24
    finally:
        dist.destroy_process_group()


def test_a_copied_pruner_counts_on_its_own_guard():
    import copy
    pruner = _pruner()
    twin = copy.deepcopy(pruner)
    assert twin.coverage.key != pruner.coverage.key
    torch.ops.gpuprune.count_trained(torch.arange(4), twin.coverage.key)
    assert (twin.coverage.observed, pruner.coverage.observed) == (4, 0)


def test_kernel_backend_compiles_through_the_op_forced_on_cpu():
    """A Pruner on the kernel backend (the CPU harness runs the real CUDA source): eager observe
    launches the kernel, a compiled one (fullgraph) calls ``gpuprune::observe_``, whose CPU
    implementation is the torch reference; the statistics are the same, bit for bit."""
    kh = pytest.importorskip("kernel_harness")
    if kh.find_compiler() is None:
        pytest.skip("the harness needs g++")
    backend = KernelBackend(kh.harness_ops(slots=2))

    def make():
        pruner = _pruner("ucb", num_epochs=3)
        pruner.backend = backend
        return pruner
    pruner = make()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(pruner.observe, backend=counter, fullgraph=True, dynamic=False)
    log = []
    for epoch, ids, losses in _batch_log(pruner, 3):
        compiled(ids, losses)
        log.append((epoch, ids, losses))
    launches = backend.ops.launches
    eager, _, _ = _replay(make, log)
    assert backend.ops.launches > launches              # eager ran the kernels
    assert counter.frame_count == 1
    _assert_same_state(pruner, eager)


# ---------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_compiled_observe_on_a_gpu_records_what_eager_records(backend):
    """On CUDA, fullgraph: ``gpuprune::observe_`` launches the CuPy kernel (``backend="cuda"``)
    or the torch update; equal, bit for bit, to eager on the same backend; no host sync added."""
    if backend == "cuda":
        pytest.importorskip("cupy")

    def make():
        return gp.Pruner(N, keep=0.5, policy="infobatch", num_epochs=4, seed=3, device="cuda",
                         backend=backend)
    pruner = make()
    assert pruner.backend.name == backend
    compiled = torch.compile(pruner.observe, fullgraph=True, dynamic=False)
    log = []
    for epoch, ids, losses in _batch_log(pruner, 4):
        ids, losses = ids.cuda(), losses.cuda()
        compiled(ids, losses)
        log.append((epoch, ids, losses))
    eager, _, _ = _replay(make, log)
    _assert_same_state(pruner, eager)
    assert pruner.coverage.observed == eager.coverage.observed

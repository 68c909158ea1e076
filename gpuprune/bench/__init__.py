"""``gpuprune bench``: time-to-accuracy of every pruning policy against full-data training.

Same model, same data, same initial weights per seed; full data, the shortened full-data schedule,
the dynamic policies (with and without a charged re-score pass) and the static baselines (scoring
cost charged), at one or more prune ratios, each compared with full data for the same charged
time (:mod:`gpuprune.bench.equal_time`). See :mod:`gpuprune.bench.runner` for what is charged to
which run.

Example (Python)::

    from gpuprune.bench import BenchConfig, run_bench
    from gpuprune.data import load_dataset
    res = run_bench(BenchConfig(epochs=3, methods=("uniform",)), load_dataset("digits"))
"""

from .config import BASELINES, DYNAMIC, LOADERS, METHODS, REFRESHED, STATIC, BenchConfig
from .report import machine_info, summarize, write_results
from .runner import BenchResult, BudgetExceeded, run_bench, step_budget, time_to_target
from .table import format_table
from .timeline import Timeline
from .train import lr_factor, onecycle_factor

__all__ = ["BenchConfig", "BenchResult", "BudgetExceeded", "run_bench", "summarize",
           "format_table", "write_results", "machine_info", "step_budget", "time_to_target",
           "lr_factor", "onecycle_factor", "Timeline", "METHODS", "BASELINES", "DYNAMIC",
           "REFRESHED", "STATIC", "LOADERS"]

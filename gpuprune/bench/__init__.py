"""``gpuprune bench``: time-to-accuracy of every pruning policy against full-data training.

Same model, same data, same initial weights per seed; full data, the shortened full-data schedule,
the dynamic policies and the static baselines (scoring cost charged), at one or more prune ratios.
See :mod:`gpuprune.bench.runner` for what is charged to which run.

Example (Python)::

    from gpuprune.bench import BenchConfig, run_bench
    from gpuprune.data import load_dataset
    res = run_bench(BenchConfig(epochs=3, methods=("uniform",)), load_dataset("digits"))
"""

from .config import BASELINES, DYNAMIC, LOADERS, METHODS, STATIC, BenchConfig
from .report import format_table, machine_info, summarize, write_results
from .runner import BenchResult, run_bench, step_budget, time_to_target
from .train import lr_factor

__all__ = ["BenchConfig", "BenchResult", "run_bench", "summarize", "format_table", "write_results",
           "machine_info", "step_budget", "time_to_target", "lr_factor", "METHODS", "BASELINES",
           "DYNAMIC", "STATIC", "LOADERS"]

"""Glue for the frameworks people train with; optional, and never imported by ``import gpuprune``.

Each submodule imports its framework when it is imported itself, and says what to install when
the framework is missing (``pip install "gpuprune[integrations]"`` installs all three):

* :mod:`gpuprune.integrations.lightning`: PyTorch Lightning (``lightning``), one device or DDP:
  a callback that sizes each epoch by its own plan, and the run's real optimizer-step count.
* :mod:`gpuprune.integrations.accelerate`: Hugging Face accelerate, 1 or more processes: a
  prepared loader that accelerate does not shard again, and the scheduler's step count.
* :mod:`gpuprune.integrations.transformers`: the Hugging Face ``Trainer``: per-sample losses
  through the Pruner, gpuprune's sampler, and ``max_steps`` and every epoch sized by the plans.

Recipes, the pitfalls each one avoids, and the tests behind them: ``docs/integrations.md``.
"""

__all__: list[str] = []

"""``python -m gpuprune bench ...``: the same as the ``gpuprune`` console script."""

from .cli import main

raise SystemExit(main())

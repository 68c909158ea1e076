"""``python -m gpuprune.doctor``."""

from .selftest import main

raise SystemExit(main())

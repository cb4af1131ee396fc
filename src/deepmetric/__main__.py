"""``python -m deepmetric ...``: the same command line as ``deepmetric ...``."""

from deepmetric.cli import main

raise SystemExit(main())

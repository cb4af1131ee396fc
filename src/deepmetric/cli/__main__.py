"""``python -m deepmetric.cli ...``: the same as ``deepmetric ...`` (``python -m deepmetric``
also ends a distributed worker cleanly)."""

from deepmetric.cli import main

raise SystemExit(main())

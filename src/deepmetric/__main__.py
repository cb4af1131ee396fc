"""``python -m deepmetric ...``: the same command line as ``deepmetric ...``.

A worker process of a distributed run (started by ``torchrun`` / ``deepmetric train --nproc``)
ends through :func:`deepmetric.distributed.exit_process`, skipping the interpreter teardown in
which torch's gloo backend can abort after DistributedDataParallel."""

from deepmetric.cli import main
from deepmetric.distributed import exit_process, launched_by_torchrun

code = main()
if launched_by_torchrun():
    exit_process(code)
raise SystemExit(code)

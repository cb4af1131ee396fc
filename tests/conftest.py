import os
import sys
from pathlib import Path

import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))  # for tests/reference.py

torch.set_num_threads(2)
settings.register_profile("default", deadline=None, max_examples=40, derandomize=True)
# `make fuzz`: HYPOTHESIS_PROFILE=fuzz, FUZZ_EXAMPLES examples per property, new ones every run
settings.register_profile(
    "fuzz",
    deadline=None,
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "5000")),
    derandomize=False,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

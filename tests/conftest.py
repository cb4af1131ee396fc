import sys
from pathlib import Path

import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))  # for tests/reference.py

torch.set_num_threads(2)
settings.register_profile("default", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("default")

import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))  # makes `user_models:factory` importable for --model tests

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tests_dir() -> Path:
    return TESTS

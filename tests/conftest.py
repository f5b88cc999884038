import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# the tests folder is importable as a package-less module path, so spawned DDP workers can unpickle helpers
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine torch's default threads oversubscribe (52 s vs 7 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Model tests use one intra-op thread: their tensors are tiny, and on a shared 2-core machine two OpenMP
threads contending with other jobs made some tests ~100x slower. The previous setting is restored
afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

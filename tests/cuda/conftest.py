"""tests/cuda: what only a CUDA GPU can check (bitsandbytes kernels, flash-attn / FlexAttention, bf16 steps,
paged optimizers). The normal suite never collects this folder (tests/conftest.py collect_ignore);
scripts/gpu_check.sh runs it by name on a CUDA machine. Run here, each test fails with one line saying so:
never a silent skip."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def cuda() -> Iterator[torch.device]:
    if not torch.cuda.is_available():
        pytest.fail("tests/cuda needs a CUDA GPU (torch.cuda.is_available() is False here): run it with "
                    "scripts/gpu_check.sh on a CUDA machine", pytrace=False)
    torch.manual_seed(0)
    yield torch.device("cuda")

"""vLLM as an independent client of what we write. These tests run only in .venv-vllm (scripts/test.sh
runs `.venv-vllm/bin/python -m pytest tests/serving`); the main suite ignores this folder.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): seconds to start, and a test
can hand it tensors. On a machine with CUDA the same tests run against vLLM's CUDA build.
"""

from __future__ import annotations

import os

import torch

# before vllm is imported anywhere
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
if not torch.cuda.is_available():
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: tiny models, short prompts

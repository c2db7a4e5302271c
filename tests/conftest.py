"""Test-wide setup. Without a CUDA device the Triton kernels run through the interpreter, which must be
switched on before triton is first imported, so this happens here, at collection time."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE

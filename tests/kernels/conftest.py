"""Where the Triton kernels run in these tests.

Without a GPU they run on CPU through Triton's interpreter. TRITON_INTERPRET must be set
before `kernels.lora` / `kernels.attention` are imported (Triton decides at `@triton.jit`
time); `kernels` imports them lazily, so setting it here, at collection, is early enough.
On a CUDA machine the same tests run the compiled kernels on the GPU, unless
TRITON_INTERPRET=1 is set explicitly.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.setdefault("TRITON_INTERPRET", "0")


@pytest.fixture(scope="session")
def device() -> torch.device:
    if os.environ["TRITON_INTERPRET"] == "1" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")

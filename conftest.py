"""Repository-wide pytest setup.

Without a GPU, Triton kernels run only under Triton's interpreter, and `TRITON_INTERPRET` must be set before
triton is first imported by anything in the session (the engine's op registry imports its Triton modules when
the engine is first imported). Set here, before any test module loads; with CUDA present the kernels compile
for the GPU as usual.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

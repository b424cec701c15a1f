# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. when kernels.py is
# imported; set it before any test module imports the project so kernels run on the CPU.
# An explicit TRITON_INTERPRET=0 (bench.py --gpu) compiles the kernels for real instead, and
# PESC_TEST_DEVICE=cuda makes the tests' tensors CUDA tensors by default.
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if os.environ.get("PESC_TEST_DEVICE"):
    import torch

    torch.set_default_device(os.environ["PESC_TEST_DEVICE"])


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (pytestmark = pytest.mark.usefixtures("one_thread")): a second
    intra-op thread only adds synchronisation, and when the other core is busy (parallel CI jobs)
    the waiting thread made such tests ~50x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

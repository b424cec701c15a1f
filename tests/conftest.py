# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. when kernels.py is
# imported; set it before any test module imports the project so kernels run on the CPU.
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

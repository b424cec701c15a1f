# The serving tests run in a venv with vLLM and this plugin installed (.ci/run builds it; README:
# Serving), never in the main test venv. They import the project and the tiny-model builders of
# tests/ from the checkout, and keep vLLM's CPU engine small.
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the CI machine has 2 cores, shared with the test process

"""The project's own modules (moe.py, convert.py and what they import), carried by this package.

The files are symlinks to the repository's (a wheel holds copies), so the PESC math and the key
and config tables stay in one place. They import one another by top-level name (`import moe`), so
while they load those names point at the modules here; afterwards the names are handed back, so
a vLLM process keeps whatever it calls `kernels` or `model` (Hugging Face ships a `kernels`).
"""

import importlib
import sys

_ORDER = ("kernels", "quant", "moe", "files", "cli", "tokenizer", "model", "convert")  # each after what it imports

_saved = {name: sys.modules.get(name) for name in _ORDER}
try:
    for _name in _ORDER:
        sys.modules[_name] = importlib.import_module(f"{__name__}.{_name}")
finally:
    for _name, _module in _saved.items():
        if _module is None:
            sys.modules.pop(_name, None)
        else:
            sys.modules[_name] = _module

from . import convert, moe  # noqa: E402  (loaded above)

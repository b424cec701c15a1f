"""
What every command line here (train.py, sample.py, eval.py, convert.py, bench.py, study.py) spells
the same way, decided once:

- a boolean option is `--x` (true) or `--x true|false` (FLAG);
- a dtype is fp32, bf16 or fp16, and `auto` is bf16 on a CUDA GPU that has it, else fp32;
- a device is auto, cpu, cuda or cuda:N, and `auto` is cuda when there is one;
- a checkpoint read is `--ckpt DIR`, a directory written `--out_dir DIR`;
- an option that was renamed still works under its old name, with one line naming the new one;
- a config dataclass (moe.PESCConfig, moe.LoRAConfig) is its own group of options.
"""

import argparse
import sys
from dataclasses import MISSING, fields

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
OLD_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # train.py's before


def note(text):
    print(f"note: {text}", file=sys.stderr, flush=True)


def str2bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


FLAG = dict(type=str2bool, nargs="?", const=True)  # p.add_argument("--x", default=False, **FLAG)


def add_device_dtype(p, dtypes=("auto", *DTYPES)):
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=dtypes,
                   help="auto: bf16 on a CUDA GPU that has it, else fp32")


def resolve_device(name="auto") -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def resolve_dtype(name, device) -> torch.dtype:
    """The dtype `name` means on `device`: auto is bf16 on a CUDA GPU that has it, else fp32. A
    CUDA device that is not here (a plan for GPUs to rent) is taken to have bf16."""
    if name != "auto":
        return DTYPES[name]
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else torch.float32


def rename(argv, renamed):
    """argv with each old option name in `renamed` ({"--old": "--new"}) replaced by the new one,
    and an old --dtype spelling (bfloat16) by the new (bf16), with one line saying so."""
    def respell(dtype):
        note(f"--dtype {dtype} is now spelled {OLD_DTYPE_NAMES[dtype]}")
        return OLD_DTYPE_NAMES[dtype]

    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name in renamed:
            note(f"{name} is now {renamed[name]}")
            name = renamed[name]
        if name == "--dtype" and value in OLD_DTYPE_NAMES:  # --dtype=bfloat16
            value = respell(value)
        elif not eq and out and out[-1] == "--dtype" and name in OLD_DTYPE_NAMES:  # --dtype bfloat16
            name = respell(name)
        out.append(name + eq + value)
    return out


def parse(parser, argv=None, renamed=None):
    """parser.parse_args(argv), old option names in `renamed` read as the new ones (rename)."""
    return parser.parse_args(rename(sys.argv[1:] if argv is None else argv, renamed or {}))


# -----------------------------------------------------------------------------
# A config dataclass as a group of options: one option per field, the field's default its default


def comma_list(s):
    return tuple(x.strip() for x in s.split(",") if x.strip())


def add_config_options(group, cls, prefix="", names=None):
    """--PREFIXFIELD for every field of cls (names: field -> option name where they differ)."""
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        kind = comma_list if isinstance(default, tuple) else type(default)
        group.add_argument("--" + (names or {}).get(f.name, prefix + f.name), type=kind, default=default,
                           help=" ")  # ArgumentDefaultsHelpFormatter then shows the default


def config_from_options(cls, args, prefix="", names=None):
    """cls built from the options add_config_options added."""
    return cls(**{f.name: getattr(args, (names or {}).get(f.name, prefix + f.name)) for f in fields(cls)})

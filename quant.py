"""
NF4 with double quantization, bit for bit the QLoRA format of bitsandbytes 0.50,
and the frozen NF4 linear that QLoRA trains LoRA and the PESC adapters on top of.

The format of one weight W (any shape, n elements), as `bitsandbytes.functional.quantize_4bit(W,
blocksize=64, quant_type="nf4", compress_statistics=True)` stores it:

  1. Flatten W row-major in fp32 and cut it into blocks of `blocksize` (64) values; the last
     block may be partial. absmax[b] = max |w| over block b (fp32, 0 for an all-zero block;
     bitsandbytes' PyTorch path stores 1e-38 for an all-zero partial block, its C++ one 0:
     the weights dequantize to 0 either way).
  2. Scale: a full block multiplies by the reciprocal, x = w * (1 / max(absmax, 1e-38)); the
     partial block divides, x = w / max(absmax, 1e-38) (bitsandbytes does both; the roundings
     differ). x is clamped to [-1, 1].
  3. Code: the index of the nearest of the 16 NF4 levels (NF4_LEVELS, sorted), found as
     bucketize(x, midpoints) with the 15 fp32 midpoints between neighbours, so a value exactly
     on a midpoint takes the lower level.
  4. Pack: two codes per byte, element 2i in the high nibble, 2i+1 in the low one:
     byte[i] = code[2i] << 4 | code[2i+1]. An odd n is padded with one x = 0 (code 7, level 0.0).
  5. Double quantization of the absmaxes: offset = mean(absmax) (fp32); d = absmax - offset is
     cut into blocks of 256 with scale[c] = max |d| over block c; each d / scale[c] (clamped to
     [-1, 1]) takes the index of the nearest entry of the signed dynamic 8-bit map
     (signed_dynamic_map(), bitsandbytes' create_dynamic_map(signed=True)), again via midpoints.

Dequantize: absmax = map[absmax_code] * scale + offset, then w = NF4_LEVELS[code] * absmax, both
in fp32, rounded once to the compute dtype. Storage per weight: 4 bits + 8 bits / 64 + 32 bits /
(64 * 256) = 4.127 bits, 0.516 bytes.

The Triton kernel kernels.nf4_dequantize does the dequantization in one pass; `dequantize_torch`
is its plain PyTorch twin. NF4Linear is a frozen linear layer holding the packed form; its
backward gives only the input gradient, dequantizing the weight again instead of keeping it.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

# The 16 NF4 levels (quantiles of a standard normal, scaled to [-1, 1], with an exact zero).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)

ABSMAX_BLOCKSIZE = 256  # double quantization: blocks of absmaxes sharing one fp32 scale
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # the ones bitsandbytes accepts for 4 bit
QUANTIZE_CHUNK = 1 << 22  # elements quantized at once: the fp32 temporaries stay ~16 MB


def signed_dynamic_map() -> torch.Tensor:
    """The 256 values of bitsandbytes' signed dynamic 8-bit map, sorted, fp32.

    For each exponent e = 0..6, the 2^e midpoints of a uniform grid of 2^e + 1 points on
    [0.1, 1], times 10^(e - 6), with both signs; plus 0 and 1. Computed in fp32 as bitsandbytes
    does, so the values are the same bits."""
    values = []
    for e in range(7):
        grid = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        values += ((10 ** (e - 6)) * mids).tolist() + ((-(10 ** (e - 6))) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = signed_dynamic_map()
# (256, 2): the levels of a byte's high and low nibble, so the twin dequantizes with one gather per byte
_LEVEL_PAIRS = torch.stack([NF4_LEVELS[torch.arange(256) >> 4], NF4_LEVELS[torch.arange(256) & 15]], dim=1)


@dataclass
class NF4Weight:
    """The packed form of one weight. absmax is uint8 codes with double quantization, else fp32."""
    codes: torch.Tensor  # (ceil(n / 2),) uint8, two 4-bit codes per byte
    absmax: torch.Tensor  # (ceil(n / blocksize),) uint8 (double quantized) or fp32
    absmax_scale: torch.Tensor  # (ceil(blocks / 256),) fp32; empty without double quantization
    absmax_offset: torch.Tensor  # () fp32 mean of the absmaxes; 0 without double quantization
    shape: tuple
    blocksize: int = 64
    dtype: torch.dtype = torch.float32  # the dtype it was quantized from

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self):
        return self.codes, self.absmax, self.absmax_scale, self.absmax_offset

    def to(self, device) -> "NF4Weight":
        return replace(self, **{n: t.to(device) for n, t in zip(PACKED_NAMES, self.tensors())})


def _midpoints(levels):
    return (levels[:-1] + levels[1:]) / 2


def _block_scaled(flat, blocksize):
    """(absmax per block, flat / absmax clamped to [-1, 1]) as bitsandbytes computes them (step 1-2)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)
    if full < n:
        last = flat[full:].abs().amax()
        absmax = torch.cat([absmax, last[None]])
        scaled = torch.cat([scaled, flat[full:] / last.clamp(min=1e-38)])
    return absmax, scaled.clamp_(-1, 1)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a float tensor to the QLoRA NF4 format (module docstring), on weight's device."""
    if not weight.is_floating_point():
        raise TypeError(f"quantize_nf4: expected a floating-point weight, got {weight.dtype} "
                        "(already quantized?)")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize {blocksize} is not one of {BLOCKSIZES}")
    n = weight.numel()
    if n == 0:
        raise ValueError(f"quantize_nf4: a weight of shape {tuple(weight.shape)} has no elements to quantize")
    flat = weight.detach().reshape(-1)
    midpoints = _midpoints(NF4_LEVELS).to(weight.device)
    codes = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=weight.device)
    for start in range(0, n, QUANTIZE_CHUNK):  # a multiple of blocksize: chunks hold whole blocks
        chunk_absmax, scaled = _block_scaled(flat[start:start + QUANTIZE_CHUNK].float(), blocksize)
        if scaled.numel() % 2:
            scaled = F.pad(scaled, (0, 1))  # x = 0 -> code 7, the level 0.0
        q = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
        codes[start // 2:start // 2 + q.numel() // 2] = (q[0::2] << 4) | q[1::2]
        absmax[start // blocksize:start // blocksize + chunk_absmax.numel()] = chunk_absmax
    if not double_quant:
        empty = torch.empty(0, dtype=torch.float32, device=weight.device)
        return NF4Weight(codes, absmax, empty, torch.zeros((), device=weight.device), tuple(weight.shape), blocksize,
                         weight.dtype)
    offset = absmax.mean()
    scale, scaled = _block_scaled(absmax - offset, ABSMAX_BLOCKSIZE)
    absmax_codes = torch.bucketize(scaled, _midpoints(DYNAMIC_MAP).to(weight.device), out_int32=True)
    return NF4Weight(codes, absmax_codes.to(torch.uint8), scale, offset, tuple(weight.shape), blocksize, weight.dtype)


def _check(packed: NF4Weight):
    n = packed.numel()
    blocks = -(-n // packed.blocksize)
    sizes = {"codes": (packed.codes.numel(), (n + 1) // 2), "absmax": (packed.absmax.numel(), blocks)}
    if packed.double_quant:
        sizes["absmax_scale"] = (packed.absmax_scale.numel(), -(-blocks // ABSMAX_BLOCKSIZE))
    for name, (have, want) in sizes.items():
        if have != want:
            raise ValueError(f"NF4 weight of shape {packed.shape}, blocksize {packed.blocksize}: {name} "
                             f"has {have} values, the format needs {want}")


def dequantize_torch(packed: NF4Weight, dtype=torch.float32) -> torch.Tensor:
    """The plain PyTorch dequantization (the kernel's twin): the weight in `dtype`."""
    _check(packed)
    dev, n, bs = packed.codes.device, packed.numel(), packed.blocksize
    absmax = packed.absmax
    if packed.double_quant:
        scale = packed.absmax_scale.repeat_interleave(ABSMAX_BLOCKSIZE)[:absmax.numel()]
        absmax = DYNAMIC_MAP.to(dev)[absmax.long()] * scale + packed.absmax_offset
    codes = F.pad(packed.codes, (0, absmax.numel() * bs // 2 - packed.codes.numel()))  # whole blocks
    w = torch.index_select(_LEVEL_PAIRS.to(dev), 0, codes.int()).view(-1, bs) * absmax[:, None]
    return w.view(-1)[:n].to(dtype).view(packed.shape)


def dequantize_nf4(packed: NF4Weight, dtype=torch.float32) -> torch.Tensor:
    """The weight in `dtype`: the Triton kernel where kernels.use_triton says so, else the twin."""
    if kernels.use_triton(packed.codes):
        _check(packed)
        return kernels.nf4_dequantize(*packed.tensors(), NF4_LEVELS.to(packed.codes.device),
                                      DYNAMIC_MAP.to(packed.codes.device), packed.shape, packed.blocksize,
                                      dtype)
    return dequantize_torch(packed, dtype)


# -----------------------------------------------------------------------------
# The frozen NF4 linear


PACKED_NAMES = ("codes", "absmax", "absmax_scale", "absmax_offset")
_ALIGN = 16  # bytes: each packed tensor starts on a boundary every dtype can be viewed at


def packed_nbytes(shape, blocksize: int = 64, double_quant: bool = True, aligned: bool = False) -> int:
    """Bytes of the packed tensors of a weight of this shape (codes, absmax, absmax_scale,
    absmax_offset); aligned=True: as NF4Linear.flatten_ lays them out (before FSDP's padding)."""
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    parts = ((n + 1) // 2, blocks * (1 if double_quant else 4),
             4 * -(-blocks // ABSMAX_BLOCKSIZE) if double_quant else 0, 4)
    return sum(-(-p // _ALIGN) * _ALIGN if aligned else p for p in parts)


class _NF4Matmul(torch.autograd.Function):
    """x @ W^T with W dequantized from `packed` in x's dtype. Saves nothing weight-sized: the
    backward dequantizes again for dx = g @ W. The base is frozen, so there is no dW."""

    @staticmethod
    def forward(ctx, x, packed):
        ctx.packed = packed
        return F.linear(x, dequantize_nf4(packed, x.dtype))

    @staticmethod
    def backward(ctx, g):
        return g @ dequantize_nf4(ctx.packed, g.dtype), None


def nf4_linear(x, packed: NF4Weight, bias=None):
    """x @ W^T + bias in the compute dtype: autocast's when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    out = _NF4Matmul.apply(x, packed)
    return out if bias is None else out + bias.to(out.dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (state-dict-free: the quantized base
    is never saved; checkpoints keep the full-precision base it came from).

    The packed tensors are buffers, which FSDP2 does not shard. flatten_() moves their bytes into
    one frozen parameter instead, which FSDP2 shards and all-gathers like any other weight."""

    def __init__(self, packed: NF4Weight, bias=None):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.shape, self.blocksize, self.dtype = packed.shape, packed.blocksize, packed.dtype
        for name, t in zip(PACKED_NAMES, packed.tensors()):
            self.register_buffer(name, t, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.layout = None  # flatten_(): where each packed tensor lies in self.storage

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True):
        return cls(quantize_nf4(linear.weight, blocksize, double_quant), linear.bias)

    @staticmethod
    def storage_dtype(compute_dtype):
        """flatten_'s dtype for a run in compute_dtype: FSDP's all-gather dtype under mixed
        precision (bf16, fp16), else uint8."""
        return compute_dtype if compute_dtype in (torch.bfloat16, torch.float16) else torch.uint8

    def flatten_(self, dtype=torch.uint8):
        """Put the packed tensors' bytes, each section aligned to 16 bytes, into one flat frozen
        parameter `storage` whose elements are `dtype` (the bytes reinterpreted, never converted).
        FSDP2 then shards it like a weight. dtype should be storage_dtype(the run's compute
        dtype), so that no torch version's mixed-precision cast converts it."""
        if self.layout is not None:
            return self
        tensors = [self._buffers.pop(n) for n in PACKED_NAMES]
        self.layout, start = [], 0
        for t in tensors:
            self.layout.append((start, t.numel() * t.element_size(), t.dtype, tuple(t.shape)))
            start += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        flat = torch.zeros(start, dtype=torch.uint8, device=tensors[0].device)
        for (s, n, _, _), t in zip(self.layout, tensors):
            flat[s:s + n] = t.reshape(-1).view(torch.uint8)
        self.storage = nn.Parameter(flat.view(dtype), requires_grad=False)
        return self

    @property
    def packed(self) -> NF4Weight:
        if self.layout is None:
            tensors = [self._buffers[n] for n in PACKED_NAMES]
        else:  # views into storage (under FSDP2: the all-gathered parameter while the block runs)
            raw = self.storage.view(torch.uint8)
            tensors = [raw[s:s + n].view(dt).view(shape) for s, n, dt, shape in self.layout]
        return NF4Weight(*tensors, self.shape, self.blocksize, self.dtype)

    def forward(self, x):
        return nf4_linear(x, self.packed, self.bias)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would round the fp32 absmax scales (or convert the bytes of
        # storage): the packed tensors only change device
        device = lambda t: fn(torch.empty(0, device=t.device)).device  # noqa: E731
        for name, t in self._buffers.items():
            self._buffers[name] = t.to(device(t))
        if self.layout is not None:
            self.storage.data = self.storage.data.to(device(self.storage))
        if self.bias is not None:
            self.bias.data = fn(self.bias.data)
        return self

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocksize={self.blocksize}"

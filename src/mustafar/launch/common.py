"""Helpers shared by the kernel launchers."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

#: ``log2(e)``: the kernels compute ``exp(x)`` as ``exp2(x * LOG2E)``.
LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints. (``triton.cdiv`` is a JIT function: 5 to 10 us per call from Python.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def multiprocessors(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (a nominal 8 on the CPU)."""
    if not torch.cuda.is_available():
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    return multiprocessors(device.index if device.index is not None else 0) if device.type == "cuda" else 8


def on_device(tensor: torch.Tensor):
    """A context that makes ``tensor``'s CUDA device the current one; a no-op for other devices.

    Triton and CUDA kernels launch on the current device and its stream: without this, a layer
    placed on ``cuda:1`` (``device_map``) would launch its kernels on ``cuda:0``.
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def choose_splits(batch_heads: int, tokens: int, device: torch.device, per_sm: int, block_tokens: int,
                  whole_wave: bool = False) -> int:
    """Splits of the compressed token axis so that ``batch_heads * splits`` programs fill the GPU.

    Aims for ``per_sm`` programs per multiprocessor, at least 1 split and at most one per ``block_tokens``
    tokens; 0 when there are no tokens. ``whole_wave=True`` rounds down, so that the programs fit in one wave
    (the CUDA kernel: a partial second wave of long CTAs would leave most of the GPU idle); the default rounds
    up (the Triton kernel's short programs).
    """
    if tokens == 0:
        return 0
    blocks = cdiv(tokens, block_tokens)
    slots = per_sm * sm_count(device)
    wanted = slots // batch_heads if whole_wave else cdiv(slots, batch_heads)
    return max(1, min(blocks, wanted))

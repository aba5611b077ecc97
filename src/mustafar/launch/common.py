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


#: Least fraction of the CTA slots of its waves a split count must fill before the CUDA launcher goes past one wave.
WAVE_FILL = 0.9
#: Largest number of waves the CUDA launcher considers when one wave fills too few slots.
MAX_WAVES = 4


def wave_splits(batch_heads: int, blocks: int, slots: int) -> int:
    """Splits for long CTAs (the CUDA kernel): the best-filled single wave, or more waves when it fills too little.

    ``slots``: CTAs that run at once on the device; ``blocks``: the most splits the tokens allow. Among split
    counts that fit one wave the one filling the most slots wins; if it fills less than :data:`WAVE_FILL`
    (e.g. 192 (batch, head) pairs on 528 slots: 2 splits fill 73 %), the smallest count up to
    :data:`MAX_WAVES` waves that fills at least 95 % of its waves is taken (8 splits: 1536 of 1584 slots).
    """
    def fill(splits: int) -> float:
        ctas = batch_heads * splits
        return ctas / (cdiv(ctas, slots) * slots)

    one_wave = max(1, min(blocks, slots // batch_heads))
    if fill(one_wave) >= WAVE_FILL:
        return one_wave
    candidates = range(one_wave, max(one_wave, min(blocks, MAX_WAVES * slots // batch_heads)) + 1)
    good = [s for s in candidates if fill(s) >= 0.95]
    return good[0] if good else max(candidates, key=fill)


def choose_splits(batch_heads: int, tokens: int, device: torch.device, per_sm: int, block_tokens: int,
                  whole_wave: bool = False) -> int:
    """Splits of the compressed token axis so that ``batch_heads * splits`` programs fill the GPU.

    Aims for ``per_sm`` programs per multiprocessor, at least 1 split and at most one per ``block_tokens``
    tokens; 0 when there are no tokens. ``whole_wave=True`` (the CUDA kernel's long CTAs) fills whole waves
    (:func:`wave_splits`); the default rounds up (the Triton kernel's short programs).
    """
    if tokens == 0:
        return 0
    blocks = cdiv(tokens, block_tokens)
    slots = per_sm * sm_count(device)
    if whole_wave:
        return wave_splits(batch_heads, blocks, slots)
    return max(1, min(blocks, cdiv(slots, batch_heads)))

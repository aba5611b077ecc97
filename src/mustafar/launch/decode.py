"""Launcher of the fused sparse decode attention kernel."""

from __future__ import annotations

import math

import torch

from ..format import BitmapKV, num_words
from ..kernels.decode import merge_splits_kernel, sparse_decode_kernel
from ..reference import masked_floor
from .common import LOG2E, cdiv, choose_splits, interpreting, next_pow2, on_device

#: Tokens per inner step of a program.
BLOCK_N = 64
#: Programs per multiprocessor the split heuristic aims for.
PROGRAMS_PER_SM = 2
_MIN_DOT = 16
#: Query rows per KV head (``group * q_len``) one launch takes at most. A program holds all of them and its shared
#: memory grows with them: compiled for sm_90 with head_dim 128 (Triton 3.9), 64 KB (fp16) / 96 KB (FP8) at 128
#: rows, 400 / 432 KB at 1024, past the H200's 227 KB, which a 256-token step of the dynamic cache at GQA 4 asks
#: for (an FP8 store's chunked prefill on an H200 failed so, 2026-12-03). Longer steps run as several launches,
#: one per run of queries (:func:`_in_pieces`).
MAX_ROWS = 128


def _rows(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` itself if its last dimension is contiguous, else a contiguous copy."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _kept_args(values: torch.Tensor, store: BitmapKV):
    """``(values, (scales, strides...))``: FP8 values as their uint8 bits and the store's scales, else dummies."""
    if not store.is_fp8:
        return values, (values, 0, 0, 0)
    scales = store.scales
    return values.view(torch.uint8), (scales, *scales.stride())


def _mask_args(mask: torch.Tensor | None, shape: tuple[int, int, int, int]):
    """``(mask, strides, mode, floor)``: mode 0 none, 1 bool, 2 additive; ``floor``: see :func:`masked_floor`."""
    if mask is None:
        return None, (0, 0, 0), 0, 0.0
    mask = mask.expand(shape)
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    if mask.dtype == torch.bool:
        return mask, _strides(mask), 1, 0.0
    floor = masked_floor(mask.dtype)
    if floor < torch.finfo(torch.float32).min:  # a float64 mask: its masked entries load as -inf in fp32
        floor = -math.inf
    return mask, _strides(mask), 2, floor


def decode_attention_triton(
    query: torch.Tensor,
    key_cache: BitmapKV,
    value_cache: BitmapKV,
    key_window: torch.Tensor | None,
    value_window: torch.Tensor | None,
    scale: float,
    attention_mask: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Launch the sparse decode kernel and the split merge (inputs checked by ``sparse_decode_attention``).

    The kernel indexes the last dimension of every operand with stride 1: operands whose rows are not
    contiguous are copied first (O(their size); the cache's own tensors never are).
    """
    # one query is never split further (a group above MAX_ROWS runs as it is)
    if query.shape[2] > 1 and (query.shape[1] // key_cache.shape[1]) * query.shape[2] > MAX_ROWS:
        return _in_pieces(query, key_cache, value_cache, key_window, value_window, scale, attention_mask, num_splits)
    query, key_window, value_window = (_rows(t) for t in (query, key_window, value_window))
    key_values, key_bits = _rows(key_cache.values), _rows(key_cache.bitmaps)
    value_values, value_bits = _rows(value_cache.values), _rows(value_cache.bitmaps)
    b, hq, lq, d = query.shape
    hkv, n_comp = key_cache.shape[1], key_cache.tokens
    group = hq // hkv
    n_win = 0 if key_window is None else key_window.shape[2]
    rows = max(_MIN_DOT, next_pow2(group * lq))
    groups = max(_MIN_DOT, next_pow2(math.ceil(d / 4)))
    if num_splits is None:
        splits = choose_splits(b * hkv, n_comp, query.device, PROGRAMS_PER_SM, BLOCK_N)
    else:
        splits = min(num_splits, n_comp)
    tokens_per_split = cdiv(cdiv(max(n_comp, 1), max(splits, 1)), BLOCK_N) * BLOCK_N
    splits = cdiv(n_comp, tokens_per_split) if n_comp else 0
    parts = splits + (1 if n_win else 0)
    partial = torch.empty(parts, b * hkv, rows, d, device=query.device, dtype=torch.float32)
    m_part = torch.empty(parts, b * hkv, rows, device=query.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    kw = query if key_window is None else key_window
    vw = query if value_window is None else value_window
    mask, mask_strides, mask_mode, mask_floor = _mask_args(attention_mask, (b, hq, lq, n_comp + n_win))
    kbits = key_bits.view(torch.int32)
    vbits = value_bits.view(torch.int32)
    key_values, key_scales = _kept_args(key_values, key_cache)
    value_values, value_scales = _kept_args(value_values, value_cache)
    with on_device(query):
        sparse_decode_kernel[(parts, b * hkv)](
            query, *_strides(query),
            key_values, *_strides(key_values), kbits, *_strides(kbits),
            value_values, *_strides(value_values), vbits, *_strides(vbits),
            kw, *_strides(kw), vw, *_strides(vw),
            query if mask is None else mask, *mask_strides,
            partial, m_part, l_part,
            hkv, group, lq, n_comp, n_win, tokens_per_split, splits, scale * LOG2E, mask_floor,
            D=d, ROWS=rows, NG=groups, NW32=2 * num_words(d), BLOCK_N=BLOCK_N, MASK_MODE=mask_mode,
            PRECISION="ieee" if query.dtype == torch.float32 else "tf32", INTERPRET=interpreting(),
            KS=key_scales[0], stride_ksb=key_scales[1], stride_ksh=key_scales[2], stride_kst=key_scales[3],
            VS=value_scales[0], stride_vsb=value_scales[1], stride_vsh=value_scales[2], stride_vst=value_scales[3],
            K_FP8=key_cache.is_fp8, V_FP8=value_cache.is_fp8,
            LIMIT=torch.finfo(query.dtype).max if key_cache.is_fp8 or value_cache.is_fp8 else 0.0,
            num_warps=4,
        )
        out = torch.empty_like(query)
        merge_splits_kernel[(b * hkv, group * lq)](
            partial, m_part, l_part, out, *_strides(out), hkv, group, lq, parts,
            D=d, ROWS=rows, DP=next_pow2(d), BLOCK_S=min(64, next_pow2(parts)),
        )
    return out


def _in_pieces(query, key_cache, value_cache, key_window, value_window, scale, attention_mask, num_splits):
    """A step of more than :data:`MAX_ROWS` query rows per KV head as launches of at most that many.

    Queries ``[s, e)`` of the step's ``q_len`` (the last ``q_len`` positions of ``n`` tokens held) see the first
    ``n - q_len + e`` tokens: the pieces get the stores (first tokens, same buffers) and the window cut there, and
    the mask's rows and columns, so each launch's causal rule (its queries are the last of what it holds) is the
    step's. The output is the pieces' outputs in order, ``[batch, q_heads, q_len, head_dim]``.
    """
    b, hq, lq, _ = query.shape
    n_comp = key_cache.tokens
    n_win = 0 if key_window is None else key_window.shape[2]
    total = n_comp + n_win
    step = max(1, MAX_ROWS // (hq // key_cache.shape[1]))
    mask = None if attention_mask is None else attention_mask.expand(b, hq, lq, total)
    outputs = []
    for start in range(0, lq, step):
        stop = min(lq, start + step)
        end = total - lq + stop
        keys, values, kw, vw = key_cache, value_cache, key_window, value_window
        if end < total:
            if end >= n_comp:
                kw, vw = key_window[:, :, :end - n_comp], value_window[:, :, :end - n_comp]
            else:
                keys, values = key_cache.first_tokens(end), value_cache.first_tokens(end)
                kw = vw = None
        if kw is not None and kw.shape[2] == 0:
            kw = vw = None
        piece_mask = None if mask is None else mask[:, :, start:stop, :end]
        outputs.append(decode_attention_triton(query[:, :, start:stop], keys, values, kw, vw, scale, piece_mask,
                                               num_splits))
    return torch.cat(outputs, dim=2)

"""Greedy decoding loops that the benchmark times: a graph-captured loop and eager ``generate()``.

:func:`graph_decode` is a manual loop over a static cache (transformers'
``StaticCache`` or :class:`mustafar.StaticMustafarCache`): one eager prefill,
then one-token decode steps whose inputs live in static device buffers (token
ids ``[batch, 1]``, position ``[1, 1]``) updated in place on the device (argmax,
``+= 1``), so the step has static shapes, no host synchronisation, and can be
captured once in a ``torch.cuda.CUDAGraph`` and replayed. Positions are passed
explicitly (``position_ids``), so nothing is read from the cache's host-side
token count, which graph replays do not advance. On a CPU (or with
``capture=False``) the same step runs eagerly.

:func:`generate_decode` times transformers' ``generate()`` on a cache prefilled
the same way, for the eager baseline.

Token counting: ``new_tokens`` tokens are generated, the first from the
prefill's logits, so there are ``new_tokens - 1`` decode steps; the first
``warmup_steps`` of them run eagerly (they also warm up kernels and, with
capture, precede it) and are not timed.

Example::

    >>> import torch, transformers
    >>> from mustafar.bench.models import build_model
    >>> from mustafar.bench.decode import graph_decode
    >>> model = build_model("tiny", device="cpu")
    >>> prompt = torch.randint(512, (2, 40))
    >>> cache = transformers.StaticCache(config=model.config, max_cache_len=40 + 8)
    >>> tokens, timings = graph_decode(model, cache, prompt, new_tokens=8, capture=False)
    >>> tokens.shape, timings.timed_steps
    (torch.Size([2, 8]), 5)
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch

from ..generation import cache_kwargs, prefill
from .timing import Clock

__all__ = ["DecodeTimings", "first_tokens", "graph_decode", "generate_decode"]


@dataclass
class DecodeTimings:
    """Times of one decode run, milliseconds.

    Attributes:
        batch: sequences decoded together.
        prefill_ms: the prompt's forward pass and the first token's argmax (time to first token).
        decode_ms: the timed decode steps, all together.
        timed_steps: decode steps in ``decode_ms``.
        warmup_ms: the untimed eager warm-up steps; capture_ms: capturing the CUDA graph (0 without).
        captured: whether the timed steps were CUDA graph replays.
        breakdown: attention / compression / rest of one step, if measured
            (:func:`mustafar.bench.breakdown.step_breakdown`).
    """

    batch: int
    prefill_ms: float
    decode_ms: float
    timed_steps: int
    warmup_ms: float = 0.0
    capture_ms: float = 0.0
    captured: bool = False
    breakdown: dict | None = None

    @property
    def step_ms(self) -> float:
        """Milliseconds per decode step."""
        return self.decode_ms / self.timed_steps

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: ``batch * timed_steps / decode time`` (tokens/s)."""
        return self.batch * self.timed_steps / (self.decode_ms / 1e3)

    def to_dict(self) -> dict:
        return {**asdict(self), "step_ms": self.step_ms, "tokens_per_s": self.tokens_per_s}


def _sdpa(backends) -> contextlib.AbstractContextManager:
    """``torch.nn.attention.sdpa_kernel(backends)``, or nothing for ``None`` (torch's own choice)."""
    if backends is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backends)


def _check_prompt(prompt_ids: object, new_tokens: object, warmup_steps: int) -> None:
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be a [batch, length] tensor of token ids, got "
                         f"{getattr(prompt_ids, 'shape', type(prompt_ids).__name__)}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < warmup_steps + 2:
        raise ValueError(f"new_tokens must be an int >= warmup_steps + 2 = {warmup_steps + 2} (one timed "
                         f"decode step at least), got {new_tokens!r}")


def first_tokens(model, cache, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Prefill the prompt ``[batch, L]`` into ``cache`` (:func:`mustafar.generation.prefill`).

    Returns the first generated tokens ``[batch, 1]`` (greedy).
    """
    return prefill(model, prompt_ids, cache)[1].argmax(-1, keepdim=True)


class DecodeStep:
    """The static buffers of the decode loop and the step that updates them in place."""

    def __init__(self, model, cache, first: torch.Tensor, position: int, new_tokens: int):
        self.model, self.kwargs = model, cache_kwargs(model, cache)
        self.ids = first.clone()
        self.position = torch.full((1, 1), position, dtype=torch.long, device=first.device)
        self.tokens = torch.zeros(first.shape[0], new_tokens + 1, dtype=torch.long, device=first.device)
        self.tokens[:, :1] = first
        self.slot = torch.ones(1, dtype=torch.long, device=first.device)

    def __call__(self) -> None:
        out = self.model(input_ids=self.ids, position_ids=self.position, use_cache=True, logits_to_keep=1,
                         **self.kwargs)
        self.ids.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.tokens.index_copy_(1, self.slot, self.ids)
        self.slot += 1
        self.position += 1


@torch.inference_mode()
def graph_decode(model, cache, prompt_ids: torch.Tensor, new_tokens: int, capture: bool | None = None,
                 warmup_steps: int = 2, breakdown=None, sdpa_backends=None) -> tuple[torch.Tensor, DecodeTimings]:
    """Greedy-decode ``new_tokens`` tokens after ``prompt_ids`` through a static ``cache``.

    Args:
        model: a transformers causal LM on the prompt's device.
        cache: an empty static cache with room for ``L + new_tokens - 1`` tokens (the
            last generated token is not fed back), or more for ``breakdown``'s extra step.
        prompt_ids: ``[batch, L]`` int64 token ids.
        new_tokens: tokens to generate, >= ``warmup_steps + 2``.
        capture: capture the decode step in a CUDA graph (default: on CUDA devices).
        warmup_steps: eager decode steps before capture/timing, not timed.
        breakdown: optional ``callable(step, step_ms, captured) -> dict``, called after the timed steps
            with an eager step function (see :func:`mustafar.bench.breakdown.step_breakdown`).
        sdpa_backends: ``torch.nn.attention.SDPBackend`` list allowed in the decode steps (not the
            prefill); None: torch's choice.

    Returns:
        ``(tokens [batch, new_tokens] int64, DecodeTimings)``.

    Raises:
        ValueError: a bad ``prompt_ids`` or ``new_tokens``; ``capture`` on a non-CUDA device.
    """
    _check_prompt(prompt_ids, new_tokens, warmup_steps)
    clock = Clock(prompt_ids.device)
    capture = clock.cuda if capture is None else bool(capture)
    if capture and not clock.cuda:
        raise ValueError(f"capture=True needs CUDA tensors, got prompt_ids on {prompt_ids.device}")
    first, prefill_ms = clock.wall_ms(lambda: first_tokens(model, cache, prompt_ids))
    step = DecodeStep(model, cache, first, prompt_ids.shape[1], new_tokens)
    with _sdpa(sdpa_backends):
        _, warmup_ms = clock.wall_ms(lambda: _warm_up(step, warmup_steps, capture))
        run, capture_ms = clock.wall_ms(lambda: _capture(step) if capture else step)
        timed = new_tokens - 1 - warmup_steps
        _, decode_ms = clock.wall_ms(lambda: [run() for _ in range(timed)])
        timings = DecodeTimings(prompt_ids.shape[0], prefill_ms, decode_ms, timed, warmup_ms, capture_ms, capture)
        if breakdown is not None:
            timings.breakdown = breakdown(step, timings.step_ms, capture)
    return step.tokens[:, :new_tokens].clone(), timings


def _warm_up(step: DecodeStep, steps: int, side_stream: bool) -> None:
    """Run ``steps`` eager steps (on a side stream before a capture, as CUDA graphs require)."""
    if not side_stream:
        for _ in range(steps):
            step()
        return
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(steps):
            step()
    torch.cuda.current_stream().wait_stream(stream)


def _capture(step: DecodeStep):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@torch.inference_mode()
def generate_decode(model, cache, prompt_ids: torch.Tensor, new_tokens: int, breakdown=None,
                    sdpa_backends=None) -> tuple[torch.Tensor, DecodeTimings]:
    """Greedy-decode with eager ``model.generate()``, the prompt prefilled into ``cache`` first (timed apart).

    ``generate`` gets the prompt and the first token with ``cache`` holding the
    prompt, so it runs ``new_tokens - 1`` one-token forward passes, all timed.
    Arguments and result as for :func:`graph_decode` (no warm-up: warm the
    kernels up beforehand).
    """
    _check_prompt(prompt_ids, new_tokens, 0)
    clock = Clock(prompt_ids.device)
    first, prefill_ms = clock.wall_ms(lambda: first_tokens(model, cache, prompt_ids))
    ids, kwargs = torch.cat([prompt_ids, first], dim=1), cache_kwargs(model, cache)
    with _sdpa(sdpa_backends):
        out, decode_ms = clock.wall_ms(lambda: model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens - 1, do_sample=False,
            pad_token_id=0, **kwargs))
        timings = DecodeTimings(prompt_ids.shape[0], prefill_ms, decode_ms, new_tokens - 1)
        if breakdown is not None:
            position = torch.full((1, 1), out.shape[1] - 1, dtype=torch.long, device=out.device)
            step = lambda: model(input_ids=out[:, -1:], position_ids=position, use_cache=True, logits_to_keep=1,
                                 **kwargs)
            timings.breakdown = breakdown(step, timings.step_ms, False)
    return out[:, prompt_ids.shape[1]:], timings

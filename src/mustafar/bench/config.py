"""The benchmark's configuration: one frozen dataclass, validated on construction, and the ``--quick`` preset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..config import SparsityConfig, parse_setting
from ..generation import MODES, parse_dtype
from ..weights import check_weights
from .capacity import PREFILLS
from .models import SHAPES

__all__ = ["BenchConfig", "DEFAULT_GRID", "QUICK", "SHAPE_GRIDS"]

#: The default grid ``(batches, prompts)``: GPU-sized (a Llama-3-8B shape on an H200).
DEFAULT_GRID = ((1, 8, 16, 32), (4096, 16384, 32768))
#: Shapes with a grid of their own: ``tiny`` (for tests and CPUs) a CPU-sized one (issue 17).
SHAPE_GRIDS = {"tiny": ((1, 4), (256, 1024))}


def _positive_ints(name: str, values: object) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__} {values!r}")
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of ints >= 1, got {values!r}")
    return values


def _names(name: str, values: object, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    values = (values,) if isinstance(values, str) else tuple(values)
    if not values or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{name} must be a non-empty sequence of strings, got {values!r}")
    if allowed is not None and any(v not in allowed for v in values):
        raise ValueError(f"{name} must be drawn from {allowed}, got {values!r}")
    return values


@dataclass(frozen=True)
class BenchConfig:
    """What ``mustafar bench`` runs.

    Attributes:
        shape: a key of :data:`mustafar.bench.models.SHAPES`; layers: override its depth (None: as is).
        batches, prompts: the grid (sequences, prompt tokens); None: the shape's grid (:data:`SHAPE_GRIDS`,
            else :data:`DEFAULT_GRID`, its prompts limited to the shape's positions). Every prompt plus
            ``new_tokens`` must fit the shape's ``max_position_embeddings``.
        settings: ``"dense"`` or ``"K<s>V<s>"`` names; modes: ``"generate"`` and/or ``"graph"``.
        new_tokens: tokens generated per case (the first comes from the prefill).
        warmup_steps: eager decode steps before the graph capture, untimed.
        window, chunk: of the sparse caches (local window and compression chunk, tokens).
        ttft_repeats: prefills timed per case (median); ttft_repeat_below_ms: repeat only if
            one prefill took less (longer prefills are timed once).
        op_repeats: calls per timing of an isolated op in the step breakdown.
        seed: of the random prompts; device: default CUDA if available.
        dtype: of the model and caches (None: float16 on CUDA, bfloat16 on CUDA with ``weights="int4"`` (the
            dtype of torch's tinygemm 4-bit kernel), float32 on a CPU, where fp16 matmuls are slow).
        weights: None (weights in ``dtype``), ``"int4"`` or ``"int8"``: weight-only quantisation of the model's
            linear layers through torchao (:func:`mustafar.weights.quantize_weights`); every row uses that model.
        memory_limit_bytes: pretend the device holds this much (weights included); None: its real free memory.
        backend: of the Mustafar caches (``"auto"``, ``"cuda"``, ``"triton"``, ``"torch"``).
        capture: capture the graph-mode step in a CUDA graph (None: on CUDA devices).
        generate_cudnn: let SDPA use its cuDNN backend in the decode steps of ``generate`` mode.
            Off by default: torch 2.11 picks cuDNN for one-token GQA decode on an H200 and builds
            a new execution plan whenever the KV length changes (about 20 ms of CPU per layer
            call, measured), so eager dense decoding would pay for plan building, not attention
            (Llama-3-8B, batch 1 x 32k: 80 ms per step with cuDNN, 35 ms without). The graph
            mode (static shapes: one plan) and every prefill keep torch's choice.
        warmup: run a small case per (mode, setting) first (kernel compilation), untimed.
        capacity: run the capacity search instead of the grid, at each prompt, with budget_gib
            (GiB, weights included; None: the device's memory), capacity_steps decode steps per
            probe, capacity_slack (see :mod:`mustafar.bench.capacity`) and max_batch.
        capacity_prefill: ``"one"`` (prefill one sequence and repeat its cache to the batch, so
            that the cache, not one huge prefill, bounds the batch) or ``"batch"``; graph mode
            always prefills the batch.
        prefill_chunk: prefill every case (and capacity probe) in chunks of this many tokens,
            each attending to everything before it, so that a batch's prefill activations are
            those of ``batch * prefill_chunk`` tokens; None: one step for the whole prompt.
        random_fill: fill each grid case's cache with random K and V instead of prefilling it
            (:func:`mustafar.bench.decode.fill_random`): decode rows at a fraction of the time
            (a 16 x 32k prefill of Llama-3-8B takes about 20 s on an H200), no time to first
            token (``ttft_ms`` None). Capacity probes always prefill.
    """

    shape: str = "llama3-8b"
    layers: int | None = None
    batches: tuple[int, ...] | None = None
    prompts: tuple[int, ...] | None = None
    settings: tuple[str, ...] = ("dense", "K0.5V0.5", "K0.7V0.7")
    modes: tuple[str, ...] = MODES
    new_tokens: int = 32
    warmup_steps: int = 2
    window: int = 32
    chunk: int = 256
    ttft_repeats: int = 3
    ttft_repeat_below_ms: float = 2000.0
    op_repeats: int = 20
    seed: int = 0
    dtype: str | None = None
    weights: str | None = None
    device: str | None = None
    memory_limit_bytes: int | None = None
    backend: str = "auto"
    capture: bool | None = None
    generate_cudnn: bool = False
    warmup: bool = True
    capacity: bool = False
    budget_gib: float | None = None
    capacity_steps: int = 4
    capacity_slack: float = 0.25
    max_batch: int = 4096
    capacity_prefill: str = "one"
    prefill_chunk: int | None = None
    random_fill: bool = False
    sparsity: tuple[SparsityConfig, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if self.layers is not None:
            _positive_ints("layers", (self.layers,))
        batches, prompts = SHAPE_GRIDS.get(self.shape, DEFAULT_GRID)
        positions = SHAPES[self.shape].fields["max_position_embeddings"]
        if self.prompts is None:
            new = self.new_tokens if isinstance(self.new_tokens, int) else 0  # checked below
            prompts = tuple(p for p in prompts if p + new <= positions) or (positions // 2,)  # half: room to decode
        object.__setattr__(self, "batches", _positive_ints("batches", batches if self.batches is None
                                                           else self.batches))
        object.__setattr__(self, "prompts", _positive_ints("prompts", prompts if self.prompts is None
                                                           else self.prompts))
        object.__setattr__(self, "modes", _names("modes", self.modes, MODES))
        object.__setattr__(self, "settings", _names("settings", self.settings))
        parsed = tuple(parse_setting(s, window=self.window, chunk=self.chunk) for s in self.settings)
        names = [p.name for p in parsed]
        if len(set(names)) != len(names):
            raise ValueError(f"settings must be distinct, got {list(self.settings)} (the same as {names})")
        object.__setattr__(self, "sparsity", parsed)
        for name in ("ttft_repeats", "op_repeats", "capacity_steps", "max_batch"):
            _positive_ints(name, (getattr(self, name),))
        _positive_ints("warmup_steps", (self.warmup_steps + 1,))
        if isinstance(self.new_tokens, bool) or not isinstance(self.new_tokens, int) or \
                self.new_tokens < self.warmup_steps + 2:
            raise ValueError(f"new_tokens must be an int >= warmup_steps + 2 = {self.warmup_steps + 2}, "
                             f"got {self.new_tokens!r}")
        longest = max(self.prompts)
        if longest + self.new_tokens > positions:
            raise ValueError(f"prompts + new_tokens must fit the {self.shape} shape's {positions} positions "
                             f"(max_position_embeddings), got prompt {longest} + {self.new_tokens} new tokens")
        if self.dtype is not None:
            parse_dtype(self.dtype)
        check_weights(self.weights)
        if self.memory_limit_bytes is not None:
            _positive_ints("memory_limit_bytes", (self.memory_limit_bytes,))
        if self.budget_gib is not None and not (isinstance(self.budget_gib, (int, float)) and self.budget_gib > 0):
            raise ValueError(f"budget_gib must be a positive number of GiB or None, got {self.budget_gib!r}")
        if self.prefill_chunk is not None:
            _positive_ints("prefill_chunk", (self.prefill_chunk,))
        if self.capacity_prefill not in PREFILLS:
            raise ValueError(f"capacity_prefill must be one of {PREFILLS}, got {self.capacity_prefill!r}")
        if not (isinstance(self.capacity_slack, (int, float)) and self.capacity_slack >= 0):
            raise ValueError(f"capacity_slack must be a number >= 0, got {self.capacity_slack!r}")

    def replace(self, **changes) -> "BenchConfig":
        """A copy with ``changes`` (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (the parsed settings left out)."""
        data = asdict(self)
        data.pop("sparsity")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


#: ``--quick``: Llama-3-8B shape, batch 1 and 16, a 32k prompt, both modes, all three settings.
QUICK = dict(shape="llama3-8b", batches=(1, 16), prompts=(32768,))

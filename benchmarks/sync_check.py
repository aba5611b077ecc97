"""Host-synchronisation check of the eager decode path on a CUDA device.

Runs greedy decode steps of a small random Llama with ``MustafarCache`` under
``torch.cuda.set_sync_debug_mode("warn")`` and prints every distinct place in the
step that synchronises the host with the GPU (there should be none: a sync per
layer stalls eager decoding). Also times the eager step with and without the
sparse cache. Usage: ``PYTHONPATH=src python benchmarks/sync_check.py``.
"""

from __future__ import annotations

import collections
import time
import traceback
import warnings

import torch
import transformers

import mustafar
from mustafar.generation import cache_kwargs


def main() -> None:
    cfg = transformers.LlamaConfig(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                                   head_dim=128, intermediate_size=2048, vocab_size=32000)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="mustafar", dtype=torch.float16)
    model = model.cuda().eval()
    ids = torch.randint(32000, (1, 4000), device="cuda")
    for name, make in (("dense", transformers.DynamicCache), ("K0.7V0.7", lambda: mustafar.MustafarCache(0.7, 0.7))):
        cache = make()
        kwargs = cache_kwargs(model, cache)
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
            token = out.logits[:, -1:].argmax(-1)
            position = torch.full((1, 1), ids.shape[1], device="cuda")
            for _ in range(3):
                out = model(input_ids=token, position_ids=position, use_cache=True, logits_to_keep=1, **kwargs)
                token = out.logits[:, -1:].argmax(-1)
                position += 1
            torch.cuda.synchronize()
            places = collections.Counter()

            def record(message, category, filename, lineno, file=None, line=None):
                if "synchroniz" in str(message).lower():
                    frames = [f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]
                              if "mustafar" in f.filename or "transformers" in f.filename][-4:]
                    places[" <- ".join(reversed(frames)) or f"{filename}:{lineno}"] += 1

            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                torch.cuda.set_sync_debug_mode("warn")
                start = time.perf_counter()
                steps = 50
                for _ in range(steps):
                    out = model(input_ids=token, position_ids=position, use_cache=True, logits_to_keep=1, **kwargs)
                    token = out.logits[:, -1:].argmax(-1)
                    position += 1
                host = (time.perf_counter() - start) / steps * 1e3
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
                total = (time.perf_counter() - start) / steps * 1e3
        print(f"{name}: host time per step {host:.2f} ms, with the GPU {total:.2f} ms; syncs: {sum(places.values())}")
        for place, count in places.most_common(10):
            print(f"   {count:5d} x {place}")
        del cache


if __name__ == "__main__":
    main()

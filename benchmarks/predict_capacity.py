"""The capacity search's memory-model prediction, without a GPU: max batch per setting and prefill chunk.

The same prediction the capacity search starts from (:func:`mustafar.bench.capacity.predicted_max_batch`):
weights + :func:`mustafar.bench.memory.predict_bytes` within the budget, for a shape of
:data:`mustafar.bench.models.SHAPES` in fp16. The weights are counted on a model built on the ``meta`` device
(parameters x 2 bytes), so nothing is allocated. Graph mode prefills the whole batch
(:func:`mustafar.bench.capacity.prefill_kind`), which is what bounds it at large chunks.

Usage (CPU, repository root)::

    PYTHONPATH=src python benchmarks/predict_capacity.py [--shape llama3-8b] [--prompt 32768] [--budget-gib 80]
        [--mode graph] [--chunks 4096,1024,512,256] [--settings dense,K0.7V0.7,K0.7V0.7-fp8]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

from mustafar.bench.capacity import prefill_kind
from mustafar.bench.config import BenchConfig
from mustafar.bench.memory import predict_bytes
from mustafar.bench.models import build_config, model_dims
from mustafar.config import parse_setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--budget-gib", type=float, default=80.0)
    parser.add_argument("--mode", default="graph", choices=("graph", "generate"))
    parser.add_argument("--chunks", default="4096,1024,512,256")
    parser.add_argument("--settings", default="dense,K0.7V0.7,K0.7V0.7-fp8")
    args = parser.parse_args()
    config = build_config(args.shape)
    with torch.device("meta"):
        weights = 2 * sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    dims, budget = model_dims(config), args.budget_gib * 2**30
    steps = BenchConfig.capacity_steps
    one = prefill_kind(args.mode, "one") == "one"
    print(f"{args.shape}: weights {weights / 1e9:.2f} GB, {args.prompt} prompt tokens, {args.budget_gib} GiB, "
          f"{args.mode} mode, {'one-sequence' if one else 'batch'} prefill, {steps} decode steps")
    for chunk in map(int, args.chunks.split(",")):
        batches = {}
        for name in args.settings.split(","):
            setting, batch = parse_setting(name), 0
            while weights + predict_bytes(dims, setting, args.mode, batch + 1, args.prompt, steps + 1,
                                          torch.float16, prefill_batch=1 if one else None,
                                          chunk=chunk)["total"] <= budget:
                batch += 1
            batches[name] = batch
        dense = batches.get("dense")
        cells = [f"{name} {b}" + (f" ({b / dense:.2f}x)" if dense and name != "dense" else "")
                 for name, b in batches.items()]
        print(f"chunk {chunk}: " + ", ".join(cells))


if __name__ == "__main__":
    main()

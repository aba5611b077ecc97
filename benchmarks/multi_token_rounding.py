"""Where blocks of query tokens and single tokens part on the GPU: per layer count and backend (issue 17's check).

For a tiny fp16 Llama (head_dim 64, 4 query heads, 2 KV heads) with every linear layer applied token by
token (so that the cache receives bit-identical keys and values from the first layer), teacher-forced
logits with blocks of 6 tokens against one token at a time, with 1 and 2 layers and each backend. Prints
the largest logit difference and the positions where it exceeds 0.02: with 1 layer the difference is the
kernels' fp16 rounding; with 2 it also holds the pruning flips that rounding causes in the next layer.

Usage (repository root, a CUDA machine)::

    PYTHONPATH=src python benchmarks/multi_token_rounding.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import forced_logits, prompt, tiny_model  # noqa: E402
from test_speculative import row_by_row  # noqa: E402

from mustafar import MustafarCache  # noqa: E402


def main() -> None:
    for layers in (2, 1):
        for backend in ("cuda", "triton", "torch"):
            model = row_by_row(tiny_model(seed=6, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                                          num_hidden_layers=layers, dtype=torch.float16).cuda())
            ids = prompt(60, seed=7).cuda()
            setting = dict(key_sparsity=0.6, value_sparsity=0.4, window=3, chunk=8, backend=backend)
            blocks = forced_logits(model, MustafarCache(**setting), ids, 17, block=6)
            single = forced_logits(model, MustafarCache(**setting), ids, 17, block=1)
            diff = (blocks - single).abs().amax(-1)[0]
            print(layers, backend, f"max {diff.max().item():.4f}", "positions > 0.02:",
                  (diff > 0.02).nonzero().flatten().tolist(), flush=True)


if __name__ == "__main__":
    main()

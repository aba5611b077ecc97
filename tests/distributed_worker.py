"""One rank of the tensor-parallel CPU test (``tests/test_distributed.py``); run under ``torchrun``.

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py MODEL_DIR OUT_DIR``

``MODEL_DIR``: a saved Llama (float32); ``OUT_DIR/prompt.pt``: the prompt ``[batch, n]`` int64. Every rank
first decodes the prompt greedily with the plain model (one process, no parallelism: the reference),
then loads the model again with transformers' tensor-parallel plan (``tp_plan="auto"``, gloo on the
CPU) and decodes it with each cache. It writes ``OUT_DIR/rank{r}.json`` (tokens, per-layer KV heads,
devices and bytes of each cache) and ``OUT_DIR/rank{r}.pt`` (layer 0's keys, store decompressed then
window, ``[batch, kv_heads of the rank, tokens, head_dim]``, for the reference and for tensor parallelism).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import transformers

import mustafar
from mustafar.generation import cache_kwargs

NEW_TOKENS, WINDOW, CHUNK, SPARSITY = 12, 8, 16, 0.5


def load(model_dir: str, tp: bool):
    """The saved model, plain or sharded with its tensor-parallel plan, in eval mode."""
    kwargs = {}
    if tp:
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="mustafar",
                                                              dtype=torch.float32, **kwargs)
    return model.eval()


def generate(model, prompt: torch.Tensor, cache) -> list[list[int]]:
    extra = {} if cache is None else cache_kwargs(model, cache)
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0, **extra)
    return out[:, prompt.shape[1]:].tolist()


def static_loop(model, prompt: torch.Tensor, cache) -> list[list[int]]:
    """Greedy tokens through a StaticMustafarCache: one prefill, then one-token steps with explicit positions."""
    batch, n = prompt.shape
    with torch.inference_mode():
        logits = model(prompt, position_ids=torch.arange(n).expand(batch, n), **cache_kwargs(model, cache)).logits
        tokens = [logits[:, -1:].argmax(-1)]
        for step in range(NEW_TOKENS - 1):
            position = torch.full((batch, 1), n + step)
            logits = model(tokens[-1], position_ids=position, **cache_kwargs(model, cache)).logits
            tokens.append(logits[:, -1:].argmax(-1))
    return torch.cat(tokens, 1).tolist()


def describe(cache) -> dict:
    """KV heads, device and dtype of every layer's window and stores, and the cache's bytes."""
    layers = [{"window_heads": layer.keys.shape[1], "key_store_heads": layer.key_store.shape[1],
               "value_store_heads": layer.value_store.shape[1], "device": str(layer.keys.device),
               "store_device": str(layer.key_store.device), "dtype": str(layer.keys.dtype)}
              for layer in cache.layers]
    return {"layers": layers, "nbytes": cache.nbytes, "allocated_nbytes": cache.allocated_nbytes}


def layer0_keys(cache) -> torch.Tensor:
    layer = cache.layers[0]
    return torch.cat([layer.key_store.decompress(), layer.keys], dim=2).clone()


def run_all(model, prompt: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Tokens and cache facts of: dense K0V0, K0.5V0.5 (MustafarCache) and the static K0.5V0.5 cache."""
    n = prompt.shape[1]
    dense = mustafar.MustafarCache(0.0, 0.0, window=WINDOW, chunk=CHUNK)
    sparse = mustafar.MustafarCache(SPARSITY, SPARSITY, window=WINDOW, chunk=CHUNK)
    static = mustafar.StaticMustafarCache(model.config, prompt.shape[0], n + NEW_TOKENS, SPARSITY, SPARSITY,
                                          window=WINDOW)
    result = {"dense": generate(model, prompt, dense), "sparse": generate(model, prompt, sparse),
              "static": static_loop(model, prompt, static)}
    result["caches"] = {"dense": describe(dense), "sparse": describe(sparse), "static": describe(static)}
    return result, layer0_keys(sparse)


def main(model_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    prompt = torch.load(out / "prompt.pt")
    plain = load(model_dir, tp=False)  # before the process group exists
    reference, reference_keys = run_all(plain, prompt)
    reference["dynamic"] = generate(plain, prompt, None)
    model = load(model_dir, tp=True)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    tp, tp_keys = run_all(model, prompt)
    weight = model.model.layers[0].self_attn.k_proj.weight
    facts = {"rank": rank, "world_size": world, "transformers": transformers.__version__,
             "k_proj_local_rows": weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0]}
    (out / f"rank{rank}.json").write_text(json.dumps({**facts, "reference": reference, "tp": tp}))
    torch.save({"reference": reference_keys, "tp": tp_keys}, out / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(*sys.argv[1:3])

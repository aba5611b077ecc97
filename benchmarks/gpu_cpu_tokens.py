"""Issue 8's check: the first greedy tokens of the sparse cache on the GPU vs the CPU reference path.

Same random weights (SmolLM2-135M shape, seeded), same prompt, ``MustafarCache`` at K0.7V0.7:
once on the CPU (PyTorch reference attention and compression) and once on a CUDA device (the CUDA
kernels), both in fp16 weights promoted per device as the user would run them. Prints and writes a
JSON with the tokens of both, whether they match, and where they do not the first divergent step
with the top-2 logit gap of each side there (a near-tie that fp16 rounding flips is not a bug).

Usage (repository root): ``PYTHONPATH=src python benchmarks/gpu_cpu_tokens.py [--tokens 32] [--out F]``;
``--cpu-only`` runs just the CPU side (what CI can check).
"""

from __future__ import annotations

import argparse
import json

import torch
import transformers

import mustafar


def build(seed: int, layers: int) -> tuple[transformers.PreTrainedModel, transformers.LlamaConfig]:
    """SmolLM2-135M-shaped Llama (9 heads, 3 KV heads, head_dim 64) with seeded random fp32 weights."""
    cfg = transformers.LlamaConfig(hidden_size=576, num_hidden_layers=layers, num_attention_heads=9,
                                   num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=100000.0)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="mustafar")
    return model.eval(), cfg


def greedy(model, prompt: torch.Tensor, tokens: int, device: str, dtype: torch.dtype):
    """Greedy tokens and per-step logits with a fresh ``MustafarCache`` (K0.7V0.7, window 32, chunk 64)."""
    model = model.to(device=device, dtype=dtype)
    cache = mustafar.MustafarCache(0.7, 0.7, window=32, chunk=64)
    with torch.no_grad():
        out = model.generate(prompt.to(device), past_key_values=cache, max_new_tokens=tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, prompt.shape[1]:].cpu()
    return new, [s[0].float().cpu() for s in out.scores]


def divergence(a, b, scores_a, scores_b) -> dict:
    """First step where the token lists differ, with each side's top-2 logit gap there."""
    for step, (x, y) in enumerate(zip(a.tolist(), b.tolist())):
        if x != y:
            gaps = [float(s[step].topk(2).values.diff().abs()) for s in (scores_a, scores_b)]
            return dict(step=step, cpu_token=x, gpu_token=y, cpu_top2_gap=gaps[0], gpu_top2_gap=gaps[1])
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=300)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, _ = build(args.seed, args.layers)
    prompt = torch.randint(49152, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed + 1))
    cpu_tokens, cpu_scores = greedy(model, prompt, args.tokens, "cpu", torch.float16)
    result = dict(tokens=args.tokens, prompt_len=args.prompt_len, layers=args.layers, setting="K0.7V0.7",
                  cpu=cpu_tokens.tolist())
    if not args.cpu_only:
        gpu_tokens, gpu_scores = greedy(model, prompt, args.tokens, "cuda", torch.float16)
        result.update(gpu=gpu_tokens.tolist(), match=bool(torch.equal(cpu_tokens, gpu_tokens)),
                      divergence=divergence(cpu_tokens, gpu_tokens, cpu_scores, gpu_scores),
                      device=torch.cuda.get_device_name(), torch=torch.__version__)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

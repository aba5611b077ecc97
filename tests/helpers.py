"""Shared pieces of the tests: tiny models, an offline tokenizer, an oracle cache, fixtures' helpers.

Tiny models: :func:`tiny_model` (random weights, ``"mustafar"`` attention, in memory) and
:func:`save_tiny_model` (a 2-layer Llama and :func:`tiny_tokenizer`, a byte-level tokenizer with a chat
template, saved to a directory: no hub access).

The oracle, :class:`ReferenceCache`, is a transformers ``DynamicCache`` that keeps
every token dense and returns, from each update after the prefill, each row's
tokens before its boundary pruned per token (``prune_per_token``): the rule of
:mod:`mustafar.cache.rules`, written out again independently. The ``"mustafar"``
attention runs plain SDPA over it, so a model decoding with it computes what a
``MustafarCache`` must compute, by another road, one token at a time. (Its multi-token
steps prune every query at the step's last boundary; a ``MustafarCache`` shows each
query what token-by-token decoding would (issue 17), so steps of several tokens are
compared with the oracle decoding one token at a time.)
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaModel

import mustafar  # noqa: F401  (registers the "mustafar" attention)
from mustafar import MustafarCache, prune_per_token

# transformers >= 5.18 renamed the cache argument of forward/generate to `cache`.
CACHE = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
VOCAB = 128
BASE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": VOCAB, "initializer_range": 0.2}


def tiny_model(config=None, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random model (``"mustafar"`` attention, eval mode) of ``config`` or a tiny Llama with ``overrides``."""
    torch.manual_seed(seed)
    config = config if config is not None else LlamaConfig(**{**BASE, **overrides})
    return AutoModelForCausalLM.from_config(config, attn_implementation="mustafar").to(dtype).eval()


def prompt(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    """Random token ids ``[batch, length]`` (int64)."""
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[len(rows), longest]`` of 1-d prompts padded on the left."""
    longest = max(row.numel() for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, longest - row.numel():], mask[i, longest - row.numel():] = row, 1
    return ids, mask


def boundary(total: int, pads: int, window: int, chunk: int) -> int:
    """Tokens of a row attended pruned: its pads and whole chunks of real tokens leaving ``window`` dense."""
    pads = min(pads, total)
    return pads + max(0, (total - pads - window) // chunk) * chunk


class ReferenceCache(DynamicCache):
    """The oracle: dense storage; each update after the prefill returns the tokens before each row's boundary pruned.

    ``layer_sparsity``: ``layer_idx -> (key_sparsity, value_sparsity)``; ``pads``: left padding per row.
    """

    def __init__(self, key_sparsity=0.5, value_sparsity=0.5, window=32, chunk=256, layer_sparsity=None, pads=None):
        super().__init__()
        self.rule = (window, chunk)
        self.sparsity = layer_sparsity or (lambda i: (key_sparsity, value_sparsity))
        self.pads = pads

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        prefill = self.get_seq_length(layer_idx) == 0  # the first update, of any length (issue 17)
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if prefill:
            return keys, values
        pads = self.pads if self.pads is not None else [0] * keys.shape[0]
        out = []
        for tensor, sparsity in zip((keys, values), self.sparsity(layer_idx)):
            rows = []
            for row, p in enumerate(pads):
                n = boundary(keys.shape[2], p, *self.rule)
                x = tensor[row:row + 1]
                rows.append(torch.cat([prune_per_token(x[:, :, :n], sparsity), x[:, :, n:]], dim=2))
            out.append(torch.cat(rows))
        return tuple(out)


def generate(model, ids, cache=None, new=20, **kwargs):
    """``model.generate`` with exactly ``new`` tokens, greedy unless told, with ``cache`` if given."""
    extra = {CACHE: cache} if cache is not None else {}
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, **extra, **kwargs)


@torch.inference_mode()
def forced_logits(model, cache, ids: torch.Tensor, prefill: int, block: int = 1) -> torch.Tensor:
    """Logits ``[batch, n - prefill + 1, vocab]`` fp32: a prefill of ``prefill`` tokens, then ``block`` at a time."""
    logits = [model(ids[:, :prefill], **{CACHE: cache}).logits[:, -1:].float()]
    for start in range(prefill, ids.shape[1], block):
        logits.append(model(ids[:, start:start + block], **{CACHE: cache}).logits.float())
    return torch.cat(logits, dim=1)


SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer without merges: one token per UTF-8 byte, plus three special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({tok: len(alphabet) + i for i, tok in enumerate(SPECIAL)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Save a 2-layer Llama (4 query heads, 2 KV heads, head_dim 16) and :func:`tiny_tokenizer` to ``directory``."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def random_stores(seed=0, tokens=40, d=16):
    """Two compressed fp32 stores ``[1, 2, tokens, d]`` at sparsity 0.5 (keys, values) of seeded random data."""
    gen = torch.Generator().manual_seed(seed)
    return (mustafar.compress(torch.randn(1, 2, tokens, d, generator=gen), 0.5),
            mustafar.compress(torch.randn(1, 2, tokens, d, generator=gen), 0.5))


#: Batch rows, KV heads and head_dim of :func:`states` and :func:`filled_cache`.
BATCH, HEADS, DIM = 3, 2, 16


def plain(output: str) -> str:
    """The command's output without rich's box borders and line breaks."""
    return " ".join(output.replace("│", " ").split())


def states(batch=BATCH, heads=HEADS, tokens=5, dim=DIM, dtype=torch.float32, device="cpu"):
    """Random key and value states ``[batch, heads, tokens, dim]`` for ``Cache.update``."""
    return (torch.randn(batch, heads, tokens, dim, dtype=dtype, device=device),
            torch.randn(batch, heads, tokens, dim, dtype=dtype, device=device))


def filled_cache(layers=2, tokens=12) -> MustafarCache:
    """A cache of ``layers`` layers holding ``tokens`` tokens (some in the store), batch rows 0..2 told apart."""
    cache = MustafarCache(0.5, 0.5, window=2, chunk=4)
    for layer_idx in range(layers):
        cache.update(*states(tokens=tokens), layer_idx)
        cache.layers[layer_idx].consume()
    return cache


def snapshot(cache: MustafarCache):
    """Each layer's window keys, decompressed key store and pads (to check that a refused call changed nothing)."""
    return [(layer.keys.clone(), layer.key_store.decompress(), list(layer.pads)) for layer in cache.layers]


def assert_unchanged(cache: MustafarCache, before) -> None:
    for layer, (keys, store, pads) in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.key_store.decompress(), store)
        assert layer.pads == pads


def randn(shape, seed, dtype=torch.float32):
    """Seeded standard-normal data, drawn in fp32 and cast."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)

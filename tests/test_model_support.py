"""Model families, head dims and dtypes served by MustafarCache; clear errors for the models it cannot serve (issue 5).

Served (checked in transformers 5.17 and 5.24): every decoder-only family here
whose attention goes through the standard interface. Each is compared logit by
logit, teacher-forced: at sparsity 0 with dense SDPA over a ``DynamicCache``, at
sparsity > 0 with the oracle (:class:`helpers.ReferenceCache`).
Gemma3's interleaved sliding layers and Mistral's sliding window work through
the attention mask (the cache keeps every token of such layers: a warning says
so). Refused with ``ValueError`` at construction (``config=``) or first use:
soft-capping (Gemma2), multi-head latent attention (DeepSeek V3),
encoder-decoder cross-attention (BART), other layer types, head_dim > 256.
"""

import pytest
import torch
import transformers
from helpers import (
    BASE,
    CACHE,
    ReferenceCache,
    forced_logits,
    generate,
    prompt,
    tiny_model,
)
from transformers import DynamicCache

from mustafar import MustafarCache, SparsityConfig
from mustafar.model_support import check_model_config

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
]
SMALL = {**BASE, "num_attention_heads": 2, "num_key_value_heads": 1}
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**BASE),
    "mistral-sliding": lambda: transformers.MistralConfig(**BASE, head_dim=16, sliding_window=20),
    "qwen2-biases": lambda: transformers.Qwen2Config(**BASE),
    "qwen3-qk-norm": lambda: transformers.Qwen3Config(**BASE, head_dim=24, attention_bias=True),
    "gemma": lambda: transformers.GemmaConfig(**BASE, head_dim=16),
    "gemma3-interleaved-sliding": lambda: transformers.Gemma3TextConfig(
        **BASE, head_dim=16, sliding_window=12, layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda: transformers.Phi3Config(**BASE, pad_token_id=0),
}


def compare(model, ids, prefill, setting, dense_atol=2e-5, atol=1e-4):
    """Teacher-forced logits of a MustafarCache vs dense (sparsity 0) and vs the oracle (the setting)."""
    zero = forced_logits(model, MustafarCache(0.0, 0.0, window=setting["window"], chunk=setting["chunk"]), ids,
                         prefill)
    torch.testing.assert_close(zero, forced_logits(model, DynamicCache(), ids, prefill), rtol=1e-5, atol=dense_atol)
    sparse = forced_logits(model, MustafarCache(**setting), ids, prefill, block=3)
    # blocks of 3 see what token-by-token decoding sees (issue 17): the oracle runs one token at a time
    torch.testing.assert_close(sparse, forced_logits(model, ReferenceCache(**setting), ids, prefill, block=1),
                               rtol=0, atol=atol)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_dense_and_oracle(family):
    config = FAMILIES[family]()
    model = tiny_model(config, seed=2)
    ids = prompt(48, seed=3)
    setting = {"key_sparsity": 0.5, "value_sparsity": 0.7, "window": 4, "chunk": 6}
    compare(model, ids, 20, setting)
    cache = MustafarCache(**setting, config=config)  # the config check accepts it
    generate(model, ids[:, :20], cache, 5, attention_mask=torch.ones_like(ids[:, :20]))  # ids may hold the pad id
    assert cache.get_seq_length() == 24


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims(head_dim):
    model = tiny_model(seed=4, **SMALL, head_dim=head_dim)
    compare(model, prompt(30, seed=5), 12, {"key_sparsity": 0.7, "value_sparsity": 0.5, "window": 3, "chunk": 5})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype):
    """fp16/bf16 on the CPU: storage in the model's dtype; the error against an fp32 oracle stays that of dense."""
    setting = {"key_sparsity": 0.5, "value_sparsity": 0.5, "window": 4, "chunk": 6}
    ids = prompt(36, seed=6)
    exact = forced_logits(tiny_model(seed=5), ReferenceCache(**setting), ids, 16)
    model = tiny_model(seed=5, dtype=dtype)
    cache = MustafarCache(**setting)
    mine = forced_logits(model, cache, ids, 16)
    theirs = forced_logits(model, ReferenceCache(**setting), ids, 16)
    assert cache.layers[0].key_store.dtype == dtype and cache.layers[0].keys.dtype == dtype
    assert (mine - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-3
    generate(model, ids[:, :16], MustafarCache(**setting), 8)


def gemma2():
    return transformers.Gemma2Config(**BASE, head_dim=16, sliding_window=16)


def deepseek_v3():
    return transformers.DeepseekV3Config(**{**BASE, "num_key_value_heads": 4}, kv_lora_rank=16, q_lora_rank=None,
                                         qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                                         num_experts_per_tok=2, first_k_dense_replace=2, moe_intermediate_size=32,
                                         n_group=1, topk_group=1)


@pytest.mark.parametrize("make, match", [
    (gemma2, "'mustafar' attention supports none of .*softcap"),
    (deepseek_v3, "value_states must have the head_dim of key_states .*latent attention"),
], ids=["gemma2-softcap", "deepseek_v3-mla"])
def test_unservable_decoder_raises_at_first_use(make, match):
    model = tiny_model(make(), seed=1)
    with pytest.raises(ValueError, match=match), torch.inference_mode():
        model(prompt(12), **{CACHE: MustafarCache(0.5, 0.5, window=2, chunk=4)})


def test_encoder_decoder_raises_at_first_use():
    config = transformers.BartConfig(vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                     decoder_start_token_id=2, forced_eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation="mustafar").eval()
    with pytest.raises(ValueError, match="non-causal attention module .*decoder-only models only"):
        model.generate(prompt(12), max_new_tokens=4, **{CACHE: MustafarCache(0.5, 0.5, window=2, chunk=4)})
    with pytest.raises(ValueError, match="config: MustafarCache serves decoder-only models, got an encoder-decoder"):
        MustafarCache(config=config)


@pytest.mark.parametrize("make, match", [
    (gemma2, r"soft-capping \(attn_logit_softcapping=50.0\)"),
    (deepseek_v3, r"multi-head latent attention \(kv_lora_rank=16\)"),
    (lambda: transformers.LlamaConfig(**BASE, head_dim=512), "head_dim 512 > 256"),
    (lambda: transformers.LlamaConfig(**BASE, layer_types=["full_attention", "linear_attention"]),
     r"layer types \['linear_attention'\]"),
], ids=["gemma2", "deepseek_v3", "head_dim_512", "linear_attention"])
def test_config_check_refuses_at_construction(make, match):
    with pytest.raises(ValueError, match="config: MustafarCache cannot serve this .*" + match):
        MustafarCache(config=make())


def test_config_check_layer_count_and_type():
    config = transformers.LlamaConfig(**BASE)
    assert check_model_config(config) == 2
    cache = MustafarCache.from_config(SparsityConfig(0.5, 0.7, window=4, chunk=8), config=config)
    assert (cache.config.key_sparsity, cache.config.value_sparsity) == (0.5, 0.7)
    with pytest.raises(ValueError, match=r"layer_sparsity must have one entry per layer of the model \(2\), got 3"):
        MustafarCache(layer_sparsity=[(0.5, 0.5)] * 3, config=config)
    with pytest.raises(TypeError, match="config must be a transformers PretrainedConfig .*got dict"):
        MustafarCache(config={"num_hidden_layers": 2})


def test_head_dim_over_256_raises_at_first_use():
    model = tiny_model(seed=1, **SMALL, head_dim=320)
    with pytest.raises(ValueError, match=r"head_dim in \[1, 256\], got 320"), torch.inference_mode():
        model(prompt(8), **{CACHE: MustafarCache()})


def test_sliding_window_layers_warn_once_past_the_window():
    model = tiny_model(FAMILIES["mistral-sliding"](), seed=1)
    with pytest.warns(UserWarning, match="keeps every token of sliding-window layers"):
        generate(model, prompt(30), MustafarCache(0.5, 0.5, window=4, chunk=4), 3)

"""Which models :class:`~mustafar.MustafarCache` can serve, checked at construction (given a config) or first use.

Served: decoder-only models whose attention goes through transformers'
``AttentionInterface`` with causal self-attention over cached K and V of one
head_dim (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma3, Phi-3, ... in
transformers 5.17 and 5.24). Sliding-window layers work through the attention
mask, which hides the old tokens; the cache still keeps (compressed) every token
of such a layer, where ``DynamicCache(config=...)`` keeps only the window.

Refused with ``ValueError`` (never wrong tokens):

- encoder-decoder models (cross-attention would write encoder K/V into the cache);
- attention logit soft-capping (Gemma2), attention sinks (gpt-oss), position bias (T5);
- K and V of different head_dim, e.g. DeepSeek V2/V3 multi-head latent attention,
  which caches latents and expands them after the cache;
- layer types other than full or sliding attention (linear attention, Mamba, ...);
- head_dim above 256 (the bitmap format's limit).
"""

from __future__ import annotations

from ._checks import MAX_HEAD_DIM

__all__ = ["UNSUPPORTED_OPTIONS", "check_attention_implementation", "check_model_config", "check_reader"]

#: The attention implementation that reads a Mustafar cache (``mustafar.attention.ATTENTION_NAME``).
_READER_NAME = "mustafar"

#: Attention kwargs whose semantics the ``"mustafar"`` attention does not implement.
UNSUPPORTED_OPTIONS = ("softcap", "s_aux", "sinks", "position_bias")
_SERVED_LAYER_TYPES = ("full_attention", "sliding_attention")


def check_model_config(config) -> int:
    """Raise ``ValueError`` if a model of ``config`` cannot use a ``MustafarCache``; return its layer count.

    ``config``: a transformers ``PretrainedConfig`` (``model.config``).
    """
    if not hasattr(config, "to_dict"):
        raise TypeError(f"config must be a transformers PretrainedConfig (model.config), got {type(config).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"config: MustafarCache serves decoder-only models, got an encoder-decoder "
                         f"{config.model_type!r} (its cross-attention would be written into the cache)")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    problems = []
    if getattr(text, "attn_logit_softcapping", None) is not None:
        problems.append(f"attention logit soft-capping (attn_logit_softcapping={text.attn_logit_softcapping})")
    if getattr(text, "kv_lora_rank", None) is not None:
        problems.append(f"multi-head latent attention (kv_lora_rank={text.kv_lora_rank}): cached latents, not K/V")
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        problems.append(f"head_dim {head_dim} > {MAX_HEAD_DIM}")
    others = sorted(set(getattr(text, "layer_types", None) or ()) - set(_SERVED_LAYER_TYPES))
    if others:
        problems.append(f"layer types {others} (only {list(_SERVED_LAYER_TYPES)})")
    if problems:
        raise ValueError(f"config: MustafarCache cannot serve this {text.model_type!r} model: " + "; ".join(problems))
    return text.num_hidden_layers


def check_reader(layer_idx: int, module, owner: int | None) -> int:
    """Check that attention ``module`` may read cache layer ``layer_idx``; return the layer's owner id.

    ``owner``: ``id`` of the module that read the layer first (``None`` before the first read).

    Raises:
        ValueError: a non-causal module (cross-attention of an encoder-decoder model, or a
            bidirectional encoder), or a module other than the layer's first reader (the
            cache is used by two models, or by two attention modules of one layer).
    """
    if getattr(module, "is_causal", True) is False:
        raise ValueError(
            f"MustafarCache layer {layer_idx} was read by a non-causal attention module {type(module).__name__} "
            "(cross-attention of an encoder-decoder model, or an encoder): the cache serves the causal "
            "self-attention of decoder-only models only"
        )
    if owner is not None and owner != id(module):
        raise ValueError(
            f"MustafarCache layer {layer_idx} is read by a second attention module ({type(module).__name__}): "
            "a cache serves one model. Use one cache per model (e.g. for an assistant model), or call "
            "cache.reset() before using it with another model"
        )
    return id(module)


def check_attention_implementation(layer_idx: int, config, cache: str = "MustafarCache") -> None:
    """Refuse an update that another attention implementation than ``"mustafar"`` would read.

    ``config``: the config of the attention module that read the layer last (``module.config``;
    ``None``: not known yet, nothing checked). transformers' attention modules pick their attention
    function from ``config._attn_implementation`` after the cache's update, so the update can see
    which one will read it. Called before the update changes anything: the cache stays as it was.
    Another attention would read only the dense local window and miss the compressed tokens: wrong
    logits, no error (issue 17).

    Raises:
        ValueError: the model's attention implementation is not ``"mustafar"`` any more.
    """
    implementation = getattr(config, "_attn_implementation", _READER_NAME)
    if implementation != _READER_NAME:
        raise ValueError(
            f"{cache} layer {layer_idx}: the model's attention implementation is now {implementation!r}, which "
            "would read only the dense window of the cache and miss its compressed tokens (wrong outputs). This "
            "step was refused before it changed the cache: the cache is unchanged. Call "
            'model.set_attn_implementation("mustafar") and run the step again (or cache.reset() to start over)'
        )

"""Named model shapes for the benchmark, built with random weights (nothing is downloaded).

Each shape is the architecture of a public checkpoint (layer count, widths,
heads, vocabulary) with randomly initialised fp16 weights: decode speed and
memory depend on the shapes, not on the values. :func:`build_model` creates the
weights directly on the target device, so an 8B-parameter model is ready in
seconds on a GPU (random initialisation on a CPU would take minutes).

Example::

    >>> from mustafar.bench.models import build_model
    >>> model = build_model("tiny", device="cpu")
    >>> model.config.num_hidden_layers, model.config.head_dim, model.dtype
    (2, 64, torch.float16)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..generation import parse_dtype
from ..weights import check_weights, quantize_weights

__all__ = ["ModelShape", "SHAPES", "build_config", "build_model", "model_dims", "weight_bytes"]


@dataclass(frozen=True)
class ModelShape:
    """A named architecture: a transformers config class and its fields.

    Attributes:
        name: the name used on the command line (``llama3-8b``).
        config_class: ``"LlamaConfig"``, ``"MistralConfig"`` or ``"Qwen2Config"`` (from ``transformers``).
        fields: keyword arguments of the config class.
    """

    name: str
    config_class: str
    fields: dict = field(default_factory=dict)


#: Shapes of public checkpoints (random weights); ``tiny`` is for tests.
SHAPES: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape("llama3-8b", "LlamaConfig", dict(
            hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
            intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)),
        ModelShape("smollm2-135m", "LlamaConfig", dict(
            hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
            intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
            tie_word_embeddings=True)),
        ModelShape("mistral-7b", "MistralConfig", dict(
            hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
            intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768, rope_theta=1000000.0,
            sliding_window=None)),
        ModelShape("qwen2.5-7b", "Qwen2Config", dict(
            hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
            intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
            use_sliding_window=False, sliding_window=None)),
        ModelShape("tiny", "LlamaConfig", dict(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            intermediate_size=256, vocab_size=512, max_position_embeddings=8192)),
    )
}
#: Fields every shape gets: no special tokens, so that greedy decoding never stops early.
_NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_config(shape: str, layers: int | None = None):
    """The transformers config of shape ``shape`` (a key of :data:`SHAPES`), with ``layers`` layers if given.

    Raises:
        ValueError: an unknown shape, or ``layers`` < 1.
        TypeError: ``layers`` not an int.
    """
    import transformers

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    spec = SHAPES[shape]
    fields = {**spec.fields, **_NO_SPECIAL_TOKENS}
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int):
            raise TypeError(f"layers must be an int or None, got {type(layers).__name__}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        fields["num_hidden_layers"] = layers
    return getattr(transformers, spec.config_class)(**fields)


def build_model(shape: str = "llama3-8b", layers: int | None = None, dtype: torch.dtype | str = "float16",
                device: str | torch.device = "cuda", attn_implementation: str = "mustafar",
                weights: str | None = None):
    """A causal LM of shape ``shape`` with random weights, created directly on ``device`` in ``dtype``, eval mode.

    The ``"mustafar"`` attention runs plain SDPA for transformers' caches and the
    sparse decode kernels for Mustafar caches, so one model serves every case. ``weights``
    (``"int4"``, ``"int8"``; None: none) quantises its linear layers after creation
    (:func:`mustafar.weights.quantize_weights`).

    Raises:
        ValueError / TypeError: an unknown shape, dtype or ``weights``, a bad ``layers``.
        ImportError: ``weights`` given without torchao installed.
    """
    from transformers import AutoModelForCausalLM

    import mustafar  # noqa: F401  (registers the "mustafar" attention implementation)

    check_weights(weights)
    config = build_config(shape, layers)
    torch_dtype = parse_dtype(dtype)
    _check_weights_fit(config, torch_dtype, torch.device(device))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch_dtype)
    return quantize_weights(model.eval(), weights)


def _check_weights_fit(config, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a model whose random weights would not fit the device (instead of an out-of-memory kill).

    Raises:
        MemoryError: the weights (counted on the meta device) exceed the memory available.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    needed = params * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            import psutil
        except ImportError:
            return
        available = psutil.virtual_memory().available
    if needed > available:
        raise MemoryError(f"the {params / 1e9:.2f} B-parameter model needs {needed / 2**30:.1f} GiB of weights in "
                          f"{dtype} but {device.type} has {available / 2**30:.1f} GiB available: use a smaller --shape "
                          f"or --layers, or a CUDA machine")


def model_dims(config) -> dict:
    """Sizes the memory model needs: layers, hidden, intermediate, q_heads, kv_heads, head_dim, vocab."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    q_heads = text.num_attention_heads
    return {
        "layers": text.num_hidden_layers,
        "hidden": text.hidden_size,
        "intermediate": text.intermediate_size,
        "q_heads": q_heads,
        "kv_heads": getattr(text, "num_key_value_heads", None) or q_heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // q_heads,
        "vocab": text.vocab_size,
    }


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (tied weights counted once; quantised weights by their storage)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        for part in _storage_tensors(tensor):
            if part.data_ptr() in seen:
                continue
            seen.add(part.data_ptr())
            total += part.numel() * part.element_size()
    return total


def _storage_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``tensor``: itself, or a tensor subclass's inner tensors (torchao's packed weights)."""
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    if type(data) is torch.Tensor or not hasattr(data, "__tensor_flatten__"):
        return [data]
    names, _ = data.__tensor_flatten__()
    return [part for name in names for part in _storage_tensors(getattr(data, name))]

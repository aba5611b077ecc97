"""Weight-only quantisation of a loaded model through torchao (optional extra ``quant``).

KV pruning and 4-bit weights combine: the weights shrink 4x, so the KV cache is a
larger share of every decode step (issue 14, item 5). This module only swaps the
``nn.Linear`` weights for torchao tensor subclasses (no model code is copied or
patched); the ``"mustafar"`` attention and the caches see ordinary activations.

Layouts (chosen in one place, :func:`weight_layout`):

- ``"int4"`` on CUDA with ``bfloat16`` weights and every quantised ``in_features`` a
  multiple of 128: torchao's ``Int4WeightOnlyConfig`` with the ``tile_packed_to_4d``
  packing (two 4-bit values per byte, asymmetric, one scale and zero point per
  group of ``group_size`` inputs; matmuls by torch's tinygemm kernel
  ``_weight_int4pack_mm``). torchao 0.18 serves ``float16`` 4-bit weights only
  through the separate ``mslk`` kernels, which this path does not need.
- ``"int4"`` elsewhere (CPU, ``float32``/``float16`` models): ``IntxWeightOnlyConfig``
  with ``weight_dtype=torch.int4``: the same 4-bit grid (values in [-8, 7], one scale per
  group), stored one value per int8 byte and dequantised inside each matmul. The
  numerics of 4-bit weights on any device, not their memory or speed.
- ``"int8"``: ``Int8WeightOnlyConfig`` (one scale per output row), any device.

``lm_head`` stays in the model's dtype (common practice: its error reaches every
logit directly).

Example::

    >>> import mustafar
    >>> model, tokenizer = mustafar.load_model(weights="int4")   # needs `pip install torchao`
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["WEIGHT_FORMATS", "INSTALL_HINT", "check_weights", "require_torchao", "weight_layout", "quantize_weights"]

#: Accepted values of ``weights`` (None: the model's own dtype, no quantisation).
WEIGHT_FORMATS = ("int4", "int8")
INSTALL_HINT = "pip install 'torchao>=0.18'  (or: pip install 'mustafar[quant]')"
#: Group sizes tried for the 4-bit scales, largest first (inputs sharing one scale).
INT4_GROUP_SIZES = (128, 64, 32)
#: tinygemm's packed layout needs in_features a multiple of this (inner_k_tiles 8 x 16).
TINYGEMM_K_MULTIPLE = 128
SKIPPED = ("lm_head",)


def check_weights(weights: str | None) -> str | None:
    """Return ``weights`` if it is None or one of :data:`WEIGHT_FORMATS`.

    Raises:
        ValueError: any other value (the message names ``weights``, the accepted values and the value).
    """
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be None or one of {', '.join(map(repr, WEIGHT_FORMATS))}, got {weights!r}")
    return weights


def require_torchao() -> None:
    """Raise ImportError (with the install command) unless torchao is installed."""
    if importlib.util.find_spec("torchao") is None:
        raise ImportError(f"weight quantisation needs torchao, which is not installed: {INSTALL_HINT}")


def _torchao():
    """torchao's quantisation API (ImportError with the install command if torchao is missing)."""
    require_torchao()
    import torchao.quantization as quantization

    return quantization


def _quantised_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in SKIPPED}


def _group_size(linears: dict[str, torch.nn.Linear]) -> int:
    """The largest of :data:`INT4_GROUP_SIZES` dividing every ``in_features``.

    Raises:
        ValueError: none divides some layer's ``in_features`` (named).
    """
    for size in INT4_GROUP_SIZES:
        if all(m.in_features % size == 0 for m in linears.values()):
            return size
    odd = next(name for name, m in linears.items() if m.in_features % INT4_GROUP_SIZES[-1])
    raise ValueError(f"int4 weights need every linear layer's in_features divisible by {INT4_GROUP_SIZES[-1]}, "
                     f"got {linears[odd].in_features} in {odd!r}")


def weight_layout(weights: str, device: torch.device, dtype: torch.dtype, in_features: list[int]) -> str:
    """Which torchao layout serves ``weights`` for a model on ``device`` in ``dtype``.

    Returns ``"int4-tinygemm"``, ``"int4-intx"`` or ``"int8"`` (see the module docstring).
    """
    if weights == "int8":
        return "int8"
    tinygemm = (device.type == "cuda" and dtype == torch.bfloat16
                and all(k % TINYGEMM_K_MULTIPLE == 0 for k in in_features))
    return "int4-tinygemm" if tinygemm else "int4-intx"


def quantize_weights(model: torch.nn.Module, weights: str | None) -> torch.nn.Module:
    """Quantise ``model``'s linear weights (``lm_head`` excluded) in place; returns ``model``.

    Args:
        model: a loaded causal LM, already on its device, weights in float32, bfloat16 or float16.
        weights: None (returns ``model`` unchanged, torchao not needed), ``"int4"`` or ``"int8"``.

    Records the layout as ``model.config.mustafar_weights`` (e.g. ``"int4-tinygemm/g128"``).

    Raises:
        ValueError: an unknown ``weights``, or int4 with a layer whose ``in_features`` no group size divides.
        ImportError: torchao is not installed (the message gives the pip command).
    """
    if check_weights(weights) is None:
        return model
    quantization = _torchao()
    linears = _quantised_linears(model)
    param = next(model.parameters())
    layout = weight_layout(weights, param.device, param.dtype, [m.in_features for m in linears.values()])
    if layout == "int8":
        config, label = quantization.Int8WeightOnlyConfig(), "int8"
    else:
        group = _group_size(linears)
        if layout == "int4-tinygemm":
            config = quantization.Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d",
                                                       set_inductor_config=False)
        else:
            from torchao.quantization.granularity import PerGroup

            config = quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))
        label = f"{layout}/g{group}"
    chosen = set(map(id, linears.values()))
    quantization.quantize_(model, config, filter_fn=lambda module, fqn: id(module) in chosen)
    model.config.mustafar_weights = label
    return model

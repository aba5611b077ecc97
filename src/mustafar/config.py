"""Sparsity settings: a frozen dataclass and the registry of named settings (``K0.5V0.5``).

Names follow the Mustafar paper (arXiv 2505.22913): ``K0.5V0.7`` prunes 50 % of
each Key vector and 70 % of each Value vector; ``dense`` prunes nothing. A ``-fp8``
suffix (``K0.7V0.7-fp8``) stores the kept values as FP8 e4m3 with one scale per token
and head (issue 15, :mod:`mustafar.fp8`); ``K0V0-fp8`` prunes nothing and quantises
every entry: the dense-FP8-equivalent row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from ._checks import check_positive_int, check_sparsity
from .fp8 import FP8_NAMES, check_kept_dtype

__all__ = ["SparsityConfig", "parse_setting", "SETTINGS"]

_NAME = re.compile(r"^K(?P<k>[0-9]*\.?[0-9]+)V(?P<v>[0-9]*\.?[0-9]+)$")
#: Suffix of the setting names with FP8 kept values.
FP8_SUFFIX = "-fp8"
#: The value of :attr:`SparsityConfig.kept_dtype` for FP8 kept values (a name: results are JSON).
FP8_KEPT = "float8_e4m3fn"


@dataclass(frozen=True)
class SparsityConfig:
    """One (key sparsity, value sparsity) setting of the cache.

    Attributes:
        key_sparsity: fraction of each Key vector zeroed, in [0, 1).
        value_sparsity: fraction of each Value vector zeroed, in [0, 1).
        window: tokens kept dense at the end of the sequence (the local window,
            the paper's residual length), >= 0.
        chunk: tokens moved from the window to the compressed store at once, >= 1.
        method: pruning rule name (see :data:`mustafar.pruning.RULES`).
        kept_dtype: ``None`` (kept values in the cache dtype) or ``"float8_e4m3fn"`` (FP8 kept values,
            one scale per token and head; also given as ``torch.float8_e4m3fn`` or ``"fp8"``). Only the
            ``per-token`` method stores FP8.
    """

    key_sparsity: float = 0.5
    value_sparsity: float = 0.5
    window: int = 32
    chunk: int = 256
    method: str = "per-token"
    kept_dtype: str | None = None

    def __post_init__(self):
        from .pruning import get_rule

        object.__setattr__(self, "key_sparsity", check_sparsity("key_sparsity", self.key_sparsity))
        object.__setattr__(self, "value_sparsity", check_sparsity("value_sparsity", self.value_sparsity))
        object.__setattr__(self, "window", check_positive_int("window", self.window, minimum=0))
        object.__setattr__(self, "chunk", check_positive_int("chunk", self.chunk))
        if not isinstance(self.method, str):
            raise TypeError(f"method must be a rule name (str), got {type(self.method).__name__} {self.method!r}")
        get_rule(self.method)
        if self.kept_dtype is not None:
            if check_kept_dtype(self.kept_dtype) is None or not self.fp8_like(self.kept_dtype):
                raise TypeError(f"kept_dtype must be None (the cache dtype) or 'float8_e4m3fn', got "
                                f"{self.kept_dtype!r}")
            object.__setattr__(self, "kept_dtype", FP8_KEPT)
            if self.method != "per-token":
                raise ValueError(f"kept_dtype='float8_e4m3fn' needs method 'per-token' (the only rule the format "
                                 f"stores), got {self.method!r}")

    @staticmethod
    def fp8_like(kept_dtype: object) -> bool:
        """Whether ``kept_dtype`` names FP8 (``torch.float8_e4m3fn``, ``"fp8"`` or ``"float8_e4m3fn"``)."""
        return kept_dtype in FP8_NAMES or str(kept_dtype) == "torch.float8_e4m3fn"

    @property
    def name(self) -> str:
        """``dense``, ``K{key_sparsity}V{value_sparsity}``, or either sparse name with ``-fp8`` (``K0V0-fp8``)."""
        if self.is_dense:
            return "dense"
        base = f"K{_decimal(self.key_sparsity)}V{_decimal(self.value_sparsity)}"
        return base + FP8_SUFFIX if self.fp8 else base

    @property
    def fp8(self) -> bool:
        """Whether the kept values are FP8 (e4m3)."""
        return self.kept_dtype == FP8_KEPT

    @property
    def is_dense(self) -> bool:
        """No pruning and kept values in the cache dtype (``K0V0-fp8`` is not dense: it quantises)."""
        return self.key_sparsity == 0 and self.value_sparsity == 0 and not self.fp8


def _decimal(x: float) -> str:
    """Shortest plain decimal of ``x`` that parses back to it: 0.5 -> '0.5', 0.0 -> '0', 1e-05 -> '0.00001'."""
    text = format(Decimal(repr(x)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def parse_setting(name: str, **overrides) -> SparsityConfig:
    """``"dense"``, ``"K0.5V0.7"`` or ``"K0.5V0.7-fp8"`` -> :class:`SparsityConfig` (other fields from ``overrides``).

    ``-fp8``: FP8 kept values (``kept_dtype="float8_e4m3fn"``); ``dense-fp8`` is ``K0V0-fp8``.

    Raises:
        ValueError: a name of another form, or sparsities outside [0, 1).
    """
    if not isinstance(name, str):
        raise TypeError(f"setting must be a string like 'K0.5V0.5', 'K0.7V0.7-fp8' or 'dense', got "
                        f"{type(name).__name__}")
    text = name.strip()
    if text.lower().endswith(FP8_SUFFIX):
        text = text[: -len(FP8_SUFFIX)]
        overrides = {**overrides, "kept_dtype": FP8_KEPT}
    if text.lower() == "dense":
        return SparsityConfig(0.0, 0.0, **overrides)
    match = _NAME.match(text)
    if match is None:
        raise ValueError(f"setting must look like 'K0.5V0.5', 'K0.5V0.5-fp8' or 'dense', got {name!r}")
    try:
        return SparsityConfig(float(match["k"]), float(match["v"]), **overrides)
    except ValueError as error:  # e.g. 'K0.5V05' (a missing dot): name the setting and its form
        raise ValueError(f"setting {name!r}: {error} (settings look like 'K0.5V0.5': sparsities in [0, 1) "
                         f"after K and V)") from error


#: Named settings used by the command line and the benchmarks.
SETTINGS: dict[str, SparsityConfig] = {
    cfg.name: cfg for cfg in (parse_setting(n) for n in ("dense", "K0.5V0.5", "K0.7V0.7", "K0.5V0.0", "K0.0V0.5",
                                                         "K0.5V0.5-fp8", "K0.7V0.7-fp8", "K0V0-fp8"))
}

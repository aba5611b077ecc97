"""Sparsity settings: a frozen dataclass and the registry of named settings (``K0.5V0.5``).

Names follow the Mustafar paper (arXiv 2505.22913): ``K0.5V0.7`` prunes 50 % of
each Key vector and 70 % of each Value vector; ``dense`` prunes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from ._checks import check_positive_int, check_sparsity

__all__ = ["SparsityConfig", "parse_setting", "SETTINGS"]

_NAME = re.compile(r"^K(?P<k>[0-9]*\.?[0-9]+)V(?P<v>[0-9]*\.?[0-9]+)$")


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
    """

    key_sparsity: float = 0.5
    value_sparsity: float = 0.5
    window: int = 32
    chunk: int = 256
    method: str = "per-token"

    def __post_init__(self):
        from .pruning import get_rule

        object.__setattr__(self, "key_sparsity", check_sparsity("key_sparsity", self.key_sparsity))
        object.__setattr__(self, "value_sparsity", check_sparsity("value_sparsity", self.value_sparsity))
        object.__setattr__(self, "window", check_positive_int("window", self.window, minimum=0))
        object.__setattr__(self, "chunk", check_positive_int("chunk", self.chunk))
        if not isinstance(self.method, str):
            raise TypeError(f"method must be a rule name (str), got {type(self.method).__name__} {self.method!r}")
        get_rule(self.method)

    @property
    def name(self) -> str:
        """``dense`` or ``K{key_sparsity}V{value_sparsity}``."""
        if self.key_sparsity == 0 and self.value_sparsity == 0:
            return "dense"
        return f"K{_decimal(self.key_sparsity)}V{_decimal(self.value_sparsity)}"

    @property
    def is_dense(self) -> bool:
        return self.key_sparsity == 0 and self.value_sparsity == 0


def _decimal(x: float) -> str:
    """Shortest plain decimal of ``x`` that parses back to it: 0.5 -> '0.5', 0.0 -> '0', 1e-05 -> '0.00001'."""
    text = format(Decimal(repr(x)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def parse_setting(name: str, **overrides) -> SparsityConfig:
    """``"dense"`` or ``"K0.5V0.7"`` -> :class:`SparsityConfig` (other fields from ``overrides``).

    Raises:
        ValueError: a name of another form, or sparsities outside [0, 1).
    """
    if not isinstance(name, str):
        raise TypeError(f"setting must be a string like 'K0.5V0.5' or 'dense', got {type(name).__name__}")
    text = name.strip()
    if text.lower() == "dense":
        return SparsityConfig(0.0, 0.0, **overrides)
    match = _NAME.match(text)
    if match is None:
        raise ValueError(f"setting must look like 'K0.5V0.5' or 'dense', got {name!r}")
    return SparsityConfig(float(match["k"]), float(match["v"]), **overrides)


#: Named settings used by the command line and the benchmarks.
SETTINGS: dict[str, SparsityConfig] = {
    cfg.name: cfg for cfg in (parse_setting(n) for n in ("dense", "K0.5V0.5", "K0.7V0.7", "K0.5V0.0", "K0.0V0.5"))
}

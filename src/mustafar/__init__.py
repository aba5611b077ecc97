"""mustafar: unstructured per-token KV cache pruning, a bitmap-compressed cache and
sparse decode attention for Hugging Face transformers.

Method: Joo, Hosseini, Hadidi, Asgari, "Mustafar: Promoting Unstructured Sparsity
for KV Cache Pruning in LLM Inference", arXiv 2505.22913 (NeurIPS 2025).
"""

from .attention import ATTENTION_NAME, mustafar_attention_forward
from .backends import resolve_backend
from .cache import MustafarCache, MustafarLayer, StaticMustafarCache
from .config import SETTINGS, SparsityConfig, parse_setting
from .errors import UnsupportedHardwareError
from .format import BitmapKV, bytes_per_token, dense_bytes_per_token
from .models import load_model
from .ops import available_backends, compress, sparse_decode_attention
from .pruning import (
    keep_count,
    prune_output_aware,
    prune_per_channel,
    prune_per_token,
    prune_think,
)

__all__ = [
    "ATTENTION_NAME", "SETTINGS", "BitmapKV", "MustafarCache", "MustafarLayer", "SparsityConfig", "StaticMustafarCache",
    "UnsupportedHardwareError", "available_backends", "bytes_per_token", "compress", "dense_bytes_per_token",
    "keep_count", "load_model", "mustafar_attention_forward", "parse_setting", "prune_output_aware",
    "prune_per_channel", "prune_per_token", "prune_think", "resolve_backend", "sparse_decode_attention",
]
__version__ = "0.1.0"

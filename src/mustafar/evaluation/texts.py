"""Real English text available offline on every machine, for perplexity and haystack filler.

The default is the *Python Language Reference* as shipped with every CPython
install in ``pydoc_data.topics`` (the text ``help()`` shows; about 465k
characters, ~110k tokens, written by the Python documentation authors), with the
interpreter's ``LICENSE.txt`` as a fallback. The text depends on the Python
version, so perplexities are comparable only on the same Python (recorded in
the report). A user file (``--text-file``) replaces it.
"""

from __future__ import annotations

import os
import re
import string
import sysconfig
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

__all__ = ["reference_text", "load_text", "sentences", "word_pool", "distinct", "REFERENCE_TEXT_NAME"]

#: Name of the default text in reports.
REFERENCE_TEXT_NAME = "Python Language Reference (pydoc_data.topics)"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_SPACES = re.compile(r"\s+")


def reference_text() -> str:
    """The Python Language Reference topics, in sorted topic order, separated by blank lines.

    Raises:
        FileNotFoundError: neither ``pydoc_data.topics`` nor ``LICENSE.txt`` is installed
            (pass a text file instead).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        license_path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
        if license_path.is_file():
            return license_path.read_text(encoding="utf-8")
        raise FileNotFoundError(
            "no reference text found (pydoc_data.topics and the stdlib LICENSE.txt are missing): pass --text-file"
        ) from None
    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def load_text(path: str | os.PathLike | None) -> str:
    """The text of ``path`` (UTF-8), or :func:`reference_text` for ``None``.

    Raises:
        FileNotFoundError: ``path`` does not exist. IsADirectoryError: it is a directory.
        ValueError: it holds fewer than 100 characters.
    """
    if path is None:
        return reference_text()
    file = Path(path).expanduser()
    if file.is_dir():
        raise IsADirectoryError(f"text_file must be a UTF-8 text file, got the directory {str(file)!r}")
    if not file.is_file():
        raise FileNotFoundError(f"text_file {str(file)!r} does not exist")
    text = file.read_text(encoding="utf-8", errors="replace")
    if len(text.strip()) < 100:
        raise ValueError(f"text_file must hold at least 100 characters of text, got {len(text.strip())}")
    return text


def sentences(text: str) -> list[str]:
    """``text`` with whitespace collapsed, split after ``.``, ``!`` or ``?`` before a capital or quote."""
    flat = _SPACES.sub(" ", text).strip()
    return [s for s in _SENTENCE_END.split(flat) if s]


@lru_cache(maxsize=4)
def word_pool(text: str) -> tuple[str, ...]:
    """Distinct lower-case alphabetic words of 3 to 12 letters of ``text``, sorted."""
    words = {w for w in (t.strip(string.punctuation).lower() for t in text.split()) if w.isalpha() and w.isascii()}
    return tuple(sorted(w for w in words if 3 <= len(w) <= 12))


def distinct(count: int, make: Callable[[], str]) -> list[str]:
    """``count`` distinct items drawn by calling ``make`` until that many differ (first-drawn order)."""
    out: list[str] = []
    while len(out) < count:
        item = make()
        if item not in out:
            out.append(item)
    return out

"""RULER's aggregation tasks: common words extraction (``cwe``) and frequent words extraction (``fwe``).

Source: Hsieh et al., arXiv 2404.06654, ``common_words_extraction.py`` and
``freq_words_extraction.py`` of RULER.

- **cwe**: a numbered list ``1. word 2. word ...`` where 10 common words appear
  ``freq_cw`` times and the others ``freq_ucw`` times (30 / 3 from 4096 tokens,
  6 / 1 below, as RULER), after a one-shot example; answer: the 10 common words.
  Words come from :func:`~.texts.word_pool` of the haystack text (RULER: ``wonderwords``).
- **fwe**: coded words (6 random lower-case letters) drawn with Zipf frequencies
  (``alpha = 2``) from a vocabulary of ``context_length // 50`` words whose top
  word is the noise ``...``; answer: the three next most frequent words.

The number of words is the largest whose chat-templated prompt and answer prefix
fit in ``context_length`` tokens (binary search, as RULER).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from .texts import distinct, word_pool

__all__ = ["cwe_sample", "fwe_sample", "fit_count", "zeta", "CWE_TEMPLATE", "FWE_TEMPLATE"]

CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
                "list?")
CWE_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"
#: From this context length on, cwe uses RULER's long-context frequencies (30 / 3, example 40 words 10 / 3).
CWE_LONG = 4096
NUM_COMMON = 10


def _prompt_tokens(tokenizer, prompt: str, answer_prefix: str) -> int:
    from ..generation import chat_input_ids

    return chat_input_ids(tokenizer, prompt, answer_prefix).shape[1]


def fit_count(build: Callable[[int], str], tokenizer, context_length: int, answer_prefix: str,
              low: int, high: int) -> int:
    """Largest ``count`` in ``[low, high]`` whose prompt ``build(count)`` fits ``context_length`` tokens, else ``low``.

    Assumes the prompt grows with ``count``; the chat template and ``answer_prefix`` count.
    """
    best = low
    while low <= high:
        mid = (low + high) // 2
        if _prompt_tokens(tokenizer, build(mid), answer_prefix) <= context_length:
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _word_list(rng: random.Random, words, count: int, common: int, uncommon: int, order=None):
    """A shuffled numbered list of ``count`` words (the first 10 common) and the common words.

    ``order``: a fixed permutation of ``words`` to take the first ``count`` from (so that
    the list grows with ``count``, as the binary search needs); default a fresh sample.
    """
    chosen = list(order[:count]) if order is not None else rng.sample(words, count)
    items = chosen[:NUM_COMMON] * common + chosen[NUM_COMMON:] * uncommon
    rng.shuffle(items)
    return _numbered(items), chosen[:NUM_COMMON]


def cwe_sample(task: str, tokenizer, context_length: int, rng: random.Random, text: str) -> dict:
    """Fields of one common-words-extraction sample (see the module docstring)."""
    words = word_pool(text)
    repeats, shot = ((30, 3), (40, 10, 3)) if context_length >= CWE_LONG else ((6, 1), (20, 3, 1))
    shot_list, shot_common = _word_list(rng, words, *shot)
    example = CWE_TEMPLATE.format(context=shot_list) + " " + CWE_PREFIX + " " + _numbered(shot_common) + "\n"
    seed, order = rng.random(), rng.sample(words, len(words))

    def build(count: int) -> tuple[str, list[str]]:
        listing, common = _word_list(random.Random(f"{seed}:{count}"), words, count, *repeats, order=order)
        return example + CWE_TEMPLATE.format(context=listing), common

    count = fit_count(lambda c: build(c)[0], tokenizer, context_length, CWE_PREFIX, NUM_COMMON + 1, len(words))
    prompt, common = build(count)
    return {"prompt": prompt, "answer_prefix": CWE_PREFIX, "answers": tuple(common),
            "meta": {"words": count, "freq_cw": repeats[0], "freq_ucw": repeats[1]}}


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta of ``alpha > 1``: a partial sum plus the Euler-Maclaurin tail (error far below 1e-9)."""
    if not alpha > 1:
        raise ValueError(f"alpha must be > 1, got {alpha!r}")
    head = sum(k**-alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + terms**-alpha / 2


def fwe_sample(task: str, tokenizer, context_length: int, rng: random.Random, text: str,
               alpha: float = 2.0, word_length: int = 6) -> dict:
    """Fields of one frequent-words-extraction sample (see the module docstring)."""
    vocab = distinct(max(8, context_length // 50), lambda: "".join(rng.choices(string.ascii_lowercase,
                                                                                   k=word_length)))
    vocab[0] = "..."
    norm, seed = zeta(alpha), rng.random()

    def build(count: int) -> str:
        items = [w for k, w in enumerate(vocab, 1) for _ in range(int(count * k**-alpha / norm))]
        random.Random(seed).shuffle(items)
        return FWE_TEMPLATE.format(context=" ".join(items))

    count = fit_count(build, tokenizer, context_length, FWE_PREFIX, 100, 2 * context_length)
    return {"prompt": build(count), "answer_prefix": FWE_PREFIX, "answers": tuple(vocab[1:4]),
            "meta": {"words": count, "alpha": alpha, "vocab": len(vocab)}}

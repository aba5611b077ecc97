"""Seeded, offline retrieval tasks: passkey retrieval and needle-in-a-haystack.

- **passkey** (Mohtashami & Jaggi 2023, "Landmark Attention"): a 5-digit pass key
  hidden in repeated filler sentences at a given depth.
- **niah** (needle in a haystack, needles phrased as in RULER, Hsieh et al. 2024):
  ``"The special magic number for {key} is: {7 digits}."`` hidden in real English
  text (:mod:`mustafar.evaluation.texts`); single-needle samples, and multi-key
  samples where needles with other keys and numbers are distractors. The
  distractors sit between the haystack's start and the asked needle: placed
  after it (RULER), SmolLM2-135M answers with the most recent needle's number
  whatever the key, even with a dense cache (5 of 10 right at 2048 tokens), so
  the task checks that the right one of several near-identical needles is
  copied exactly, not key binding.

Every sample is a user message plus the start of the assistant's answer
(``answer_prefix``, ending in a space so that the next token is the number's
first digit), sized so that the chat-templated prompt and answer prefix hold at
least ``context_length`` tokens (at most one filler sentence more). Depth is the
fraction of the haystack's tokens before the asked needle. Data depend only on
``(seed, task, context_length, index)``.

Example::

    >>> samples = passkey_samples(tokenizer, 2048, n=5, seed=0)
    >>> samples[0].depth, samples[0].answer_prefix, check_answer(" 48213.", samples[0].answer)
    (0.1, 'The pass key is ', False)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from .texts import sentences

__all__ = ["Sample", "passkey_samples", "niah_samples", "check_answer", "DEFAULT_DEPTHS", "PASSKEY_FILLER",
           "count_tokens", "take_haystack", "insert_needles", "haystack_budget", "random_number"]

#: Needle depths cycled through by the samples (fraction of the haystack before the needle).
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
#: The classic passkey filler.
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
PASSKEY_DIGITS = 5
#: The assistant's answer starts with this: the trailing space makes the next token a digit (see the README).
PASSKEY_PREFIX = "The pass key is "
NIAH_DIGITS = 7
#: Longest filler sentence (characters) taken into a haystack: drops code listings and tables.
MAX_SENTENCE_CHARS = 400
_KEYS = ("apple", "river", "lantern", "falcon", "copper", "meadow", "violin", "glacier", "harbor", "orchid",
         "quartz", "saddle", "thunder", "walnut", "zephyr", "bamboo", "cobalt", "ember", "juniper", "marble")
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Sample:
    """One retrieval prompt. ``depth``: fraction of haystack tokens before the asked needle, in [0, 1]."""

    task: str
    index: int
    prompt: str
    answer_prefix: str
    answer: str
    context_length: int
    depth: float
    needles: tuple[str, ...] = field(default_factory=tuple)
    key: str | None = None


def check_answer(output: str, expected: str) -> bool:
    """True iff the first number in ``output`` (commas between digit groups removed) is ``expected``."""
    match = _NUMBER.search(re.sub(r"(?<=\d),(?=\d{3})", "", output))
    return match is not None and match.group() == expected


def random_number(rng: random.Random, digits: int) -> str:
    """A ``digits``-digit decimal number (no leading zero) from ``rng``."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def check_args(tokenizer, context_length: int, n: int, depths) -> None:
    """Raise TypeError / ValueError: a tokenizer without ``encode``, ``context_length`` < 256, ``n`` < 0, bad depths."""
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer must have an encode method, got {type(tokenizer).__name__}")
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 256:
        raise ValueError(f"context_length must be an int >= 256 (tokens), got {context_length!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n (samples) must be an int >= 0, got {n!r}")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be a non-empty list of fractions in [0, 1], got {depths!r}")


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` without special tokens (the unit of every context length here)."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def take_haystack(pool: list[str], tokenizer, budget: int, rng: random.Random) -> tuple[list[str], list[int]]:
    """Consecutive sentences of ``pool`` from a random start (wrapping) until ``budget`` tokens; and their sizes."""
    start, taken, sizes = rng.randrange(len(pool)), [], []
    while sum(sizes) < budget:
        sentence = pool[(start + len(taken)) % len(pool)]
        taken.append(sentence)
        sizes.append(count_tokens(tokenizer, " " + sentence))
    return taken, sizes


def insert_needles(haystack: list[str], sizes: list[int], needles: list[tuple[float, str]], sep: str = " ") -> str:
    """Join ``haystack`` (units of ``sizes`` tokens) by ``sep``, each needle at the unit boundary nearest its depth.

    ``needles``: ``(depth, text)`` pairs, depth a fraction of the haystack's tokens in [0, 1]; needles at the
    same boundary keep their depth order.
    """
    total, bounds, acc = sum(sizes), [0], 0
    for size in sizes:
        acc += size
        bounds.append(acc)
    at: dict[int, list[str]] = {}
    for depth, needle in sorted(needles, key=lambda pair: pair[0]):
        cut = min(range(len(bounds)), key=lambda i: abs(bounds[i] - depth * total))
        at.setdefault(cut, []).append(needle)
    parts = []
    for i in range(len(haystack) + 1):
        parts.extend(at.get(i, []))
        if i < len(haystack):
            parts.append(haystack[i])
    return sep.join(parts)


def haystack_budget(tokenizer, context_length: int, frame: str, answer_prefix: str) -> int:
    """Haystack tokens left (at least 16) after the chat template, ``frame`` (instructions, needles), answer prefix."""
    overhead = count_tokens(tokenizer, frame + "\n" + answer_prefix)
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": frame}], tokenize=False,
                                             add_generation_prompt=True)
        overhead = count_tokens(tokenizer, chat + answer_prefix)
    return max(16, context_length - overhead)


def passkey_samples(tokenizer, context_length: int, n: int, seed: int = 0,
                    depths=DEFAULT_DEPTHS) -> list[Sample]:
    """``n`` passkey samples of about ``context_length`` tokens; sample ``i`` uses depth ``depths[i % len]``."""
    check_args(tokenizer, context_length, n, depths)
    intro = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
             "I will quiz you about the important information there.\n\n")
    question = "\n\nWhat is the pass key? Answer with the number only."
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}:passkey:{context_length}:{i}")
        key = random_number(rng, PASSKEY_DIGITS)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        budget = haystack_budget(tokenizer, context_length, intro + needle + question, PASSKEY_PREFIX)
        filler, sizes = take_haystack(list(PASSKEY_FILLER), tokenizer, budget, rng)
        depth = depths[i % len(depths)]
        text = insert_needles(filler, sizes, [(depth, needle)])
        out.append(Sample("passkey", i, intro + text + question, PASSKEY_PREFIX, key, context_length, depth,
                          (needle,)))
    return out


def niah_samples(tokenizer, context_length: int, n: int, seed: int = 0, depths=DEFAULT_DEPTHS,
                 num_needles: int = 1, text: str | None = None) -> list[Sample]:
    """``n`` needle-in-a-haystack samples of about ``context_length`` tokens over real text.

    ``num_needles > 1`` is the multi-key variant: the asked needle sits at the
    sample's depth, the others (other keys, other numbers) evenly spaced before it
    (depths ``depth * j / num_needles``, see the module docstring).
    ``text``: haystack source (default :func:`~mustafar.evaluation.texts.reference_text`).
    """
    from .texts import reference_text

    check_args(tokenizer, context_length, n, depths)
    if isinstance(num_needles, bool) or not isinstance(num_needles, int) or not 1 <= num_needles <= len(_KEYS):
        raise ValueError(f"num_needles must be an int in [1, {len(_KEYS)}], got {num_needles!r}")
    pool = [s for s in sentences(text if text is not None else reference_text()) if len(s) <= MAX_SENTENCE_CHARS]
    task = "niah" if num_needles == 1 else f"niah-multikey{num_needles}"
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}:{task}:{context_length}:{i}")
        keys = rng.sample(_KEYS, num_needles)
        values = [random_number(rng, NIAH_DIGITS) for _ in keys]
        needles = [f"The special magic number for {k} is: {v}." for k, v in zip(keys, values)]
        intro = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                 "I will quiz you about the numbers afterwards.\n")
        question = f"\nWhat is the special magic number for {keys[0]} mentioned in the provided text? Answer with the number only."
        prefix = f"The special magic number for {keys[0]} mentioned in the provided text is "
        budget = haystack_budget(tokenizer, context_length, intro + " ".join(needles) + question, prefix)
        haystack, sizes = take_haystack(pool, tokenizer, budget, rng)
        depth = depths[i % len(depths)]
        others = [depth * (j + 1) / num_needles for j in range(num_needles - 1)]
        body = insert_needles(haystack, sizes, [(depth, needles[0])] + list(zip(others, needles[1:])))
        out.append(Sample(task, i, intro + body + question, prefix, values[0], context_length, depth,
                          tuple(needles), keys[0]))
    return out

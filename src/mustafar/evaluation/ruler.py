"""RULER-style synthetic long-context tasks, generated offline and seeded.

Source: Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context
Language Models?", arXiv 2404.06654 (templates, answer prefixes, generation
lengths and task parameters of its ``synthetic.yaml``). Tasks (:data:`RULER_TASKS`):

- ``niah_single_1/2/3``, ``niah_multikey_1/2/3``, ``niah_multivalue``,
  ``niah_multiquery``: needles ``"One of the special magic {numbers} for {key}
  is: {value}."`` in a haystack of noise sentences, of real text ("essay"), or of
  other needles; keys are word pairs or UUIDs, values 7-digit numbers or UUIDs.
- ``vt`` (variable tracking): a chain ``VAR A = 12345, VAR B = VAR A, ...`` of
  4 hops in noise, after a one-shot example; answer: every variable of the chain.
- ``cwe`` (common words extraction) and ``fwe`` (frequent words extraction):
  see :mod:`mustafar.evaluation.ruler_words`.

All are scored with RULER's ``string_match_all`` (:func:`~.metrics.string_match_all`).
Differences from RULER, all offline by necessity or for small models: the
essay haystack is :func:`~.texts.reference_text` (or the user's text file)
instead of Paul Graham's essays; key words are pairs of words from that text
instead of the ``wonderwords`` lists; the answer prefix goes into the assistant
turn without its leading space; prompts are sized so that the chat-templated
prompt and answer prefix hold about ``context_length`` tokens (RULER subtracts the
tokens to generate). Data depend only on ``(seed, task, context_length, index, text)``.

Example::

    >>> samples = ruler_samples(tokenizer, "niah_single_2", 2048, n=2, seed=0)
    >>> samples[0].answers[0] in samples[0].prompt
    True
"""

from __future__ import annotations

import random
import string
import uuid
from dataclasses import dataclass, field
from functools import lru_cache

from .ruler_words import cwe_sample, fwe_sample
from .tasks import check_args, haystack_budget, insert_needles, random_number, take_haystack
from .texts import distinct, sentences, word_pool

__all__ = ["RulerSample", "NiahSpec", "RULER_TASKS", "ruler_samples", "word_pool", "NOISE", "DEPTHS"]

#: The noise haystack unit of RULER (and of passkey retrieval).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
#: RULER's needle depths: 40 points from 0 to 1 (rounded percents).
DEPTHS = tuple(round(100 * i / 39) / 100 for i in range(40))
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_TEMPLATE = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will "
                 "quiz you about the {kind} afterwards.\n{context}\nWhat are all the special magic {kind} for {query} "
                 "mentioned in the provided text?")
NIAH_PREFIX = "The special magic {kind} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
_MAX_ESSAY_SENTENCE = 400
#: Noise lines around the one-shot example chain of ``vt``.
VT_SHOT_NOISE = 4


@dataclass(frozen=True)
class RulerSample:
    """One RULER prompt: ``prompt`` is the user turn, ``answer_prefix`` starts the reply.

    ``answers``: every string the reply must contain (``string_match_all``);
    ``max_new_tokens``: RULER's tokens to generate for the task; ``meta``: depths, keys...
    """

    task: str
    index: int
    prompt: str
    answer_prefix: str
    answers: tuple[str, ...]
    context_length: int
    max_new_tokens: int
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class NiahSpec:
    """A needle-in-a-haystack variant of RULER's ``synthetic.yaml``.

    ``haystack``: ``noise``, ``essay`` or ``needle``; ``key``: ``words`` or ``uuids``;
    ``value``: ``numbers`` or ``uuids``; ``keys``/``values``/``queries``: needles' keys,
    values per key, and keys asked (``num_needle_k/v/q``).
    """

    haystack: str
    key: str
    value: str
    keys: int = 1
    values: int = 1
    queries: int = 1


NIAH_SPECS = {
    "niah_single_1": NiahSpec("noise", "words", "numbers"),
    "niah_single_2": NiahSpec("essay", "words", "numbers"),
    "niah_single_3": NiahSpec("essay", "words", "uuids"),
    "niah_multikey_1": NiahSpec("essay", "words", "numbers", keys=4),
    "niah_multikey_2": NiahSpec("needle", "words", "numbers"),
    "niah_multikey_3": NiahSpec("needle", "uuids", "uuids"),
    "niah_multivalue": NiahSpec("essay", "words", "numbers", values=4),
    "niah_multiquery": NiahSpec("essay", "words", "numbers", keys=4, queries=4),
}
#: RULER task -> tokens to generate (RULER's ``constants.py``).
RULER_TASKS = {**{name: 128 for name in NIAH_SPECS}, "vt": 30, "cwe": 120, "fwe": 50}


@lru_cache(maxsize=4)
def _essay_units(text: str) -> tuple[str, ...]:
    return tuple(s for s in sentences(text) if len(s) <= _MAX_ESSAY_SENTENCE)


def _random(kind: str, rng: random.Random, words: tuple[str, ...]) -> str:
    if kind == "numbers":
        return random_number(rng, 7)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(words)}-{rng.choice(words)}"


def _niah_texts(spec: NiahSpec, single: bool) -> tuple[str, str, str]:
    """(template, answer prefix, kind) with RULER's singular rewrite when one value is asked."""
    template, prefix, kind = NIAH_TEMPLATE, NIAH_PREFIX, spec.value
    if single:
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        prefix, kind = prefix.replace("are", "is"), kind[:-1]
    return template, prefix, kind


def _haystack_pool(spec: NiahSpec, text: str, rng: random.Random, words, budget: int, avoid: list[str]) -> list[str]:
    if spec.haystack == "noise":
        return [NOISE]
    if spec.haystack == "essay":
        return list(_essay_units(text))
    keys = distinct(budget // 8 + 8, lambda: _random(spec.key, rng, words))
    return [NEEDLE.format(kind=spec.value, key=k, value=_random(spec.value, rng, words)) for k in keys
            if k not in avoid]


def niah_sample(task: str, tokenizer, context_length: int, rng: random.Random, text: str) -> dict:
    """Fields of one needle-in-a-haystack sample of RULER variant ``task`` (see :data:`NIAH_SPECS`)."""
    spec, words = NIAH_SPECS[task], word_pool(text)
    keys = distinct(max(spec.keys, spec.queries), lambda: _random(spec.key, rng, words))
    values = [[_random(spec.value, rng, words) for _ in range(spec.values)] for _ in keys]
    needles = [NEEDLE.format(kind=spec.value, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    asked = sorted(rng.sample(range(len(keys)), spec.queries))
    query = keys[asked[0]] if len(asked) == 1 else ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]]
    template, prefix, kind = _niah_texts(spec, spec.queries * spec.values == 1)
    prefix = prefix.format(kind=kind, query=query)
    budget = haystack_budget(tokenizer, context_length, template.format(kind=kind, context="\n".join(needles),
                                                                         query=query), prefix)
    pool = _haystack_pool(spec, text, rng, words, budget, keys)
    units, sizes = take_haystack(pool, tokenizer, budget, rng)
    depths = rng.sample(DEPTHS, len(needles))
    context = insert_needles(units, sizes, list(zip(depths, needles)), " " if spec.haystack == "essay" else "\n")
    return {"prompt": template.format(kind=kind, context=context, query=query), "answer_prefix": prefix,
            "answers": tuple(v for i in asked for v in values[i]), "meta": {"depths": sorted(depths), "query": query}}


def _chain(rng: random.Random, hops: int, letters: int, value: str) -> tuple[list[str], list[str]]:
    names = distinct(hops + 1, lambda: "".join(rng.choices(string.ascii_uppercase, k=letters)))
    return names, [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]


def _vt_context(rng: random.Random, units: int, chains: list[list[str]]) -> str:
    depths = [sorted(rng.random() for _ in chain) for chain in chains]
    needles = [(d, s) for ds, chain in zip(depths, chains) for d, s in zip(ds, chain)]
    return insert_needles([NOISE] * units, [1] * units, needles, "\n")


def vt_sample(task: str, tokenizer, context_length: int, rng: random.Random, text: str,
              hops: int = 4, chains: int = 1) -> dict:
    """Fields of one variable-tracking sample: ``chains`` chains of ``hops`` hops, the first one asked."""
    values = distinct(chains + 1, lambda: str(rng.randint(10000, 99999)))
    shot, values = values[-1], values[:-1]
    example_names, example_chain = _chain(rng, hops, 3, shot)
    example = (VT_TEMPLATE.format(context=_vt_context(rng, VT_SHOT_NOISE, [example_chain]), query=shot)
               + " " + VT_PREFIX.format(num_v=hops + 1, query=shot) + " ".join(example_names) + "\n")
    drawn = [_chain(rng, hops, 5, v) for v in values]
    prefix = VT_PREFIX.format(num_v=hops + 1, query=values[0])
    frame = example + VT_TEMPLATE.format(context="\n".join(s for _, c in drawn for s in c), query=values[0])
    units, _ = take_haystack([NOISE], tokenizer, haystack_budget(tokenizer, context_length, frame, prefix), rng)
    context = _vt_context(rng, len(units), [c for _, c in drawn])
    return {"prompt": example + VT_TEMPLATE.format(context=context, query=values[0]), "answer_prefix": prefix,
            "answers": tuple(drawn[0][0]), "meta": {"value": values[0], "hops": hops, "chains": chains}}


def _generator(task: str):
    if task in NIAH_SPECS:
        return niah_sample
    return {"vt": vt_sample, "cwe": cwe_sample, "fwe": fwe_sample}[task]


def ruler_samples(tokenizer, task: str, context_length: int, n: int, seed: int = 0,
                  text: str | None = None) -> list[RulerSample]:
    """``n`` samples of RULER task ``task`` at about ``context_length`` tokens (chat template included).

    ``text``: the essay haystack and word source (default :func:`~.texts.reference_text`).
    Sample ``i`` depends only on ``(seed, task, context_length, i, text)``.

    Raises:
        ValueError: unknown ``task``, ``context_length`` < 256, ``n`` < 0, or a text too poor in words.
    """
    from .texts import reference_text

    if task not in RULER_TASKS:
        raise ValueError(f"task must be one of {list(RULER_TASKS)}, got {task!r}")
    check_args(tokenizer, context_length, n, (0.5,))
    text = text if text is not None else reference_text()
    if len(word_pool(text)) < 100:
        raise ValueError(f"text must hold at least 100 distinct words for RULER tasks, got {len(word_pool(text))}")
    make, out = _generator(task), []
    for i in range(n):
        rng = random.Random(f"{seed}:ruler:{task}:{context_length}:{i}")
        fields = make(task, tokenizer, context_length, rng, text)
        out.append(RulerSample(task, i, fields["prompt"], fields["answer_prefix"], fields["answers"], context_length,
                               RULER_TASKS[task], fields["meta"]))
    return out

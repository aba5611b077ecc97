"""RULER generators: answers in the prompt, sizes, seeds, task structure."""

import re
from collections import Counter

import pytest
from helpers import tiny_tokenizer

from mustafar.evaluation.metrics import string_match_all
from mustafar.evaluation.ruler import NIAH_SPECS, RULER_TASKS, ruler_samples, word_pool
from mustafar.evaluation.tasks import MAX_SENTENCE_CHARS
from mustafar.evaluation.ruler_words import zeta
from mustafar.generation import chat_input_ids

LENGTH = 2048  # the tiny tokenizer has one token per byte


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def samples(tokenizer):
    return {task: ruler_samples(tokenizer, task, LENGTH, 3, seed=11) for task in RULER_TASKS}


def _tokens(tokenizer, sample) -> int:
    return chat_input_ids(tokenizer, sample.prompt, sample.answer_prefix).shape[1]


@pytest.mark.parametrize("task", list(RULER_TASKS))
def test_answers_are_in_the_prompt(samples, task):
    for sample in samples[task]:
        assert sample.answers and all(answer in sample.prompt for answer in sample.answers)
        assert string_match_all(sample.prompt, sample.answers) == 1.0
        assert sample.max_new_tokens == RULER_TASKS[task]


@pytest.mark.parametrize("task", list(RULER_TASKS))
def test_prompt_length_near_context_length(tokenizer, samples, task):
    slack = MAX_SENTENCE_CHARS + 20  # at most one haystack unit more (byte tokenizer: a unit is up to 400 tokens)
    for sample in samples[task]:
        assert LENGTH - 60 <= _tokens(tokenizer, sample) <= LENGTH + slack


@pytest.mark.parametrize("task", ["niah_single_2", "vt", "cwe", "fwe", "niah_multikey_3"])
def test_seeds_give_identical_data(tokenizer, task):
    first, again = ruler_samples(tokenizer, task, LENGTH, 2, seed=5), ruler_samples(tokenizer, task, LENGTH, 2, seed=5)
    assert first == again
    other = ruler_samples(tokenizer, task, LENGTH, 2, seed=6)
    assert [s.prompt for s in first] != [s.prompt for s in other]
    assert ruler_samples(tokenizer, task, LENGTH, 3, seed=5)[1] == first[1], "sample i does not depend on n"


def test_niah_needles_and_queries(samples):
    for task, spec in NIAH_SPECS.items():
        for sample in samples[task]:
            needles = re.findall(r"One of the special magic (?:numbers|uuids) for (\S+) is: (\S+)\.", sample.prompt)
            asked = [k for k, _ in needles if k in sample.prompt.rsplit("\n", 1)[1]]
            values = [v for k, v in needles if k in asked]
            assert set(sample.answers) <= set(values)
            assert len(sample.answers) == spec.values * spec.queries
            if spec.haystack == "needle":
                assert len(needles) > 10, "the haystack is made of needles"
            if spec.value == "uuids":
                assert all(re.fullmatch(r"[0-9a-f-]{36}", a) for a in sample.answers)
            else:
                assert all(re.fullmatch(r"\d{7}", a) for a in sample.answers)
            singular = spec.values * spec.queries == 1
            assert sample.prompt.startswith("A special magic" if singular else "Some special magic")
            assert sample.answer_prefix.endswith(" is" if singular else " are")


def test_vt_chain_leads_to_the_value(samples):
    for sample in samples["vt"]:
        body = sample.prompt.split("Memorize and track")[-1]
        value = sample.meta["value"]
        assignments = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)", body))
        assert assignments[sample.answers[0]] == value
        for previous, name in zip(sample.answers, sample.answers[1:]):
            assert assignments[name] == f"VAR {previous}"
        assert body.index(f"VAR {sample.answers[0]} =") < body.index(f"VAR {sample.answers[-1]} =")
        assert sample.prompt.count("Question:") == 2, "one-shot example, then the question"


def test_cwe_common_words_are_the_most_frequent(samples):
    for sample in samples["cwe"]:
        listing = sample.prompt.split("Question:")[-2].split("\n", 1)[-1]
        counts = Counter(re.findall(r"\d+\. (\w+)", listing))
        top = {w for w, _ in counts.most_common(10)}
        assert top == set(sample.answers)
        assert min(counts[w] for w in sample.answers) > max(c for w, c in counts.items() if w not in top)


def test_fwe_answers_are_the_next_most_frequent(samples):
    for sample in samples["fwe"]:
        text = sample.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0]
        ranked = [w for w, _ in Counter(text.split()).most_common()]
        assert ranked[0] == "..." and ranked[1:4] == list(sample.answers)


def test_haystack_from_user_text(tokenizer):
    text = " ".join(f"Sentence number {i} talks about {w}." for i, w in enumerate(["alpha", "beta", "gamma"] * 80))
    text += " " + " ".join(chr(97 + i % 26) + chr(97 + i // 26) + "zork" for i in range(120))
    sample = ruler_samples(tokenizer, "niah_single_2", 512, 1, text=text)[0]
    assert "Sentence number" in sample.prompt and sample.answers[0] in sample.prompt
    assert len(word_pool(text)) >= 100


def test_zeta():
    assert zeta(2.0) == pytest.approx(3.14159265358979**2 / 6, rel=1e-9)
    with pytest.raises(ValueError, match="alpha"):
        zeta(1.0)


@pytest.mark.parametrize("bad, match", [(dict(task="niah_x"), "task"), (dict(context_length=100), "context_length"),
                                        (dict(n=-1), "n"), (dict(text="too few words here. " * 20), "text")])
def test_bad_arguments(tokenizer, bad, match):
    args = dict(task="vt", context_length=512, n=1, text=None) | bad
    with pytest.raises(ValueError, match=match):
        ruler_samples(tokenizer, args["task"], args["context_length"], args["n"], text=args["text"])

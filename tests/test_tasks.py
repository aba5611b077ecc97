"""Retrieval task generators, the answer checker, and the offline texts."""

import pytest
from helpers import tiny_tokenizer

from mustafar.evaluation.tasks import (
    DEFAULT_DEPTHS,
    MAX_SENTENCE_CHARS,
    PASSKEY_FILLER,
    PASSKEY_DIGITS,
    NIAH_DIGITS,
    check_answer,
    niah_samples,
    passkey_samples,
)
from mustafar.evaluation.texts import load_text, reference_text, sentences


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _templated_length(tokenizer, sample) -> int:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return len(tokenizer.encode(chat + sample.answer_prefix, add_special_tokens=False))


def _depth(tokenizer, sample, needle: str, haystack_start: str, haystack_end: str) -> tuple[float, int]:
    """Fraction of the haystack's tokens (needles excluded) before ``needle``, and the haystack's tokens."""
    body = sample.prompt.split(haystack_start, 1)[1].rsplit(haystack_end, 1)[0]
    before, after = body.split(needle, 1)
    for other in sample.needles:
        before, after = before.replace(other, ""), after.replace(other, "")
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    total = count(before) + count(after)
    return count(before) / total, total


@pytest.mark.parametrize("length", [512, 2048])
def test_passkey_needle_at_depth_and_length(tokenizer, length):
    samples = passkey_samples(tokenizer, length, 5, seed=3)
    assert [s.depth for s in samples] == list(DEFAULT_DEPTHS)
    for sample in samples:
        assert len(sample.answer) == PASSKEY_DIGITS and sample.answer.isdigit()
        needle = sample.needles[0]
        assert sample.prompt.count(needle) == 1 and sample.answer in needle
        depth, total = _depth(tokenizer, sample, needle, "\n\n", "\n\nWhat is")
        longest = max(len(tokenizer.encode(" " + s)) for s in PASSKEY_FILLER)
        assert depth == pytest.approx(sample.depth, abs=longest / total)  # at the nearest sentence boundary
        assert length <= _templated_length(tokenizer, sample) <= length + longest


@pytest.mark.parametrize("num_needles", [1, 4])
def test_niah_needles_at_depth(tokenizer, num_needles):
    samples = niah_samples(tokenizer, 4096, 5, seed=1, num_needles=num_needles)
    for sample in samples:
        assert len(sample.needles) == num_needles
        assert len(set(sample.needles)) == num_needles
        for needle in sample.needles:
            assert sample.prompt.count(needle) == 1
        asked = sample.needles[0]
        assert f"for {sample.key} is: {sample.answer}." in asked and len(sample.answer) == NIAH_DIGITS
        assert sample.key in sample.prompt.rsplit("\n", 1)[1], "the question names the asked key"
        assert sample.answer_prefix.endswith(" ") and sample.key in sample.answer_prefix
        depth, total = _depth(tokenizer, sample, asked, "afterwards.\n", "\nWhat is")
        assert depth == pytest.approx(sample.depth, abs=MAX_SENTENCE_CHARS / total)  # nearest sentence boundary
        assert 4096 <= _templated_length(tokenizer, sample) <= 4096 + MAX_SENTENCE_CHARS


def test_multikey_distractors_have_other_keys_and_numbers(tokenizer):
    for sample in niah_samples(tokenizer, 1024, 4, seed=0, num_needles=4):
        others = sample.needles[1:]
        assert all(sample.key not in n.split(" is: ")[0].split() for n in others)
        assert all(sample.answer not in n for n in others)
        position = sample.prompt.index(sample.needles[0])
        assert all(sample.prompt.index(n) <= position for n in others), "distractors precede the asked needle"


def test_seeds_give_identical_data(tokenizer):
    for make in (passkey_samples, niah_samples):
        first, again = make(tokenizer, 1024, 3, seed=7), make(tokenizer, 1024, 3, seed=7)
        assert first == again
        other = make(tokenizer, 1024, 3, seed=8)
        assert [s.answer for s in first] != [s.answer for s in other]
        assert [s.prompt for s in first] != [s.prompt for s in other]


def test_sample_index_does_not_depend_on_count(tokenizer):
    assert passkey_samples(tokenizer, 512, 2, seed=5)[1] == passkey_samples(tokenizer, 512, 4, seed=5)[1]


@pytest.mark.parametrize("output", ["12345", " 12345.", "12345 is the pass key", "12,345", "\n**12345**"])
def test_checker_accepts_right_answers(output):
    assert check_answer(output, "12345")


@pytest.mark.parametrize("output", ["12346", " 1234", "123456", "no number here", "7 then 12345", "", "1234 5"])
def test_checker_rejects_wrong_answers(output):
    assert not check_answer(output, "12345")


@pytest.mark.parametrize("bad", [dict(context_length=100), dict(context_length=2048.0), dict(n=-1),
                                 dict(depths=(1.5,)), dict(depths=())])
def test_generators_reject_bad_arguments(tokenizer, bad):
    args = dict(context_length=1024, n=1, depths=DEFAULT_DEPTHS) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        passkey_samples(tokenizer, args["context_length"], args["n"], 0, args["depths"])


def test_niah_rejects_bad_needle_count(tokenizer):
    with pytest.raises(ValueError, match="num_needles"):
        niah_samples(tokenizer, 1024, 1, num_needles=0)


def test_reference_text_is_long_english(tokenizer):
    text = reference_text()
    assert len(text) > 20_000 and " the " in text
    assert len(sentences(text)) > 200


def test_load_text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Words. " * 50)
    assert load_text(path).startswith("Words.")
    with pytest.raises(FileNotFoundError, match="text_file"):
        load_text(tmp_path / "missing.txt")
    path.write_text("short")
    with pytest.raises(ValueError, match="text_file"):
        load_text(path)

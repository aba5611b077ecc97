"""Scoring of generated answers: RULER's string match and LongBench's per-task metrics.

Every metric maps ``(prediction, reference)`` to a score in [0, 1] and follows
its benchmark's published code, quirks included, so that numbers are comparable:

- **RULER** (Hsieh et al., arXiv 2404.06654, ``eval/synthetic/constants.py``):
  :func:`string_match_all` (fraction of the references found in the prediction,
  case-insensitive substring match) for the synthetic tasks, :func:`string_match_part`
  (1 if any reference is found) for QA.
- **LongBench** (Bai et al., arXiv 2308.14508, ``metrics.py``): :func:`qa_f1_score`
  (SQuAD-normalised token F1), :func:`rouge_score` (ROUGE-L F of the ``rouge``
  package, 0 where it raises), :func:`classification_score`, :func:`retrieval_score`,
  :func:`count_score`, :func:`code_sim_score` (Levenshtein ratio of the first code
  line, ``rapidfuzz`` in place of ``fuzzywuzzy``: the same ratio, rounded to an
  integer percent as ``fuzzywuzzy`` does). :func:`longbench_score` applies the
  first-line post-processing of LongBench's ``eval.py`` and keeps the best reference.

Example::

    >>> qa_f1_score("The Eiffel Tower!", "eiffel tower")
    1.0
    >>> string_match_all("keys: 123 and 456", ["123", "789"])
    0.5
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

__all__ = ["normalize_answer", "qa_f1_score", "rouge_score", "classification_score", "retrieval_score",
           "count_score", "code_sim_score", "string_match_all", "string_match_part", "ruler_postprocess",
           "longbench_score", "LONGBENCH_METRICS", "FIRST_LINE_TASKS"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_DIGITS = re.compile(r"\d+")
_CONTROL = re.compile(r"[\x00-\x1f]")


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r:.60}")
    return value


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop ASCII punctuation, the articles a/an/the, and extra whitespace."""
    text = "".join(ch for ch in _check_text("text", text).lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(prediction: list[str], reference: list[str]) -> float:
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, reference: str, **_) -> float:
    """Token F1 of the normalised prediction and reference (bags of words); 0 when either is empty."""
    prediction, reference = _check_text("prediction", prediction), _check_text("reference", reference)
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def rouge_score(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F (summary level, ``rouge`` package as LongBench calls it); 0.0 where the package raises.

    The package splits sentences at ``.`` and counts distinct words; an empty
    prediction (or one of dots only) raises ``ValueError`` in it and scores 0, as in LongBench.
    """
    from rouge import Rouge

    _check_text("prediction", prediction), _check_text("reference", reference)
    try:
        return float(Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"])
    except (ValueError, RecursionError, ZeroDivisionError):
        return 0.0


def classification_score(prediction: str, reference: str, all_classes: Sequence[str] | None = None, **_) -> float:
    """``1/m`` when ``reference`` is among the ``m`` class names found in ``prediction``, else 0.

    Class names that are substrings of the reference (but not equal to it) are
    dropped first, with LongBench's loop that removes from the list it iterates
    (so a name right after a removed one is kept): reproduced for comparable numbers.
    """
    if all_classes is None or isinstance(all_classes, str):
        raise TypeError(f"all_classes must be a sequence of class names, got {all_classes!r:.60}")
    _check_text("prediction", prediction), _check_text("reference", reference)
    matches = [name for name in all_classes if name in prediction]
    for name in matches:  # noqa: B007 -- LongBench mutates while iterating; kept on purpose (see docstring)
        if name in reference and name != reference:
            matches.remove(name)
    return 1.0 / len(matches) if reference in matches else 0.0


def _fraction_equal(prediction: str, target: str) -> float:
    numbers = _DIGITS.findall(prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in ``prediction`` equal to the paragraph number of ``reference`` ("Paragraph 7").

    Raises:
        ValueError: ``reference`` holds no "Paragraph N".
    """
    match = re.search(r"Paragraph (\d+)", _check_text("reference", reference))
    if match is None:
        raise ValueError(f"reference must contain 'Paragraph N', got {reference!r:.60}")
    return _fraction_equal(_check_text("prediction", prediction), match.group(1))


def count_score(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in ``prediction`` equal to ``reference`` (passage_count); 0 without numbers."""
    return _fraction_equal(_check_text("prediction", prediction), str(reference))


def first_code_line(prediction: str) -> str:
    """The first line (after leading newlines) without a backtick, ``#`` or ``//``; "" if none."""
    for line in _check_text("prediction", prediction).lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim_score(prediction: str, reference: str, **_) -> float:
    """Levenshtein similarity ratio (integer percent / 100) of :func:`first_code_line` and ``reference``."""
    from rapidfuzz import fuzz

    return round(fuzz.ratio(first_code_line(prediction), _check_text("reference", reference))) / 100


def ruler_postprocess(prediction: str) -> str:
    """RULER's prediction clean-up: strip, control characters to newlines."""
    return _CONTROL.sub("\n", _check_text("prediction", prediction).strip()).strip()


def _check_references(references: Sequence[str]) -> Sequence[str]:
    if isinstance(references, str) or not references or not all(isinstance(r, str) for r in references):
        raise ValueError(f"references must be a non-empty sequence of str, got {references!r:.80}")
    return references


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` found (case-insensitive substring) in ``prediction`` (RULER)."""
    text = ruler_postprocess(prediction).lower()
    return sum(r.lower() in text for r in _check_references(references)) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any of ``references`` is found (case-insensitive substring) in ``prediction``, else 0.0 (RULER QA)."""
    text = ruler_postprocess(prediction).lower()
    return float(any(r.lower() in text for r in _check_references(references)))


#: LongBench task -> metric (``eval.py``'s ``dataset2metric``, English tasks).
LONGBENCH_METRICS = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score, "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score, "musique": qa_f1_score, "gov_report": rouge_score, "qmsum": rouge_score,
    "multi_news": rouge_score, "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "passage_retrieval_en": retrieval_score, "passage_count": count_score, "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}
#: Tasks whose prediction is cut to its first line before scoring (LongBench ``eval.py``).
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def longbench_score(task: str, prediction: str, references: Sequence[str],
                    all_classes: Sequence[str] | None = None) -> float:
    """LongBench's score of one prediction: the best over ``references`` of the task's metric, in [0, 1].

    Raises:
        ValueError: unknown ``task`` or empty ``references``.
    """
    if task not in LONGBENCH_METRICS:
        raise ValueError(f"task must be one of {sorted(LONGBENCH_METRICS)}, got {task!r}")
    _check_references(references)
    if task in FIRST_LINE_TASKS:
        prediction = _check_text("prediction", prediction).lstrip("\n").split("\n")[0]
    metric = LONGBENCH_METRICS[task]
    return max(0.0, *(metric(prediction, ref, all_classes=all_classes) for ref in references))

"""RULER and LongBench metrics against hand-computed values, edge cases included."""

import pytest

from mustafar.evaluation.metrics import (
    classification_score,
    code_sim_score,
    count_score,
    longbench_score,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_score,
    string_match_all,
    string_match_part,
)


def test_normalize_answer():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("Café MÜLLER «x»") == "café müller «x»"  # only ASCII punctuation is removed
    assert normalize_answer("") == ""


@pytest.mark.parametrize("prediction, reference, expected", [
    ("Paris", "paris", 1.0),
    ("the city of Paris", "Paris", 2 * (1 / 3) * 1 / (1 / 3 + 1)),  # tokens: city, of, paris -> P 1/3, R 1
    ("red blue", "blue green yellow", 2 * 0.5 * (1 / 3) / (0.5 + 1 / 3)),
    ("a b b", "b b c", 0.8),  # "a" is an article: "b b" vs "b b c" -> common 2, P 1, R 2/3
    ("", "Paris", 0.0),
    ("Paris", "", 0.0),
    ("the", "the", 0.0),  # both empty after normalisation
    ("Zürich, Schweiz", "zürich", 2 * 0.5 * 1 / 1.5),
])
def test_qa_f1(prediction, reference, expected):
    assert qa_f1_score(prediction, reference) == pytest.approx(expected)


def test_qa_f1_counts_repeated_tokens_once_per_match():
    # Counter intersection: "b b b" vs "b" -> common 1, P 1/3, R 1
    assert qa_f1_score("b b b", "b") == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))


def test_rouge_l_hand_computed():
    # distinct words: the cat sat on mat (5) vs the cat lay on mat (5); LCS = the cat on mat (4)
    assert rouge_score("the cat sat on mat", "the cat lay on mat") == pytest.approx(0.8, abs=1e-6)
    assert rouge_score("a b c d", "a b c d") == pytest.approx(1.0, abs=1e-6)
    assert rouge_score("x y", "a b") == pytest.approx(0.0, abs=1e-6)
    # non-ASCII words are words: 2 of 3 in order -> P = R = 2/3
    assert rouge_score("über straße café", "über café noch") == pytest.approx(2 / 3, abs=1e-6)


def test_rouge_edge_cases():
    assert rouge_score("", "a reference") == 0.0  # the package raises on an empty hypothesis
    assert rouge_score("...", "a reference") == 0.0  # only sentence separators


def test_classification_score():
    classes = ["Abbreviation", "Entity", "Human being", "Location", "Numeric value", "Description"]
    assert classification_score("Location", "Location", all_classes=classes) == 1.0
    assert classification_score("Entity or Location", "Location", all_classes=classes) == 0.5
    assert classification_score("Human", "Human being", all_classes=classes) == 0.0
    assert classification_score("", "Location", all_classes=classes) == 0.0
    # a class name contained in the reference is dropped before counting
    assert classification_score("Full name", "Full name", all_classes=["name", "Full name"]) == 1.0
    with pytest.raises(TypeError, match="all_classes"):
        classification_score("x", "y")


def test_classification_reproduces_longbench_list_mutation():
    # LongBench removes from the list it iterates: "ab" is removed, "abc" (next) is skipped, so 3 matches stay
    classes = ["ab", "abc", "abcd"]
    assert classification_score("abcd", "abcd", all_classes=classes) == pytest.approx(1 / 2)


def test_retrieval_and_count_scores():
    assert retrieval_score("Paragraph 7", "Paragraph 7") == 1.0
    assert retrieval_score("Paragraph 7 or Paragraph 3", "Paragraph 7") == 0.5
    assert retrieval_score("none", "Paragraph 7") == 0.0
    assert retrieval_score("17", "Paragraph 7") == 0.0
    with pytest.raises(ValueError, match="Paragraph"):
        retrieval_score("7", "7")
    assert count_score("There are 12 paragraphs", "12") == 1.0
    assert count_score("12, 13 or 12", "12") == pytest.approx(2 / 3)
    assert count_score("", "12") == 0.0


def test_code_sim_score():
    assert code_sim_score("x = 1\n", "x = 1") == 1.0
    # comment and fence lines are skipped: the first plain line is compared
    assert code_sim_score("\n# comment\n```\nreturn a", "return a") == 1.0
    # ratio = 2 * matches / (len_a + len_b): "abcd" vs "abce" -> 2*3/8 = 0.75
    assert code_sim_score("abcd", "abce") == 0.75
    assert code_sim_score("", "abc") == 0.0
    assert code_sim_score("# only comments", "abc") == 0.0
    # rounded to an integer percent like fuzzywuzzy: 2*1/3 -> 67
    assert code_sim_score("a", "ab") == 0.67


def test_string_match():
    refs = ["1234567", "ABCDE"]
    assert string_match_all("The numbers are 1234567 and abcde.", refs) == 1.0
    assert string_match_all("1234567", refs) == 0.5
    assert string_match_all("", refs) == 0.0
    assert string_match_part("only ABCDE", refs) == 1.0
    assert string_match_part("nothing", refs) == 0.0
    assert string_match_all("ÄÖÜ straße", ["äöü"]) == 1.0  # case-insensitive beyond ASCII
    with pytest.raises(ValueError, match="references"):
        string_match_all("x", [])
    with pytest.raises(ValueError, match="references"):
        string_match_all("x", "abc")


def test_longbench_score_best_reference_and_first_line():
    assert longbench_score("hotpotqa", "Paris", ["London", "Paris"]) == 1.0
    # triviaqa keeps the first line only
    assert longbench_score("triviaqa", "\nParis\nLondon", ["London"]) == 0.0
    assert longbench_score("triviaqa", "\nParis\nLondon", ["Paris"]) == 1.0
    assert longbench_score("trec", "Location\nEntity", ["Location"], all_classes=["Location", "Entity"]) == 1.0
    assert longbench_score("passage_count", "3", ["3"]) == 1.0
    with pytest.raises(ValueError, match="task"):
        longbench_score("nosuchtask", "x", ["x"])
    with pytest.raises(ValueError, match="references"):
        longbench_score("hotpotqa", "x", [])
    with pytest.raises(TypeError, match="prediction"):
        qa_f1_score(None, "x")

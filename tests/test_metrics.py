import math

import pytest

from fedit.evaluate import metrics as M


def test_mean_token_prob_and_success_with_ties():
    # Two tokens with NLL 1 and 3: mean NLL 2 -> exp(-2).
    assert M.mean_token_prob(4.0, 2) == pytest.approx(math.exp(-2))
    assert M.success(0.3, 0.2) == 1.0
    assert M.success(0.2, 0.3) == 0.0
    assert M.success(0.25, 0.25) == 0.0  # a tie is not a success
    assert M.magnitude(0.5, 0.2) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        M.mean_token_prob(1.0, 0)


def test_multi_token_targets_compare_mean_token_probabilities():
    # " New York City" (3 tokens, NLLs 0.5, 0.1, 0.1) vs " Paris" (1 token, NLL 1.0):
    p_new = M.mean_token_prob(0.5 + 0.1 + 0.1, 3)
    p_true = M.mean_token_prob(1.0, 1)
    assert p_new == pytest.approx(math.exp(-0.7 / 3))
    assert M.success(p_new, p_true) == 1.0
    # The mean-token probability is not the joint probability of the three tokens.
    assert math.exp(-0.7) < p_new


def test_harmonic_mean_is_counterfact_score():
    assert M.harmonic_mean([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert M.harmonic_mean([0.989, 0.886, 0.737]) == pytest.approx(3 / (1 / 0.989 + 1 / 0.886 + 1 / 0.737))
    assert M.harmonic_mean([0.9, 0.0, 0.8]) == 0.0


def test_token_accuracy_and_agreement():
    assert M.token_accuracy([5, 7, 9], [5, 8, 9]) == pytest.approx(2 / 3)
    assert M.token_accuracy([1], [1]) == 1.0
    with pytest.raises(ValueError):
        M.token_accuracy([1, 2], [1])
    assert M.agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75


def test_ngram_entropy_hand_computed():
    # "a b a b": bigrams (a,b),(b,a),(a,b) -> p = 2/3, 1/3; trigrams (a,b,a),(b,a,b) -> 1/2, 1/2.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert M.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    # Repetition lowers fluency.
    assert M.fluency(["the cat sat on the mat and looked at the dog"]) > M.fluency(["the the the the the the"])


def test_tfidf_cosine():
    vocab = {"paris": 0, "france": 1, "rome": 2}
    idf = [1.0, 2.0, 3.0]
    assert M.tfidf_cosine(["Paris France"], ["paris france"], vocab, idf) == pytest.approx(1.0)
    assert M.tfidf_cosine(["Rome"], ["Paris"], vocab, idf) == 0.0

"""Metric functions, each named for what it is.

Two scoring styles exist and are easily confused (EasyEdit issue #125):

* **success** (CounterFact, ROME/MEMIT papers): a comparison of two continuation
  probabilities, ``[P(new) > P(true)]``. Here P is the *mean-token* probability
  ``exp(−mean NLL)`` of a continuation under teacher forcing, as in the papers' code. A tie
  counts as failure.
* **token accuracy** (zsRE, EasyEdit): the fraction of answer tokens that are the top-1
  prediction under teacher forcing.

Functions here take numbers the model produced; they never run a model.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from statistics import mean
from typing import Iterable, Sequence


def mean_token_prob(nll_sum: float, n_tokens: int) -> float:
    """exp(−mean NLL): the per-token probability used by CounterFact success metrics."""
    if n_tokens <= 0:
        raise ValueError("a continuation needs at least one token")
    return math.exp(-nll_sum / n_tokens)


def success(p_expected: float, p_other: float) -> float:
    """1.0 when the expected continuation is strictly more likely, else 0.0 (ties fail)."""
    return 1.0 if p_expected > p_other else 0.0


def magnitude(p_expected: float, p_other: float) -> float:
    """How much more likely the expected continuation is (a probability difference)."""
    return p_expected - p_other


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (CounterFact's Score of ES, PS, NS)."""
    if not values:
        raise ValueError("no values")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def token_accuracy(predicted: Sequence[int], answer: Sequence[int]) -> float:
    """Fraction of answer tokens equal to the top-1 teacher-forced prediction at their position."""
    if len(answer) == 0:
        raise ValueError("an answer needs at least one token")
    if len(predicted) != len(answer):
        raise ValueError(f"{len(predicted)} predictions for {len(answer)} answer tokens")
    return sum(int(p == a) for p, a in zip(predicted, answer)) / len(answer)


def agreement(before: Sequence[int], after: Sequence[int]) -> float:
    """EasyEdit's locality: fraction of positions whose top-1 prediction did not change."""
    if len(before) != len(after) or not before:
        raise ValueError("need two non-empty prediction lists of equal length")
    return sum(int(a == b) for a, b in zip(before, after)) / len(before)


_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Word tokens (letters/digits runs and single punctuation marks), lower-cased."""
    return _WORD.findall(text.lower())


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure of one text: mean over n of weight_n · H(n-gram frequencies) in bits.

    Repetitive generations have low entropy. ROME tokenises with NLTK; we use a regex word
    splitter (``words``), which can differ on contractions and hyphens.
    """
    toks = words(text)
    parts = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return mean(parts)


def fluency(texts: Iterable[str]) -> float:
    """Generation entropy GE: the mean n-gram entropy of several generations."""
    vals = [ngram_entropy(t) for t in texts]
    if not vals:
        raise ValueError("no generations")
    return mean(vals)


def tfidf_cosine(texts: Sequence[str], references: Sequence[str], vocab: dict[str, int], idf: Sequence[float]) -> float:
    """Consistency RS: cosine between the mean TF-IDF vectors of generations and reference texts.

    ``vocab`` and ``idf`` are the reference files of the ROME evaluation (``tfidf_vocab.json``,
    ``idf.npy``); without them the metric is unavailable, never zero.
    """
    def vec(docs):
        acc: dict[int, float] = {}
        for d in docs:
            counts = Counter(w for w in words(d) if w in vocab)
            total = sum(counts.values()) or 1
            row = {vocab[w]: c / total * idf[vocab[w]] for w, c in counts.items()}
            norm = math.sqrt(sum(v * v for v in row.values())) or 1.0
            for k, v in row.items():
                acc[k] = acc.get(k, 0.0) + v / norm / len(docs)
        return acc

    a, b = vec(texts), vec(references)
    dot = sum(v * b.get(k, 0.0) for k, v in a.items())
    na, nb = math.sqrt(sum(v * v for v in a.values())), math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na and nb else 0.0

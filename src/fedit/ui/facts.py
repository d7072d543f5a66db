"""Facts to pick from: the dataset samples shipped with fedit and a file named on the command line."""

from __future__ import annotations

from fedit.data.loaders import KINDS, load_records, sample_path
from fedit.data.records import EvalRecord
from fedit.errors import FeditError

# known_1000 holds facts the model knows (for tracing), with no new target to write
EDIT_KINDS = tuple(k for k in KINDS if k not in ("known_1000", "easyedit"))


def record_fact(rec: EvalRecord) -> dict:
    """A record as the page's edit form takes it."""
    r = rec.request
    return {"case_id": r.case_id, "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
            "target_true": r.target_true or "", "paraphrases": list(rec.paraphrases),
            "neighbours": [p.prompt for p in rec.neighborhood]}


class FactSources:
    """Named record lists, read once each: ``sample:<kind>`` for every shipped sample, and
    ``file`` for ``--data PATH`` (format ``--dataset KIND``)."""

    def __init__(self, kind: str | None = None, path: str | None = None):
        if path is not None and kind is None:
            raise FeditError(f"--data {path} needs its format.", f"add --dataset KIND (one of {list(EDIT_KINDS)}).")
        if kind is not None and kind not in EDIT_KINDS:
            raise FeditError(f"--dataset {kind!r} cannot be edited from the page.", f"use one of {list(EDIT_KINDS)}.")
        self._where = {f"sample:{k}": (k, None) for k in EDIT_KINDS}
        if path is not None:
            load_records(kind, path, n=1)  # refuse a missing or malformed file at startup
            self._where = {"file": (kind, path), **self._where}
        self._cache: dict[str, list[EvalRecord]] = {}

    def listing(self) -> list[dict]:
        return [{"id": sid, "kind": k, "path": str(p if p else sample_path(k))} for sid, (k, p) in self._where.items()]

    def records(self, source: str) -> list[EvalRecord]:
        if source not in self._where:
            raise FeditError(f"unknown fact source {source!r}.", f"use one of {list(self._where)}.")
        if source not in self._cache:
            kind, path = self._where[source]
            self._cache[source] = load_records(kind, path, skip_invalid=True)
        return self._cache[source]

    def search(self, source: str, query: str = "", limit: int = 50) -> dict:
        """Records of ``source`` whose prompt, subject or targets contain ``query`` (case-insensitive)."""
        recs = self.records(source)
        q = query.strip().lower()
        hits = [r for r in recs if not q or q in " ".join(
            [r.request.filled_prompt, r.request.target_new, r.request.target_true or ""]).lower()]
        return {"total": len(recs), "matches": len(hits), "facts": [record_fact(r) for r in hits[:limit]]}

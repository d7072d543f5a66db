"""FedEdit's MKV batches as Flower message content and back.

MKVs travel as one ArrayRecord of row-stacked tensors (``mkv``, ``key.<l>``, ``resid.<l>``, …)
and a ConfigRecord holding the per-fact metadata as JSON.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedit.errors import FeditError
from fedit.federation.fededit import MKVBatch
from fedit.federation.flower import to_arrays, to_tensors


def batch_content(batch: MKVBatch, **values) -> RecordDict:
    return RecordDict({"mkvs": to_arrays(batch.to_arrays()) if len(batch) else ArrayRecord(),
                       "config": ConfigRecord({**values, "meta": json.dumps(batch.meta), "n": len(batch)})})


def batch_from(content: RecordDict, owner: str = "") -> MKVBatch:
    cfg = content["config"]
    meta = json.loads(str(cfg["meta"]))
    if int(cfg["n"]) == 0:
        return MKVBatch(torch.zeros(0, 0), [], [], owner)
    return MKVBatch.from_arrays(to_tensors(content["mkvs"]), meta, owner)


def upload_from(content: RecordDict, owner: str) -> MKVBatch | str:
    """A client's uploaded MKVs, or why they cannot be read (the server refuses all of them then)."""
    try:
        return batch_from(content, owner)
    except (FeditError, KeyError, TypeError, ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {str(e)[:200]}"

"""Collaborative editing (CollabEdit): merge many organisations' edits as one.

Engine-neutral: no Flower, no files. ``merge`` holds the merges (CollabEdit's non-destructive
one and the destructive baselines), ``protocol`` the digests and the overlap/conflict rules,
``state`` the multi-round state (C₁), ``client`` one organisation's role, ``driver`` a plain
in-process run, ``rounds`` the round loop both engines run. The Flower apps are in
``fedit.collab.app`` (the only part that imports Flower).
"""

from fedit.collab.client import CollabClient, CollabError, PublishedModel, Prepared, pool, summed
from fedit.collab.config import CollabConfig
from fedit.collab.driver import run_collab
from fedit.collab.plan import PlanError, split_plan
from fedit.collab.report import annotate, round_entry
from fedit.collab.merge import (MERGES, MergeConfig, MergeError, average, client_deltas, collabedit, fedavg, merge,
                                solve, sum_stats, task_arithmetic, ties)
from fedit.collab.protocol import (POLICIES, FactDigest, ProtocolError, Resolution, digest, digest_records, normalise,
                                   relation_of, resolve)
from fedit.collab.state import CollabState

__all__ = ["MERGES", "POLICIES", "CollabClient", "CollabConfig", "CollabError", "CollabState", "FactDigest",
           "MergeConfig", "MergeError", "PublishedModel", "PlanError", "Prepared", "ProtocolError", "Resolution",
           "annotate", "average", "client_deltas", "collabedit", "digest", "digest_records", "fedavg", "merge",
           "normalise", "pool", "relation_of", "resolve", "round_entry", "run_collab", "solve", "split_plan",
           "sum_stats", "summed", "task_arithmetic", "ties"]

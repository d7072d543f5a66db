"""Settings of a federated run, and what a client needs to find its own data and model.

Flower passes settings as flat key/value pairs (``[tool.flwr.app.config]`` in pyproject.toml,
``--run-config`` on the command line); here they become one typed dataclass. No Flower import.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedit.errors import FeditError

log = logging.getLogger(__name__)


class SettingsError(FeditError):
    """A federated run's settings that cannot work."""


@dataclass
class RunSettings:
    """What every app's settings dataclass shares: the model and its caches, Flower's flat user
    config (hyphenated keys, scalar values) both ways, and MEMIT hyperparameter overrides (a JSON
    object in the subclass's ``overrides``)."""

    # model and caches
    model: str = "gemma-3-270m"
    device: str = ""
    dtype: str = ""
    cache_dir: str = ""
    corpus: str = ""
    threads: int = 0

    def to_user_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_user_config(cls, cfg: dict[str, Any], **override):
        """The settings from a user config; keys the class does not know are other apps'."""
        known = {f.name: f for f in fields(cls)}
        kw: dict[str, Any] = {}
        for k, v in dict(cfg).items():
            name = k.replace("-", "_")
            if name not in known:
                near = difflib.get_close_matches(name, list(known), n=1, cutoff=0.8)
                if near:  # another app's key is fine; a near miss of ours is most likely a typo
                    log.warning("run config key %r is not a fedit setting and is ignored; did you mean %r?",
                                k, near[0].replace("_", "-"))
                continue
            typ = known[name].type
            try:
                kw[name] = (v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")) if typ == "bool" \
                    else int(v) if typ == "int" else float(v) if typ == "float" else str(v)
            except (TypeError, ValueError) as e:
                raise SettingsError(f"setting {k} = {v!r} is not a valid {typ}.", f"give {k} a {typ} value.") from e
        kw.update(override)
        return cls(**kw)

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    def hparam_overrides(self) -> dict[str, Any]:
        if not self.overrides:
            return {}
        try:
            o = json.loads(self.overrides)
        except json.JSONDecodeError as e:
            raise SettingsError(f"overrides is not JSON: {e}.", 'pass a JSON object, e.g. {"layers": [4, 5]}.') from e
        if not isinstance(o, dict):
            raise SettingsError("overrides must be a JSON object.", 'pass e.g. {"layers": [4, 5]}.')
        return o


@dataclass
class FedSettings(RunSettings):
    # data: each client takes its share of one dataset (simulation), or its own file
    dataset: str = "counterfact"
    data: str = ""  # "" = the sample shipped with fedit
    clients: int = 3
    n_per_client: int = 6
    slots: int = 2
    partition: str = "relation"  # relation | cluster | iid
    seed: int = 0
    overlap: int = 0  # client 0's first `overlap` records are also every other client's last ones
    # method
    method: str = "memit"
    overrides: str = ""  # JSON object of hyperparameter overrides
    hparams_file: str = ""
    # FedEdit
    mode: str = "private"  # private | paper
    # paper mode asks the nodes for their plaintext requests; each node still decides with its own node
    # config (share-requests=true, federation/privacy.py). In `fedit fed run` it plays every node's consent.
    share_requests: bool = False
    tau: float = 0.4
    match: str = "z"  # what the hit rule compares: z (the paper) or delta (z − h)
    # a received vector's norm may be at most this times the receiver's own model scale (federation/guard.py)
    norm_factor: float = 20.0
    baseline: str = ""  # "" or "fedavg"
    evaluate: bool = True
    # where results go (on the machine that runs the ServerApp)
    out: str = "fedit-fed-out"
    store: str = ""  # MKV store file; "" = <out>/mkv.sqlite
    node_timeout: float = 120.0  # seconds to wait for every client to connect
    resume: bool = False  # catch up the clients the run in `out` lists as missing (federation.resume)

    def __post_init__(self):
        if self.mode not in ("private", "paper"):
            raise SettingsError(f"mode must be 'private' or 'paper', got {self.mode!r}.", "use --mode private|paper.")
        if self.mode == "paper" and not self.share_requests:
            raise SettingsError("paper mode re-edits with the other clients' plaintext requests, and no owner opted in.",
                                "add --share-requests (the run asks for the requests; each node must also agree with "
                                "share-requests=true in its own node config), or use --mode private.")
        if self.partition not in ("relation", "cluster", "iid"):
            raise SettingsError(f"partition must be relation, cluster or iid, got {self.partition!r}.",
                                "use --partition relation|cluster|iid.")
        if self.match not in ("z", "delta"):
            raise SettingsError(f"match must be 'z' or 'delta', got {self.match!r}.", "use --match z|delta.")
        if self.baseline not in ("", "fedavg"):
            raise SettingsError(f"unknown baseline {self.baseline!r}.", "use --baseline fedavg or leave it out.")
        if self.clients < 1 or self.slots < 1 or self.n_per_client < 1:
            raise SettingsError(f"clients, slots and n-per-client must be ≥ 1 (got {self.clients}, {self.slots}, "
                                f"{self.n_per_client}).", "pass positive numbers.")
        if self.n_per_client < self.slots:
            raise SettingsError(f"{self.n_per_client} requests per client cannot fill {self.slots} slots.",
                                "use --n-per-client ≥ --slots.")
        if not -1.0 <= self.tau <= 1.0:
            raise SettingsError(f"tau must lie in [-1, 1] (a cosine), got {self.tau}.", "use e.g. --tau 0.4.")
        if not self.norm_factor > 0:
            raise SettingsError(f"norm-factor must be > 0, got {self.norm_factor}.",
                                "use e.g. 20 (the default): received vectors up to 20 × the model's own scale.")
        if not 0 <= self.overlap < self.n_per_client:
            raise SettingsError(f"overlap must lie in 0..n-per-client − 1 = {self.n_per_client - 1}, got {self.overlap}.",
                                "use a smaller --overlap (shared records per client).")
        self._check_method()
        self.hparam_overrides()  # validate the JSON now

    def _check_method(self) -> None:
        from fedit.federation.codebook import check_method

        try:
            check_method(self.method, self.mode, self.baseline)
        except FeditError as e:
            raise SettingsError(e.problem, e.fix) from e

    @property
    def store_path(self) -> Path:
        return Path(self.store) if self.store else Path(self.out) / "mkv.sqlite"


@lru_cache(maxsize=4)
def _all_records(dataset: str, data: str):
    from fedit.data.loaders import load_records

    return tuple(load_records(dataset, path=data or None, skip_invalid=True))


@lru_cache(maxsize=8)
def _partitions(dataset: str, data: str, scheme: str, n: int, seed: int):
    from fedit.federation.partition import partition

    return partition(list(_all_records(dataset, data)), scheme, n, seed=seed)


def client_records(s: FedSettings, partition_id: int, num_partitions: int, data_path: str = ""):
    """The records client ``partition_id`` edits: its own file, or its share of the run's dataset."""
    if data_path:
        recs = list(_all_records(s.dataset, data_path))
    else:
        if not 0 <= partition_id < num_partitions:
            raise SettingsError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}.",
                                "start each SuperNode with --node-config 'partition-id=<i> num-partitions=<N>'.")
        recs = list(_partitions(s.dataset, s.data, s.partition, num_partitions, s.seed)[partition_id])
    if len(recs) < s.n_per_client:
        raise SettingsError(f"client {partition_id} has {len(recs)} records, fewer than n-per-client = {s.n_per_client}.",
                            "lower --n-per-client, use fewer clients, or give a larger dataset with --data.")
    if s.overlap and partition_id > 0 and not data_path:  # the facts client 0 edits first, met here last
        shared = client_records(s.replace(overlap=0), 0, num_partitions)[: s.overlap]
        return recs[: s.n_per_client - s.overlap] + shared
    return recs[: s.n_per_client]

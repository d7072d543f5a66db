"""Settings of a CollabEdit run on Flower, as one typed dataclass (no Flower import).

Flower passes settings as flat key/value pairs (``[tool.flwr.app.config]`` in the app's
pyproject.toml, ``--run-config`` on the command line). The dataclass defaults below are the
source of every default: the app's pyproject and ``fedit collab run`` are checked against them
(``tests/test_collab_deploy.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fedit.collab.client import CollabError
from fedit.collab.config import CollabConfig
from fedit.collab.merge import MERGES
from fedit.federation.settings import RunSettings, SettingsError


@dataclass
class CollabSettings(RunSettings):
    overrides: str = ""  # JSON object of MEMIT hyperparameter overrides
    hparams_file: str = ""
    # the facts: each node's share of one dataset (partition-id), or its own file (data-path)
    dataset: str = "counterfact"
    data: str = ""  # "" = the sample shipped with fedit
    clients: int = 10
    rounds: int = 1
    per_client: int = 50  # facts per client and round
    overlap: float = 0.0
    conflict: float = 0.0
    seed: int = 0
    # the server's merge
    merge: str = "collabedit"  # comma-separated, or "all"
    conflict_policy: str = "reject"
    priority: str = ""  # comma-separated client ids, for conflict-policy "priority"
    ties_density: float = 0.2
    ties_scale: float = 0.4
    c1: bool = True
    c1_weight: float = 1.0
    residual_tol: float = 1e-6
    form: str = "base"  # CollabEdit's form: base (one exchange per round) or layerwise (one per layer)
    secagg: bool = False
    secagg_shares: float = 1.0  # fraction of the other clients each client shares its secrets with
    secagg_threshold: float = 0.67  # fraction of shares that reconstruct a dropped client's secret
    # the digest salt, hex: shared by the clients, better set per SuperNode (--node-config salt=…)
    salt: str = ""
    # where the report goes (on the machine that runs the ServerApp)
    out: str = "fedit-collab-out"
    node_timeout: float = 120.0

    def __post_init__(self):
        self.collab_config()  # validates merges, policy, TIES, C₁
        if self.clients < 1 or self.rounds < 1 or self.per_client < 1:
            raise SettingsError(f"clients, rounds and per-client must be ≥ 1 (got {self.clients}, {self.rounds}, "
                                f"{self.per_client}).", "pass positive numbers.")
        self.hparam_overrides()

    @property
    def merges(self) -> tuple[str, ...]:
        return MERGES if self.merge.strip() == "all" else tuple(m.strip() for m in self.merge.split(",") if m.strip())

    def collab_config(self, salt: bytes = b"") -> CollabConfig:
        """The server's part (and the clients' salt), as the in-process driver takes it."""
        return CollabConfig(merges=self.merges, conflict_policy=self.conflict_policy,
                            priority=[p.strip() for p in self.priority.split(",")] if self.priority else None,
                            ties_density=self.ties_density, ties_scale=self.ties_scale, c1=self.c1,
                            c1_weight=self.c1_weight, residual_tol=self.residual_tol, reference=False,
                            layerwise_reference=False, dataset="zsre" if self.dataset == "zsre" else "counterfact",
                            form=self.form, salt=salt)

    def salt_bytes(self, node_config: dict[str, Any]) -> bytes:
        """The digest salt: the node's own (``salt`` in its node config) or the run's."""
        text = str(node_config.get("salt", "") or self.salt)
        if not text:
            raise CollabError("no salt for the fact digests.",
                              "give every SuperNode the same secret: --node-config \"salt='<hex>'\" "
                              "(e.g. from `python -c 'import os; print(os.urandom(32).hex())'`).")
        try:
            return bytes.fromhex(text)
        except ValueError as e:
            raise CollabError(f"the salt {text[:8]}… is not hexadecimal.", "give the salt as hex digits.") from e


@lru_cache(maxsize=4)
def _plan(dataset: str, data: str, clients: int, rounds: int, per_client: int, overlap: float, conflict: float,
          seed: int):
    from fedit.collab.plan import records_needed, split_plan
    from fedit.data.loaders import load_records

    records = load_records(dataset, data or None, records_needed(clients, rounds, per_client, overlap, conflict))
    return split_plan(records, clients, rounds, per_client, overlap, conflict, seed)


def client_facts(s: CollabSettings, partition_id: int, data_path: str = "") -> tuple[str, list[list]]:
    """(client id, its records per round): its own file cut into rounds, or its share of the run's plan."""
    if data_path:
        from fedit.data.loaders import load_records

        recs = load_records(s.dataset, data_path, s.rounds * s.per_client)
        if len(recs) < s.rounds * s.per_client:
            raise SettingsError(f"{data_path} holds {len(recs)} facts, fewer than rounds × per-client = "
                                f"{s.rounds * s.per_client}.", "lower per-client or rounds, or add facts.")
        return f"c{partition_id}", [recs[r * s.per_client:(r + 1) * s.per_client] for r in range(s.rounds)]
    if not 0 <= partition_id < s.clients:
        raise SettingsError(f"partition-id {partition_id} is outside 0..{s.clients - 1}.",
                            "start each SuperNode with --node-config 'partition-id=<i>', i in 0..clients-1.")
    plan = _plan(s.dataset, s.data, s.clients, s.rounds, s.per_client, s.overlap, s.conflict, s.seed)
    cid = list(plan)[partition_id]
    return cid, plan[cid]

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
from fedit.collab.privacy import DEFAULT_CLIP_KEY, DEFAULT_CLIP_RESID, DPConfig
from fedit.collab.secure import MAX_CLIENTS
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
    # SecAgg+ (Flower engine, CollabEdit's sums): on unless switched off
    secagg: bool = True
    secagg_shares: float = 1.0  # fraction of the clients each client shares its mask secrets with
    secagg_threshold: float = 0.67  # fraction of those shares that reconstruct a dropped client's masks
    # differential privacy of CollabEdit's sums (collab/privacy.py): off while dp-noise is 0
    dp_noise: float = 0.0  # noise multiplier z
    dp_clip_key: float = DEFAULT_CLIP_KEY  # C_k: per-fact key norm bound, every edited layer
    dp_clip_resid: float = DEFAULT_CLIP_RESID  # C_r: per-fact residual norm bound
    dp_delta: float = 1e-5
    # no salt here: the run config is visible to the server (the clients agree one, or each
    # SuperNode is given the same with --node-config salt=…); a non-empty value is refused
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
        if self.salt:
            raise SettingsError("a digest salt in the run config would be visible to the server.",
                                "drop salt from the run config: the clients agree one, or give each SuperNode "
                                "the same secret with --node-config \"salt='<hex>'\".")
        if self.secagg and "collabedit" in self.merges and not 2 <= self.clients <= MAX_CLIENTS:
            raise SettingsError(f"SecAgg+ needs 2 to {MAX_CLIENTS} clients, got {self.clients}.",
                                "run with more clients, or switch SecAgg+ off (--no-secagg / secagg=false).")
        self.dp()  # validates

    def dp(self) -> DPConfig | None:
        """The DP mechanism of the run, or None (dp-noise 0). Each client's noise share assumes the
        fewest clients whose sum can be released: SecAgg+'s reconstruction threshold, else all."""
        if not self.dp_noise:
            return None
        t = threshold_count(self.clients, self.secagg_shares, self.secagg_threshold) if self.secagg else self.clients
        return DPConfig(self.dp_noise, self.dp_clip_key, self.dp_clip_resid, self.dp_delta, t)

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
                            form=self.form, salt=salt, dp=self.dp())

    def node_salt(self, node_config: dict[str, Any]) -> bytes | None:
        """The digest salt this node was given in its own node config (hex), or None."""
        text = str(node_config.get("salt", "") or "")
        if not text:
            return None
        try:
            return bytes.fromhex(text)
        except ValueError as e:
            raise CollabError(f"the node's salt {text[:4]}… is not hexadecimal.", "give the salt as hex digits.") from e


def threshold_count(clients: int, shares: float, threshold: float) -> int:
    """How many clients SecAgg+ needs to release a sum: Flower's reconstruction threshold for
    ``clients`` sampled nodes (``SecAggPlusWorkflow.setup_stage``), as a count."""
    n_shares = round(shares * clients)
    if n_shares < clients and n_shares % 2 == 0:
        n_shares += 1
    if n_shares <= 2:
        n_shares = clients
    return max(round(threshold * n_shares), 2)


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

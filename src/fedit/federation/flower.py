"""What every fedit Flower app shares: records ↔ tensors, asking nodes, waiting for nodes, and
Flower's environment defaults.

The protocols (FedEdit in ``federation.app``, CollabEdit in ``collab.app``) build on these; this
module imports Flower, so nothing engine-neutral may import it. ``configure_environment`` is
called by whoever starts Flower (the CLI, a test), never at import time.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import OrderedDict
from typing import Any, Callable

import torch

from fedit import progress
from fedit.extras import require

require("flwr", "fed")  # every Flower app of fedit imports this module first
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

log = logging.getLogger(__name__)

# Flower's defaults that fedit changes: no telemetry, no update check (machines are often
# offline), and Ray's log lines kept apart per actor.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0"}


def configure_environment() -> None:
    """Set Flower's environment defaults for this process and its children (only where unset)."""
    for k, v in FLOWER_ENV.items():
        os.environ.setdefault(k, v)


class RunFailed(RuntimeError):
    """A federated run that failed in a client or in the server."""


# --- records <-> tensors ----------------------------------------------------------------
def to_arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """Named tensors as one ArrayRecord (CPU, contiguous; an empty record for none)."""
    if not tensors:
        return ArrayRecord()
    return ArrayRecord(OrderedDict((k, v.detach().cpu().contiguous()) for k, v in tensors.items()))


def to_tensors(record: ArrayRecord | None) -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord by name ({} for none or empty)."""
    return dict(record.to_torch_state_dict()) if record is not None and len(record) else {}


def layers_to_arrays(delta: dict[int, torch.Tensor]) -> ArrayRecord:
    """Per-layer tensors (keys: layer numbers) as float64 arrays named by layer."""
    return to_arrays({str(l): d.double() for l, d in delta.items()})


def arrays_to_layers(record: ArrayRecord | None) -> dict[int, torch.Tensor]:
    return {int(k): v.double() for k, v in to_tensors(record).items()}


def config(key: str = "config", **values: Any) -> RecordDict:
    """A RecordDict holding one ConfigRecord ``key`` of ``values``."""
    return RecordDict({key: ConfigRecord(values)})


# --- the server's side of an exchange -------------------------------------------------------
def short_reason(reason: str) -> str:
    """The client's own error message out of an engine's wrapped traceback."""
    found = re.findall(r"Message: (.+?)(?:\\n|\n|'>|$)", reason)
    return found[-1].strip() if found else reason.strip().splitlines()[-1][:500]


def replies(grid, messages: list[Message], desc: str, timeout: float | None = None) -> list[Message]:
    """``grid.send_and_receive(messages, timeout=timeout)`` with a progress task ``desc`` that moves
    as each reply arrives (pulled as often as the grid's own ``send_and_receive`` does)."""
    waiting = set(grid.push_messages(messages))
    got: list[Message] = []
    end = None if timeout is None else time.time() + timeout
    with progress.task(desc, total=len(waiting), unit="client") as bar:
        while waiting and (end is None or time.time() < end):
            new = list(grid.pull_messages(waiting))
            got += new
            waiting -= {r.metadata.reply_to_message_id for r in new}
            bar.update(len(new))
            if waiting:
                time.sleep(getattr(grid, "pull_interval", 3.0))  # the in-memory grid's, else the HTTP grid's
    return got


# A reply carrying one of these errors means the node (or the ClientApp process it ran) is gone —
# killed, crashed, unreachable past its heartbeat — not that the app refused the work.
GONE = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE,
        ErrorCode.CLIENT_APP_CRASHED}


def ask_present(grid, nodes: list[int], message_type: str, contents: dict[int, RecordDict], group: str = "",
                fail: Callable[[str], Exception] = RunFailed) -> tuple[dict[int, RecordDict], dict[int, str]]:
    """Send ``contents[n]`` to every node ``n``; (replies' contents by node, {absent node: why}).

    A node that is gone (no reply, or Flower's node-unavailable / crashed error: the SuperLink
    says so once the node missed its heartbeats) is absent, not a failure. A ClientApp that
    raised fails the run: ``fail(why)``, ``why`` naming the step and the client's message."""
    msgs = [Message(contents[n], dst_node_id=n, message_type=message_type, group_id=group) for n in nodes]
    answers = replies(grid, msgs, f"{message_type.removeprefix('query.')}: clients replied")
    # by the message each answers: the SuperLink, not the node, sends a node-unavailable reply
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs if m.metadata.message_id}
    by_node = {sent.get(r.metadata.reply_to_message_id, r.metadata.src_node_id): r for r in answers}
    absent = {n: "no reply" for n in nodes if n not in by_node}
    absent.update({n: short_reason(r.error.reason) for n, r in by_node.items() if r.has_error() and r.error.code in GONE})
    errors = sorted({short_reason(r.error.reason) for n, r in by_node.items() if r.has_error() and n not in absent})
    if errors:
        raise fail(f"clients failed at {message_type.removeprefix('query.')}: {'; '.join(errors)}")
    return {n: by_node[n].content for n in nodes if n not in absent}, absent


def ask(grid, nodes: list[int], message_type: str, contents: dict[int, RecordDict], group: str = "",
        fail: Callable[[str], Exception] = RunFailed) -> dict[int, RecordDict]:
    """Send ``contents[n]`` to every node ``n``; their replies' contents by node. Progress: a task
    "<step>: clients replied" (the step is the message type without ``query.``).

    Raises ``fail(why)`` when a client failed or did not reply (``why`` names the step)."""
    got, absent = ask_present(grid, nodes, message_type, contents, group, fail)
    if absent:
        why = "; ".join(sorted(set(absent.values())))
        raise fail(f"clients failed at {message_type.removeprefix('query.')}: {why} (no reply from nodes {sorted(absent)})")
    return got


class Roster:
    """The client nodes still answering, and who went missing where: a node that is gone
    mid-run is dropped from the rest of it (``ask_present``) and recorded, the others go on."""

    def __init__(self, nodes: list[int], ids: dict[int, str], fail: Callable[[str], Exception] = RunFailed):
        self.nodes, self.ids, self.fail = list(nodes), ids, fail
        self.missing: list[dict[str, Any]] = []  # {"client", "step", where..., "why"}

    def ask(self, grid, message_type: str, content: Callable[[int], RecordDict], group: str = "",
            **where: Any) -> dict[int, RecordDict]:
        """Ask every node still present for ``content(node)``; the replies of those that answered."""
        replies, absent = ask_present(grid, self.nodes, message_type, {n: content(n) for n in self.nodes}, group,
                                      self.fail)
        for n, why in absent.items():
            entry = {"client": self.ids.get(n, str(n)), "step": message_type.removeprefix("query."), **where, "why": why}
            log.warning("client %s is missing at %s (%s); the run goes on without it", entry["client"],
                        {**where, "step": entry["step"]}, why)
            self.missing.append(entry)
        self.nodes = [n for n in self.nodes if n not in absent]
        if not self.nodes:
            raise self.fail(f"every client is missing at {message_type.removeprefix('query.')} {where}: "
                            + "; ".join(sorted(set(absent.values()))))
        return replies


def wait_for_nodes(grid, n: int, timeout: float, fail: Callable[[str], Exception] = RunFailed) -> list[int]:
    """The first ``n`` connected nodes; ``fail(message)`` is raised when fewer came in ``timeout`` s."""
    t0 = time.time()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes[:n]
        if time.time() - t0 > timeout:
            raise fail(f"only {len(nodes)} of {n} client nodes connected within {timeout:.0f} s; "
                       "start one node per client.")
        time.sleep(0.5)

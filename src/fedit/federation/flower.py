"""What every fedit Flower app shares: records ↔ tensors, asking nodes, waiting for nodes, and
Flower's environment defaults.

The protocols (FedEdit in ``federation.app``, CollabEdit in ``collab.app``) build on these; this
module imports Flower, so nothing engine-neutral may import it. ``configure_environment`` is
called by whoever starts Flower (the CLI, a test), never at import time.
"""

from __future__ import annotations

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


def ask(grid, nodes: list[int], message_type: str, contents: dict[int, RecordDict], group: str = "",
        fail: Callable[[str], Exception] = RunFailed) -> dict[int, RecordDict]:
    """Send ``contents[n]`` to every node ``n``; their replies' contents by node. Progress: a task
    "<step>: clients replied" (the step is the message type without ``query.``).

    Raises ``fail(why)`` when a client failed or did not reply (``why`` names the step)."""
    msgs = [Message(contents[n], dst_node_id=n, message_type=message_type, group_id=group) for n in nodes]
    step = message_type.removeprefix("query.")
    by_node = {r.metadata.src_node_id: r for r in replies(grid, msgs, f"{step}: clients replied")}
    errors = sorted({short_reason(r.error.reason) for r in by_node.values() if r.has_error()})
    missing = [n for n in nodes if n not in by_node]
    if errors or missing:
        why = "; ".join(errors) + (f" (no reply from nodes {missing})" if missing else "")
        raise fail(f"clients failed at {message_type.removeprefix('query.')}: {why}")
    return {n: by_node[n].content for n in nodes}


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

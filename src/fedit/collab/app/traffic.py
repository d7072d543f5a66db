"""What a CollabEdit run sends: messages, bytes and seconds per exchange, counted on the server's Grid.

``CountingGrid`` wraps the Grid the ServerApp is given; every message the round loop and the
SecAgg+ workflow send through it is counted, down (server → client) and up (replies). Bytes are
each message's payload: the serialised arrays (Flower's ``ArrayRecord.count_bytes``), and for
config and metric records the keys plus 8 bytes per number, 1 per bool, the length of every
string and bytes value (Flower's own ``count_bytes`` of a ConfigRecord fails on an empty string
or list); not the gRPC and protobuf framing around it. An *exchange* is a run of consecutive messages with
the same label:

    digest | prepare | stats | delta | layer | secagg | evaluate      (the message type)

with the round it belongs to and, in the layer-sequential form, the edited layer's step. SecAgg+
stages (``train`` messages, four send-and-receive stages per secure sum) are labelled ``secagg``
and belong to the query before them (``prepare`` in the base form, ``layer`` step k in the
layer-sequential form). With several merge methods the exchanges of each method follow one
another in the order the methods ran.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from flwr.app import ArrayRecord, Message


def _value_bytes(v: Any) -> int:
    if isinstance(v, list):
        return sum(_value_bytes(x) for x in v)
    if isinstance(v, bool):
        return 1
    if isinstance(v, (int, float)):
        return 8
    if isinstance(v, str):
        return len(v.encode())
    return len(v) if isinstance(v, bytes) else 0


def _bytes(msgs: Iterable[Message]) -> int:
    """Payload bytes of ``msgs`` (messages without content, e.g. errors, count 0)."""
    total = 0
    for m in msgs:
        for rec in (m.content.values() if m.has_content() else []):
            total += rec.count_bytes() if isinstance(rec, ArrayRecord) else sum(
                len(k) + _value_bytes(v) for k, v in rec.items())
    return total


class CountingGrid:
    """A Grid (``flwr.serverapp.Grid``) that counts what passes through it; everything else is the
    wrapped grid's."""

    def __init__(self, grid):
        self._grid = grid
        self.exchanges: list[dict[str, Any]] = []
        self._last: tuple[int | None, int | None] = (None, None)  # (round, step) of the last query
        self._open: tuple[dict[str, Any], float, float] | None = None  # pushed exchange: (entry, start, its seconds then)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def _label(self, msg: Message) -> tuple[str, int | None, int | None]:
        kind = msg.metadata.message_type
        if kind == "train":
            return ("secagg", *self._last)
        cfg = msg.content.config_records.get("collab") if msg.has_content() else None
        rnd = step = None
        if cfg is not None:
            rnd = int(cfg["round"] if "round" in cfg else cfg.get("upto", -1)) + 1
            step = int(cfg["step"]) if "step" in cfg else None
        self._last = (rnd, step)
        return kind.removeprefix("query."), rnd, step

    def _entry(self, msg: Message) -> dict[str, Any]:
        """The exchange ``msg`` belongs to: the last one if the label is the same, else a new one."""
        kind, rnd, step = self._label(msg)
        last = self.exchanges[-1] if self.exchanges else None
        if last is None or (last["exchange"], last["round"], last["step"]) != (kind, rnd, step):
            last = {"exchange": kind, "round": rnd, "step": step, "messages_down": 0, "messages_up": 0,
                    "bytes_down": 0, "bytes_up": 0, "seconds": 0.0}
            self.exchanges.append(last)
        return last

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        msgs = list(messages)
        t0 = time.perf_counter()
        replies = list(self._grid.send_and_receive(msgs, timeout=timeout))
        if msgs:
            e = self._entry(msgs[0])
            e["messages_down"] += len(msgs)
            e["messages_up"] += len(replies)
            e["bytes_down"] += _bytes(msgs)
            e["bytes_up"] += _bytes(replies)
            e["seconds"] = round(e["seconds"] + time.perf_counter() - t0, 3)
        return replies

    # push, then pull until every reply is in (``federation.flower.replies``, which shows progress)
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        msgs = list(messages)
        ids = list(self._grid.push_messages(msgs))
        if msgs:
            e = self._entry(msgs[0])
            e["messages_down"] += len(msgs)
            e["bytes_down"] += _bytes(msgs)
            self._open = (e, time.perf_counter(), e["seconds"])
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        got = list(self._grid.pull_messages(message_ids))
        if self._open is not None:
            e, t0, before = self._open
            e["messages_up"] += len(got)
            e["bytes_up"] += _bytes(got)
            e["seconds"] = round(before + time.perf_counter() - t0, 3)
        return got

    def report(self) -> dict[str, Any]:
        """{"exchanges": [...], "rounds": {round: totals}}: each exchange as counted, and per round the
        sums (``exchanges`` there counts query exchanges, each SecAgg+ sum counted once)."""
        rounds: dict[str, dict[str, Any]] = {}
        for e in self.exchanges:
            r = rounds.setdefault(str(e["round"]), {"exchanges": 0, "messages": 0, "bytes_down": 0, "bytes_up": 0,
                                                    "seconds": 0.0})
            r["exchanges"] += 1
            r["messages"] += e["messages_down"] + e["messages_up"]
            r["bytes_down"] += e["bytes_down"]
            r["bytes_up"] += e["bytes_up"]
            r["seconds"] = round(r["seconds"] + e["seconds"], 3)
        return {"exchanges": self.exchanges, "rounds": rounds}

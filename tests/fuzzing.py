"""Hypothesis strategies that mutate valid files into the bad input a parser must survive.

Every strategy starts from a valid file (or parsed value) and damages it the way a careless
user, a broken disk or an attacker would: bit flips, truncation, inserted or overwritten bytes,
deleted fields, swapped types, huge numbers, NaN/Infinity, deep nesting, non-UTF-8 text. A
parser fed these must give a valid object or its documented error (tests/test_fuzz.py).

``FEDIT_FUZZ_EXAMPLES`` (default 25) sets the examples per target; CI keeps the default and
derandomises, so a run is reproducible. ``FEDIT_FUZZ_EXAMPLES=2000`` fuzzes for longer.
"""

from __future__ import annotations

import copy
import json
import os
import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("FEDIT_FUZZ_EXAMPLES", "25"))
# At the default, derandomized: the same examples on every run (CI is reproducible); longer runs
# draw new examples each time. No example database is kept.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 25, database=None,
                suppress_health_check=list(HealthCheck))

DEEP = "\x00deep\x00"  # stands for a deeply nested value in JSON text (json.dumps cannot write one)
DEEP_TEXT = "[" * 100_000 + "]" * 100_000
HUGE = "\x00huge\x00"  # stands for an integer of 5000 digits (over Python's 4300-digit limit)

INTERESTING_BYTES = [b"\x00", b"\xff", b"\xff\xfe", b"\xc3\x28", b"\x80", b'"', b"{", b"}", b"[", b"]", b",",
                     b"NaN", b"-Infinity", b"1e999", b"\\u0000", b"\\ud800", b"\x7f\xff\xff\xff",
                     struct.pack("<Q", 2 ** 63 - 1), struct.pack("<Q", 2 ** 64 - 1), struct.pack("<f", float("nan")),
                     struct.pack("<f", float("inf")), struct.pack("<d", float("nan")), b"\x00" * 8]

LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
    st.sampled_from([0, -1, 1, 2 ** 31, 2 ** 63, -2 ** 63, 2 ** 64, 10 ** 30, 1e308, -1e308, 1e-320,
                     float("nan"), float("inf"), float("-inf"), -0.0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", " ", "{}", "{} {}", "{", "}", "{0}", "{}{}", "\ud800", "\x00", "a" * 3000, DEEP, HUGE,
                     "<|endoftext|>", "float32", "bfloat16", "auto", "F32", "I64"]),
)
VALUES = st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def _swap(v):
    """The same value under another JSON type."""
    return [[v], {"str": v}, str(v) if not isinstance(v, str) else 7, None, json.dumps(v, default=str)]


def _mutate_value(draw, v):
    """``v`` with one place in it changed: replaced, deleted from its container, or retyped."""
    if isinstance(v, (dict, list)) and v and draw(st.integers(0, 3)) > 0:  # descend (3 of 4 times)
        keys = list(v) if isinstance(v, dict) else list(range(len(v)))
        k = draw(st.sampled_from(keys))
        if draw(st.integers(0, 4)) == 0:  # delete that field / item
            if isinstance(v, dict):
                return {kk: vv for kk, vv in v.items() if kk != k}
            return v[:k] + v[k + 1:]
        out = copy.copy(v)
        out[k] = _mutate_value(draw, v[k])
        return out
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.sampled_from(_swap(v)))
    if choice == 1 and isinstance(v, dict):  # an extra or misspelt key
        return {**v, draw(st.sampled_from(["extra", "prompt ", "PROMPT", "case_id", "__proto__"])): draw(VALUES)}
    return draw(VALUES)


@st.composite
def mutated_value(draw, base):
    """A JSON-like value: ``base`` changed in one to three places."""
    v = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        v = _mutate_value(draw, v)
    return v


def to_json(value) -> str:
    """JSON text of a mutated value (NaN/Infinity written as Python does; ``DEEP`` as deep nesting,
    ``HUGE`` as a 5000-digit number)."""
    text = json.dumps(value, allow_nan=True)
    return text.replace(json.dumps(DEEP), DEEP_TEXT).replace(json.dumps(HUGE), "9" * 5000)


@st.composite
def mutated_bytes(draw, base: bytes, max_ops: int = 4):
    """``base`` with one to ``max_ops`` byte-level mutations."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, max_ops))):
        n = len(data)
        op = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "overwrite", "delete"]))
        i = draw(st.integers(0, max(n - 1, 0)))
        if op == "flip" and n:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            data = data[:i]
        elif op == "insert":
            data[i:i] = draw(st.one_of(st.sampled_from(INTERESTING_BYTES), st.binary(min_size=1, max_size=16)))
        elif op == "overwrite":
            chunk = draw(st.one_of(st.sampled_from(INTERESTING_BYTES), st.binary(min_size=1, max_size=8)))
            data[i:i + len(chunk)] = chunk
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 64))]
    return bytes(data)


def mutated_json_bytes(base) -> st.SearchStrategy[bytes]:
    """UTF-8 JSON text of a structurally mutated ``base``, sometimes damaged byte-wise as well."""
    text = mutated_value(base).map(lambda v: to_json(v).encode("utf-8", "surrogatepass"))
    return st.one_of(text, text.flatmap(lambda b: mutated_bytes(b, 2)),
                     mutated_bytes(json.dumps(base).encode()))


# --- safetensors ---------------------------------------------------------------------------
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "C64", "X"]


def split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join_safetensors(header, data: bytes) -> bytes:
    h = to_json(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(h)) + h + data


@st.composite
def mutated_safetensors(draw, base: bytes):
    """A safetensors file with its header (dtypes, shapes, offsets, metadata JSON strings) or its
    tensor bytes (NaN, Inf, huge values) changed, or damaged byte-wise."""
    header, data = split_safetensors(base)
    kind = draw(st.sampled_from(["header", "meta", "data", "bytes"]))
    if kind == "bytes":
        return draw(mutated_bytes(base))
    header = copy.deepcopy(header)
    if kind == "data":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, max(len(data) - 4, 0))) & ~3
            data[i:i + 4] = draw(st.sampled_from([struct.pack("<f", x) for x in
                                                  (float("nan"), float("inf"), -float("inf"), 3e38, 1e30)]))
        return join_safetensors(header, bytes(data))
    names = [k for k in header if k != "__metadata__"]
    meta = header.get("__metadata__", {})
    if kind == "meta" and meta:
        key = draw(st.sampled_from(sorted(meta)))
        try:
            inner = json.loads(meta[key])
            meta[key] = to_json(draw(mutated_value(inner)))
        except ValueError:  # a plain string (format, method, kind)
            meta[key] = draw(st.one_of(st.text(max_size=20), st.sampled_from(["", "fedit-deltas/1",
                                                                               "fedit-memory/1", "fedit-serac/1"])))
        if draw(st.booleans()):
            del meta[draw(st.sampled_from(sorted(meta)))]
        return join_safetensors(header, data)
    name = draw(st.sampled_from(names))
    entry = header[name]
    what = draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "drop", "value"]))
    if what == "dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPES))
    elif what == "shape":
        entry["shape"] = draw(st.one_of(st.lists(st.integers(0, 70), max_size=3),
                                        st.just(list(reversed(entry["shape"]))), st.just([2 ** 62, 2 ** 62])))
    elif what == "offsets":
        entry["data_offsets"] = [draw(st.integers(0, len(data) + 8)) for _ in range(2)]
    elif what == "rename":
        new = draw(st.sampled_from([name.replace("delta/", "orig/"), name + "x", "delta/", "orig/x", "mem/zz",
                                    name.replace(".weight", ".bias")]))
        header[new] = header.pop(name)
    elif what == "drop":
        del header[name]
    else:
        header[name] = draw(mutated_value(entry))
    return join_safetensors(header, data)

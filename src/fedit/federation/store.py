"""A persistent store of mediator knowledge vectors (MKVs) in one SQLite file.

Each client of a FedEdit federation uploads, per time slot, the MKVs (target vectors z) of
its edits, optionally with a payload of named tensors that the closed-form update needs
(per-layer keys and residuals, e.g. ``"keys.3"``, ``"resid.3"``) and JSON metadata (fact id,
relation, the plaintext request when its owner opted in). Other clients retrieve the MKVs
that match their own (:meth:`MKVStore.retrieve_fededit`).

Layout (schema version 1)::

    schema_version(version)                       one row
    settings(key, value)                          'dim' once fixed
    clients(id, info JSON, registered)            registered epoch seconds
    mkvs(id, owner -> clients.id, slot, dim, created, vector BLOB, payload BLOB, meta JSON)

``vector`` is little-endian float32 bytes; ``payload`` is a safetensors blob (NULL when empty).
Every write is one transaction: a refused or failed call leaves the file as it was. The store
is engine-neutral (no Flower here); one :class:`MKVStore` object belongs to one thread.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedit.errors import StoreError
from fedit.federation.retrieval import DEFAULT_TAU, cosine_matrix, fededit_hits, topk

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"
_F32 = np.dtype("<f4")

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE clients (
    id TEXT PRIMARY KEY,
    info TEXT NOT NULL,
    registered REAL NOT NULL
);
CREATE TABLE mkvs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL REFERENCES clients(id),
    slot INTEGER NOT NULL CHECK (slot >= 0),
    dim INTEGER NOT NULL CHECK (dim > 0),
    created REAL NOT NULL,
    vector BLOB NOT NULL,
    payload BLOB,
    meta TEXT NOT NULL
);
CREATE INDEX mkvs_by_slot ON mkvs (slot, owner);
"""


@dataclass
class MKV:
    """One stored mediator knowledge vector. ``vector``: float32 [dim]; ``created``: epoch s."""

    id: int
    owner: str
    slot: int
    dim: int
    created: float
    vector: torch.Tensor
    payload: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


@dataclass
class Hit:
    """Another client's MKV that passed FedEdit's rule: ``count`` own MKVs have cosine
    similarity above tau with it; ``max_sim`` is the largest of all n similarities."""

    mkv: MKV
    count: int
    max_sim: float


@dataclass
class Match:
    """An MKV found by :meth:`MKVStore.retrieve_topk` and its cosine similarity to the query."""

    mkv: MKV
    score: float


class MKVStore:
    """MKVs of all clients in one SQLite file (or ``":memory:"``).

    ``dim`` fixes the vector size when the store is created; left out, the first added
    vectors fix it. Reopening an existing store with a different explicit ``dim`` is refused.
    The folder of ``path`` is created when missing; an existing file that is not an fedit
    store is refused and never written to.

    ``check`` (optional) is asked about every record read (``get``, ``for_slot``, the
    retrievals): it returns why the record must not be used (e.g. a vector over a model's norm
    bound, ``guard.Guard.check``) or None; a record it refuses is a :class:`StoreError`
    naming the record.
    """

    def __init__(self, path: str | Path, dim: int | None = None, check: Callable[[MKV], str | None] | None = None):
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise StoreError(f"dim must be a positive whole number or None, got {dim!r}.",
                             "pass the hidden size of the edited layer (e.g. dim=640), or leave it out.")
        self.path = str(path)
        self.check = check
        self._conn: sqlite3.Connection | None = None
        memory = self.path == ":memory:"
        if not memory:
            p = Path(self.path).expanduser()
            self.path = str(p)
            _check_file(p)
            p.parent.mkdir(parents=True, exist_ok=True)
            _create_private(p)
        try:
            conn = sqlite3.connect(self.path, isolation_level=None,  # explicit transactions below
                                   timeout=LOCK_TIMEOUT)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the MKV store {self.path}: {e}.",
                             "check the path and its permissions, or point to another path.") from e
        try:
            self._dim = self._open(conn, dim)
        except (sqlite3.DatabaseError, UnicodeDecodeError) as e:
            conn.close()
            raise StoreError(f"{self.path} is not a readable SQLite database ({str(e)[:120]}).",
                             "move the file aside, or point the store to another path; fedit does not "
                             "overwrite it.") from e
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    # --- opening ----------------------------------------------------------------------
    def _open(self, conn: sqlite3.Connection, dim: int | None) -> int | None:
        # Read before writing anything, so that a foreign or damaged file is left untouched.
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("BEGIN IMMEDIATE")
            try:
                # one statement at a time: executescript() would commit on its own
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(stmt)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                if dim is not None:
                    conn.execute("INSERT INTO settings (key, value) VALUES ('dim', ?)", (str(dim),))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            log.info("created MKV store %s (dim %s)", self.path, dim)
            return dim
        if "schema_version" not in tables or "mkvs" not in tables:
            raise StoreError(f"{self.path} is an SQLite database but not an fedit MKV store "
                             f"(tables: {', '.join(sorted(tables))}).",
                             "point the store to another path; fedit does not overwrite it.")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        version = row[0] if row else None
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has MKV store schema version {version}; this fedit reads "
                             f"version {SCHEMA_VERSION}.",
                             "open it with the fedit version that wrote it, or point to another path.")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        row = conn.execute("SELECT value FROM settings WHERE key='dim'").fetchone()
        stored = _stored_dim(row[0], self.path) if row else None
        if stored is not None and dim is not None and dim != stored:
            raise StoreError(f"{self.path} holds vectors of dimension {stored}, but dim={dim} was asked.",
                             f"open it with dim={stored} or without dim, or use another path for "
                             f"{dim}-dimensional vectors.")
        if stored is None and dim is not None:
            conn.execute("INSERT INTO settings (key, value) VALUES ('dim', ?)", (str(dim),))
            return dim
        return stored

    @property
    def dim(self) -> int | None:
        """Vector dimension of this store; None until fixed."""
        return self._dim

    def close(self) -> None:
        """Close the file. Further calls raise :class:`StoreError`; closing twice is fine."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "MKVStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MKVStore({self.path!r}, dim={self._dim})"

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the MKV store {self.path} is closed.", "open a new MKVStore on the path.")
        return self._conn

    # --- clients ----------------------------------------------------------------------
    def register_client(self, client_id: str, info: dict | None = None) -> None:
        """Register ``client_id`` (idempotent). ``info`` (JSON-serialisable) replaces the
        stored info when given; left out, an existing client's info is kept."""
        _check_client_id(client_id)
        if info is not None and not isinstance(info, dict):
            raise StoreError(f"client info must be a dict, got {type(info).__name__}.",
                             "pass e.g. info={'org': 'hospital-a'} or leave it out.")
        text = _to_json(info or {}, f"info of client {client_id!r}")
        with self._transaction() as db:
            if info is None:
                db.execute("INSERT OR IGNORE INTO clients (id, info, registered) VALUES (?, ?, ?)",
                           (client_id, text, time.time()))
            else:
                db.execute("INSERT INTO clients (id, info, registered) VALUES (?, ?, ?) "
                           "ON CONFLICT(id) DO UPDATE SET info=excluded.info",
                           (client_id, text, time.time()))

    def clients(self) -> list[str]:
        """Registered client ids, in registration order."""
        ids = [r[0] for r in self._read("SELECT id FROM clients ORDER BY rowid")]
        bad = [i for i in ids if not isinstance(i, str)]
        if bad:
            raise _damaged(f"client {bad[0]!r}", "a client id that is not text")
        return ids

    def client_info(self, client_id: str) -> dict:
        """The info dict a client registered with."""
        rows = self._read("SELECT info FROM clients WHERE id=?", (client_id,))
        if not rows:
            raise self._unknown_client(client_id)
        try:
            info = json.loads(rows[0][0])
        except (TypeError, ValueError, RecursionError) as e:
            raise _damaged(f"client {client_id!r}", f"its info is not JSON ({type(e).__name__})") from None
        if not isinstance(info, dict):
            raise _damaged(f"client {client_id!r}", f"its info is a {type(info).__name__}, not an object")
        return info

    # --- writing ----------------------------------------------------------------------
    def add(self, client_id: str, slot: int, vectors: torch.Tensor,
            payloads: Sequence[dict[str, torch.Tensor]] | None = None,
            meta: Sequence[dict] | None = None) -> list[int]:
        """Store the MKVs ``vectors`` [n, dim] of ``client_id`` for time ``slot``; return their ids.

        ``payloads[i]`` (named tensors, any dtype) and ``meta[i]`` (JSON-serialisable dict)
        go with ``vectors[i]``. All or nothing: every input is checked first and the rows are
        written in one transaction, so a refusal leaves the store as it was.
        """
        _check_client_id(client_id)
        if isinstance(slot, bool) or not isinstance(slot, int) or slot < 0:
            raise StoreError(f"slot must be a whole number >= 0, got {slot!r}.",
                             "number time slots 0, 1, 2, ...")
        self._check_known(client_id)
        if not isinstance(vectors, torch.Tensor):
            raise StoreError(f"vectors must be a torch.Tensor [n, dim], got {type(vectors).__name__}.",
                             "stack the MKVs into one tensor, e.g. torch.stack(zs).")
        if vectors.dim() != 2:
            raise StoreError(f"vectors must be 2-D [n, dim], got shape {tuple(vectors.shape)}.",
                             "stack the MKVs into one [n, dim] tensor (use v[None] for a single vector).")
        if not (vectors.is_floating_point() or vectors.dtype in _INT_DTYPES):
            raise StoreError(f"vectors must hold real numbers, got dtype {vectors.dtype}.",
                             "pass a float tensor.")
        n, d = vectors.shape
        if d < 1:
            raise StoreError("vectors have dimension 0.", "pass MKVs of the edited layer's hidden size.")
        if self._dim is not None and d != self._dim:
            raise StoreError(f"vectors have dimension {d}, but this store holds dimension {self._dim} "
                             f"({self.path}).",
                             f"pass [n, {self._dim}] vectors, or use another store for {d}-dimensional ones.")
        vec = vectors.detach().to("cpu", torch.float32)
        bad = ~torch.isfinite(vec).all(dim=1)
        if bad.any():
            raise StoreError(f"vectors hold NaN or Inf in row(s) {bad.nonzero().flatten().tolist()[:10]}.",
                             "fix the edit that produced them (a diverged optimisation?) and add again.")
        payloads = _check_list(payloads, n, "payloads")
        meta = _check_list(meta, n, "meta")
        blobs = [_payload_blob(p, i) for i, p in enumerate(payloads)] if payloads is not None else [None] * n
        metas = ([_to_json(_check_meta(m, i), f"meta[{i}]") for i, m in enumerate(meta)]
                 if meta is not None else ["{}"] * n)
        now = time.time()
        rows = [(client_id, slot, d, now, vec[i].numpy().astype(_F32).tobytes(), blobs[i], metas[i])
                for i in range(n)]
        ids: list[int] = []
        with self._transaction() as db:
            if self._dim is None and n:
                db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES ('dim', ?)", (str(d),))
            for r in rows:
                cur = db.execute("INSERT INTO mkvs (owner, slot, dim, created, vector, payload, meta) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)", r)
                ids.append(cur.lastrowid)
        if self._dim is None and n:
            self._dim = d
        log.debug("stored %d MKVs of client %s, slot %d", n, client_id, slot)
        return ids

    # --- reading ----------------------------------------------------------------------
    def count(self, slot: int | None = None, owner: str | None = None) -> int:
        """How many MKVs are stored (in ``slot`` / of ``owner`` when given)."""
        where, args = _where(slot=slot, owner=owner)
        return self._read(f"SELECT COUNT(*) FROM mkvs{where}", args)[0][0]

    def get(self, ids: Iterable[int]) -> list[MKV]:
        """The MKVs with these ids, in the order asked. An unknown id raises :class:`StoreError`."""
        ids = [int(i) for i in ids]
        found: dict[int, MKV] = {}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            q = f"SELECT {_COLS} FROM mkvs WHERE id IN ({','.join('?' * len(part))})"
            for row in self._read(q, part):
                found[row[0]] = self._mkv(row)
        missing = [i for i in ids if i not in found]
        if missing:
            raise StoreError(f"no MKV with id(s) {missing[:10]} in {self.path}.",
                             "use ids returned by add() or found by for_slot()/retrieve_*().")
        return [found[i] for i in ids]

    def for_slot(self, slot: int, exclude_client: str | None = None, owner: str | None = None) -> list[MKV]:
        """MKVs of time ``slot`` in insertion order, optionally of one ``owner`` only and/or
        without those of ``exclude_client``."""
        where, args = _where(slot=slot, owner=owner, exclude=exclude_client)
        return [self._mkv(r) for r in self._read(f"SELECT {_COLS} FROM mkvs{where} ORDER BY id", args)]

    def ids(self, slot: int | None = None, owner: str | None = None) -> list[int]:
        """Ids of the stored MKVs (of ``slot`` / ``owner`` when given), in insertion order; reads no vector."""
        where, args = _where(slot=slot, owner=owner)
        return [r[0] for r in self._read(f"SELECT id FROM mkvs{where} ORDER BY id", args)]

    def _mkv(self, row: tuple) -> MKV:
        """A stored row as an MKV, refused (StoreError naming it) when damaged or refused by ``check``."""
        m = _row_to_mkv(row, self._dim)
        why = self.check(m) if self.check is not None else None
        if why:
            raise StoreError(f"the MKV store record {m.id} (owner {m.owner!r}, slot {m.slot}) is refused: {why}.",
                             "leave it out (it was not computed on this model, or was tampered with), or start "
                             "a new store.")
        return m

    def _vectors(self, slot: int | None, exclude: str | None) -> tuple[list[int], torch.Tensor]:
        """Ids and vectors [m, dim] only (no payloads), for searching."""
        where, args = _where(slot=slot, exclude=exclude)
        rows = self._read(f"SELECT id, vector FROM mkvs{where} ORDER BY id", args)
        d = self._dim or 0
        if not rows:
            return [], torch.zeros(0, d)
        for id_, vec in rows:
            if not isinstance(vec, bytes) or len(vec) != 4 * d:
                raise _damaged(id_, f"its vector holds {len(vec) if isinstance(vec, bytes) else 0} bytes, "
                                    f"not {4 * d}")
        mat = torch.from_numpy(np.frombuffer(b"".join(r[1] for r in rows), dtype=_F32).reshape(len(rows), -1)
                               .astype(np.float32))
        bad = ~torch.isfinite(mat).all(dim=1)
        if bad.any():
            raise _damaged(rows[int(bad.nonzero()[0])][0], "its vector holds NaN or Inf")
        return [r[0] for r in rows], mat

    def _check_query(self, x: torch.Tensor, name: str, ndim: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in ndim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise StoreError(f"{name} must be a tensor with {' or '.join(f'{k}-D' for k in ndim)} shape "
                             f"[..., dim], got {shape}.", f"pass {name} as a [n, dim] tensor.")
        if self._dim is not None and x.shape[-1] != self._dim:
            raise StoreError(f"{name} has dimension {x.shape[-1]}, but this store holds dimension {self._dim}.",
                             "query with MKVs of the same model and layer as the stored ones.")
        x = x.detach().to("cpu", torch.float32)
        if not torch.isfinite(x).all():
            raise StoreError(f"{name} holds NaN or Inf.", "fix the vectors before searching.")
        return x

    # --- retrieval --------------------------------------------------------------------
    def retrieve_fededit(self, client_id: str, slot: int, own_vectors: torch.Tensor,
                         tau: float = DEFAULT_TAU) -> list[Hit]:
        """Other clients' MKVs of ``slot`` that FedEdit's rule accepts for ``client_id``.

        ``own_vectors`` [n, dim] are the client's own MKVs of the slot. An MKV v_o of another
        client is a hit when ``2 * #{j : cos(v_j, v_o) > tau} >= n``. Hits come in insertion
        order, with their payloads and meta.
        """
        _check_client_id(client_id)
        self._check_known(client_id)
        own = self._check_query(own_vectors, "own_vectors", (2,))
        ids, others = self._vectors(slot, exclude=client_id)
        if not ids or own.shape[0] == 0:
            return []
        hit, counts = fededit_hits(own, others, tau)
        max_sim = cosine_matrix(own, others).max(dim=0).values  # [m]
        chosen = hit.nonzero().flatten().tolist()
        mkvs = self.get([ids[i] for i in chosen])
        return [Hit(m, int(counts[i]), float(max_sim[i])) for m, i in zip(mkvs, chosen)]

    def retrieve_topk(self, query: torch.Tensor, k: int, slot: int | None = None,
                      exclude_client: str | None = None) -> list[Match] | list[list[Match]]:
        """The ``k`` stored MKVs most cosine-similar to ``query``, best first.

        ``query`` [dim] gives one list of :class:`Match`; [q, dim] gives one list per row.
        ``slot`` and ``exclude_client`` restrict the search.
        """
        q = self._check_query(query, "query", (1, 2))
        ids, keys = self._vectors(slot, exclude=exclude_client)
        one = q.dim() == 1
        q2 = q[None] if one else q
        if not ids:
            out: list[list[Match]] = [[] for _ in range(q2.shape[0])]
        else:
            scores, idx = topk(q2, keys, k)
            wanted = sorted({ids[i] for i in idx.flatten().tolist()})
            by_id = {m.id: m for m in self.get(wanted)}
            out = [[Match(by_id[ids[i]], float(s)) for s, i in zip(srow.tolist(), irow.tolist())]
                   for srow, irow in zip(scores, idx)]
        return out[0] if one else out

    # --- internals --------------------------------------------------------------------
    def _check_known(self, client_id: str) -> None:
        if not self._read("SELECT 1 FROM clients WHERE id=?", (client_id,)):
            raise self._unknown_client(client_id)

    def _read(self, query: str, args: Sequence = ()) -> list[tuple]:
        """All rows of a read; a file damaged under SQLite (a malformed page) is a StoreError."""
        try:
            return self._db.execute(query, args).fetchall()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as e:  # a malformed page; text that is not UTF-8
            raise StoreError(f"cannot read the MKV store {self.path} ({type(e).__name__}: {str(e)[:120]}).",
                             "if another process holds it, wait and retry; if the file was changed outside "
                             "fedit, restore it from a copy or start a new store.") from e

    def _unknown_client(self, client_id: str) -> StoreError:
        known = self.clients()
        return StoreError(f"client {client_id!r} is not registered in {self.path} "
                          f"(registered: {', '.join(map(repr, known[:10])) or 'none'}).",
                          f"call register_client({client_id!r}) first.")

    def _transaction(self):
        return _Transaction(self._db, self.path)


# Seconds a writer waits for another process's write lock before giving up with a StoreError.
LOCK_TIMEOUT = 5.0


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (the store stays as it was)."""

    def __init__(self, conn: sqlite3.Connection, path: str = ""):
        self.conn = conn
        self.path = path

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise StoreError(f"the MKV store {self.path} is locked by another writer ({e}); nothing was written.",
                             "let the other process finish (or stop it), then run again; or use another "
                             "store file.") from e
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")


_COLS = "id, owner, slot, dim, created, vector, payload, meta"
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _damaged(id_: Any, why: str) -> StoreError:
    return StoreError(f"the MKV store holds a damaged record (id {id_}): {why}.",
                      "the file was changed outside fedit; restore it from a copy, or start a new store.")


def _row_to_mkv(row: tuple, store_dim: int | None) -> MKV:
    """A stored row as an MKV, every column checked (SQLite keeps any type in any column)."""
    id_, owner, slot, dim, created, vec, payload, meta = row
    try:
        if not isinstance(owner, str) or not isinstance(slot, int) or slot < 0 or not isinstance(created, (int, float)):
            raise ValueError(f"owner {owner!r}, slot {slot!r} or created {created!r} has the wrong type")
        if not isinstance(vec, bytes) or (payload is not None and not isinstance(payload, bytes)):
            raise ValueError("its vector or payload is not a blob")
        vector = torch.from_numpy(np.frombuffer(vec, dtype=_F32).astype(np.float32))  # [dim], own memory
        if vector.numel() != dim or dim != store_dim or not torch.isfinite(vector).all():
            raise ValueError(f"its vector has {vector.numel()} values (dim {dim}, the store's {store_dim}) "
                             "or is not finite")
        tensors = dict(st_load(payload)) if payload else {}
        if not all((not (t.is_floating_point() or t.is_complex())) or bool(torch.isfinite(t).all())
                   for t in tensors.values()):
            raise ValueError("its payload holds NaN or Inf")
        info = json.loads(meta)
        if not isinstance(info, dict):
            raise ValueError(f"its meta is a {type(info).__name__}, not an object")
        return MKV(id=id_, owner=owner, slot=slot, dim=dim, created=float(created), vector=vector, payload=tensors,
                   meta=info)
    except Exception as e:  # noqa: BLE001 - any damage in a stored record is named, never a raw traceback
        raise _damaged(id_, f"{type(e).__name__}: {str(e)[:200]}") from e


def _stored_dim(value: Any, path: str) -> int:
    """The ``dim`` setting as written by fedit (a positive whole number as text), else a StoreError."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 10 and int(value) > 0:
        return int(value)
    raise StoreError(f"the MKV store {path} is damaged: its dimension setting is {str(value)[:40]!r}.",
                     "the file was changed outside fedit; restore it from a copy, or start a new store.")


def _where(slot: int | None = None, owner: str | None = None, exclude: str | None = None) -> tuple[str, list]:
    parts, args = [], []
    if slot is not None:
        parts.append("slot = ?")
        args.append(int(slot))
    if owner is not None:
        parts.append("owner = ?")
        args.append(owner)
    if exclude is not None:
        parts.append("owner != ?")
        args.append(exclude)
    return (" WHERE " + " AND ".join(parts) if parts else ""), args


def _check_file(p: Path) -> None:
    """Refuse a path that is a folder or a non-SQLite file, before sqlite3 touches it."""
    if p.is_dir():
        raise StoreError(f"the MKV store path {p} is a folder.", "give a file path, e.g. <folder>/mkvs.sqlite.")
    if p.exists() and p.stat().st_size > 0:
        try:
            with open(p, "rb") as f:
                head = f.read(len(_SQLITE_MAGIC))
        except OSError as e:
            raise StoreError(f"cannot read the MKV store {p}: {e}.", "check its permissions, or point to another path.") from e
        if head != _SQLITE_MAGIC:
            raise StoreError(f"{p} exists but is not an SQLite database (corrupt, or another kind of file).",
                             "move the file aside, or point the store to another path; fedit does not "
                             "overwrite it.")


def _create_private(p: Path) -> None:
    """Create a new store file readable by its owner only (0600); SQLite gives its WAL and
    shared-memory files the same mode. An existing file keeps its mode."""
    try:
        os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    except OSError as e:
        raise StoreError(f"cannot create the MKV store {p}: {e}.",
                         "check the folder's permissions and free space, or point to another path.") from e


def _check_client_id(client_id: Any) -> None:
    if not isinstance(client_id, str) or not client_id.strip():
        raise StoreError(f"client id must be a non-empty string, got {client_id!r}.",
                         "name each client, e.g. 'client-0' or the organisation's name.")


def _check_list(items: Sequence | None, n: int, name: str) -> list | None:
    if items is None:
        return None
    if isinstance(items, (dict, str, bytes)) or not hasattr(items, "__len__"):
        raise StoreError(f"{name} must be a list with one entry per vector, got {type(items).__name__}.",
                         f"pass a list of {n} dicts, or leave {name} out.")
    if len(items) != n:
        raise StoreError(f"{name} has {len(items)} entries for {n} vectors.",
                         f"pass exactly one {name} entry per row of vectors.")
    return list(items)


def _payload_blob(payload: Any, i: int) -> bytes | None:
    if payload is None:
        return None
    if not isinstance(payload, dict):
        raise StoreError(f"payloads[{i}] must be a dict of named tensors, got {type(payload).__name__}.",
                         "pass e.g. {'keys.3': k, 'resid.3': r}, or None.")
    if not payload:
        return None
    clean: dict[str, torch.Tensor] = {}
    for name, t in payload.items():
        if not isinstance(name, str) or not name:
            raise StoreError(f"payloads[{i}] has a tensor name {name!r}; names must be non-empty strings.",
                             "name each tensor, e.g. 'keys.3'.")
        if not isinstance(t, torch.Tensor):
            raise StoreError(f"payloads[{i}][{name!r}] is a {type(t).__name__}, not a torch.Tensor.",
                             "convert it with torch.as_tensor(...) or leave it out of the payload.")
        t = t.detach().to("cpu").contiguous().clone()
        if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
            raise StoreError(f"payloads[{i}][{name!r}] holds NaN or Inf.",
                             "fix the computation that produced it and add again.")
        clean[name] = t
    try:
        return st_save(clean)
    except Exception as e:  # safetensors rejects some dtypes/layouts
        raise StoreError(f"payloads[{i}] cannot be serialised with safetensors: {e}.",
                         "use dense tensors of a standard dtype (float32, float16, bfloat16, int64, ...).") from e


def _check_meta(meta: Any, i: int) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise StoreError(f"meta[{i}] must be a dict, got {type(meta).__name__}.",
                         "pass e.g. {'case_id': 4482, 'relation': 'P19'}, or None.")
    return meta


def _to_json(obj: dict, what: str) -> str:
    try:
        return json.dumps(obj, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} is not JSON-serialisable: {e}.",
                         "keep to strings, numbers, booleans, lists and dicts (convert tensors with .tolist()).") from e

"""MKV store (SQLite) and the FedEdit retrieval rule: persistence, refusals, hits, top-k."""

import sqlite3

import pytest
import torch

from fedit.errors import FeditError, StoreError
from fedit.federation.retrieval import cosine_matrix, fededit_hits, topk
from fedit.federation.store import MKV, MKVStore

D = 8


def vecs(n, d=D, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def payload(i):
    return {"keys.3": torch.full((4,), float(i)), "resid.3": torch.arange(3, dtype=torch.float16) + i,
            "ids": torch.tensor([i, i + 1])}


def assert_same(a: MKV, b: MKV):
    assert (a.id, a.owner, a.slot, a.dim, a.created, a.meta) == (b.id, b.owner, b.slot, b.dim, b.created, b.meta)
    assert torch.equal(a.vector, b.vector)
    assert a.payload.keys() == b.payload.keys()
    for k in a.payload:
        assert a.payload[k].dtype == b.payload[k].dtype and torch.equal(a.payload[k], b.payload[k])


@pytest.fixture
def store():
    with MKVStore(":memory:") as s:
        s.register_client("a")
        s.register_client("b")
        yield s


# --- persistence -------------------------------------------------------------------------

def test_persists_across_close_and_reopen(tmp_path):
    path = tmp_path / "sub" / "mkvs.sqlite"  # folder is created
    v = vecs(3)
    meta = [{"case_id": 4482, "relation": "P19", "request": {"prompt": "{} originates from"}}, {}, {"x": [1, 2]}]
    with MKVStore(path) as s:
        assert s.dim is None
        s.register_client("a", {"org": "hospital"})
        ids = s.add("a", 2, v, payloads=[payload(0), None, payload(2)], meta=meta)
        before = s.get(ids)
        assert s.dim == D
    with MKVStore(path) as s:
        assert s.dim == D and s.clients() == ["a"] and s.client_info("a") == {"org": "hospital"}
        after = s.get(ids)
        assert s.count() == 3
    for b, a in zip(before, after):
        assert_same(b, a)
    assert torch.equal(torch.stack([m.vector for m in after]), v)
    assert after[0].meta == meta[0] and after[1].payload == {} and after[0].owner == "a" and after[0].slot == 2
    assert torch.equal(after[2].payload["resid.3"], payload(2)["resid.3"])
    assert after[0].created == before[0].created  # the upload time survives reopening
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT version FROM schema_version").fetchone()[0] == 1


def test_vectors_are_stored_as_float32(store):
    (i,) = store.add("a", 0, vecs(1).double())
    m = store.get([i])[0]
    assert m.vector.dtype == torch.float32 and m.vector.shape == (D,)


def test_for_slot_filters_owner_and_excludes(store):
    ia = store.add("a", 0, vecs(2))
    ib = store.add("b", 0, vecs(3, seed=1))
    store.add("b", 1, vecs(1, seed=2))
    assert [m.id for m in store.for_slot(0)] == ia + ib
    assert [m.id for m in store.for_slot(0, exclude_client="a")] == ib
    assert [m.id for m in store.for_slot(0, owner="a")] == ia
    assert store.count() == 6 and store.count(slot=0) == 5 and store.count(owner="b") == 4


# --- dimension ---------------------------------------------------------------------------

def test_dimension_fixed_and_mismatch_refused_without_loss(tmp_path):
    path = tmp_path / "m.sqlite"
    with MKVStore(path, dim=D) as s:
        s.register_client("a")
        ids = s.add("a", 0, vecs(2), payloads=[payload(0), payload(1)])
        before = s.get(ids)
        with pytest.raises(StoreError, match=f"dimension {D + 1}.*holds dimension {D}"):
            s.add("a", 0, vecs(2, d=D + 1))
        assert s.count() == 2
    with pytest.raises(StoreError, match=f"holds vectors of dimension {D}.*dim=4"):
        MKVStore(path, dim=4)
    with MKVStore(path, dim=D) as s, MKVStore(path) as s2:
        assert s2.dim == D
        for b, a in zip(before, s.get(ids)):
            assert_same(b, a)


def test_first_vectors_fix_dimension(store):
    store.add("a", 0, vecs(1, d=5))
    assert store.dim == 5
    with pytest.raises(StoreError, match="dimension 6"):
        store.add("b", 0, vecs(1, d=6))


# --- refusals leave everything intact ----------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_vectors_and_payloads_refused(store, bad):
    store.add("a", 0, vecs(1))
    v = vecs(3)
    v[1, 2] = bad
    with pytest.raises(StoreError, match=r"NaN or Inf in row\(s\) \[1\]"):
        store.add("a", 0, v)
    p = [payload(0), payload(1), payload(2)]
    p[2]["keys.3"][0] = bad
    with pytest.raises(StoreError, match=r"payloads\[2\]\['keys.3'\] holds NaN or Inf"):
        store.add("a", 0, vecs(3), payloads=p)
    assert store.count() == 1


@pytest.mark.parametrize("call, match", [
    (lambda s: s.add("nobody", 0, vecs(1)), "client 'nobody' is not registered.*register_client"),
    (lambda s: s.add("", 0, vecs(1)), "client id must be a non-empty string"),
    (lambda s: s.add("a", -1, vecs(1)), "slot must be a whole number >= 0"),
    (lambda s: s.add("a", 0, vecs(1)[0]), r"2-D \[n, dim\]"),
    (lambda s: s.add("a", 0, vecs(2).tolist()), "must be a torch.Tensor"),
    (lambda s: s.add("a", 0, vecs(2), payloads=[payload(0)]), "payloads has 1 entries for 2 vectors"),
    (lambda s: s.add("a", 0, vecs(2), meta=[{}]), "meta has 1 entries for 2 vectors"),
    (lambda s: s.add("a", 0, vecs(1), payloads=[{"k": [1.0, 2.0]}]), r"payloads\[0\]\['k'\] is a list, not a torch.Tensor"),
    (lambda s: s.add("a", 0, vecs(1), meta=[{"t": torch.ones(1)}]), r"meta\[0\] is not JSON-serialisable"),
    (lambda s: s.add("a", 0, vecs(1), meta=["x"]), r"meta\[0\] must be a dict"),
    (lambda s: s.register_client("  "), "client id must be a non-empty string"),
])
def test_bad_input_refused_and_nothing_changes(store, call, match):
    ids = store.add("a", 0, vecs(2), payloads=[payload(0), payload(1)], meta=[{"i": 0}, {"i": 1}])
    before = store.get(ids)
    with pytest.raises(StoreError, match=match) as e:
        call(store)
    assert isinstance(e.value, FeditError) and "Fix:" in str(e.value)
    assert store.count() == 2 and store.clients() == ["a", "b"]
    for b, a in zip(before, store.get(ids)):
        assert_same(b, a)


def test_failed_transaction_rolls_back(store, monkeypatch):
    """A failure half-way through the inserts leaves no partial rows and no fixed dimension."""
    import fedit.federation.store as mod

    real = mod._Transaction.__enter__

    def flaky(self):
        conn = real(self)

        class Half:
            def __init__(self):
                self.n = 0

            def execute(self, q, args=()):
                if q.startswith("INSERT INTO mkvs"):
                    self.n += 1
                    if self.n == 2:
                        raise sqlite3.OperationalError("disk I/O error (simulated)")
                return conn.execute(q, args)
        return Half()

    monkeypatch.setattr(mod._Transaction, "__enter__", flaky)
    with pytest.raises(sqlite3.OperationalError):
        store.add("a", 0, vecs(3))
    monkeypatch.undo()
    assert store.count() == 0 and store.dim is None
    assert store.add("a", 0, vecs(1, d=3)) and store.dim == 3


def test_unknown_ids_and_closed_store(tmp_path):
    s = MKVStore(tmp_path / "x.sqlite")
    s.register_client("a")
    with pytest.raises(StoreError, match=r"no MKV with id\(s\) \[7\]"):
        s.get([7])
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.count()


# --- files that are not stores -----------------------------------------------------------

@pytest.mark.parametrize("content", [b"this is not a database\n" * 10, b"SQLite format 3\x00" + b"\xff" * 200])
def test_corrupt_file_refused_and_left_untouched(tmp_path, content):
    path = tmp_path / "mkvs.sqlite"
    path.write_bytes(content)
    with pytest.raises(StoreError) as e:
        MKVStore(path)
    msg = str(e.value)
    assert str(path) in msg and "move the file aside" in msg and "another path" in msg
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mkvs.sqlite"]


def test_foreign_sqlite_database_refused(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE t (x)")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not an fedit MKV store"):
        MKVStore(path)
    assert path.read_bytes() == before


def test_folder_path_refused(tmp_path):
    with pytest.raises(StoreError, match="is a folder"):
        MKVStore(tmp_path)


# --- retrieval rule ----------------------------------------------------------------------

def test_cosine_matrix_zero_vectors_and_dtypes():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    s = cosine_matrix(a, b)
    assert s.shape == (3, 2) and s.dtype == torch.float32 and not s.isnan().any()
    assert torch.allclose(s, torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.6, 0.0]]))
    assert cosine_matrix(a.double(), b).dtype == torch.float64
    assert cosine_matrix(a.half(), b).dtype == torch.float32
    assert cosine_matrix(torch.zeros(0, 2), b).shape == (0, 2)
    with pytest.raises(FeditError, match="different dimensions"):
        cosine_matrix(a, torch.ones(1, 3))


def _unit(deg):
    r = torch.deg2rad(torch.tensor(float(deg)))
    return torch.stack([torch.cos(r), torch.sin(r)])


def test_fededit_hit_rule_half_of_own_vectors():
    # n = 4 own vectors on the unit circle; an other vector's cosine with own j is cos(angle).
    own = torch.stack([_unit(0), _unit(90), _unit(180), _unit(270)])
    others = torch.stack([_unit(45),    # cos 0.707 with 0 and 90 deg -> count 2 -> hit (2*2 >= 4)
                          _unit(0),     # cos 1 with 0 deg only -> count 1 -> no hit
                          -_unit(45),   # 180 and 270 -> count 2 -> hit
                          torch.zeros(2)])  # zero vector: similarity 0 with all -> no hit
    hit, counts = fededit_hits(own, others, tau=0.4)
    assert counts.dtype == torch.long and hit.dtype == torch.bool
    assert counts.tolist() == [2, 1, 2, 0]
    assert hit.tolist() == [True, False, True, False]
    # odd n: 3 own vectors need 2 (2*1 < 3)
    hit3, c3 = fededit_hits(own[:3], others[:2])
    assert c3.tolist() == [2, 1] and hit3.tolist() == [True, False]
    # n = 0: no hits at all
    hit0, c0 = fededit_hits(torch.zeros(0, 2), others)
    assert not hit0.any() and c0.tolist() == [0, 0, 0, 0]


def test_fededit_tau_is_strict():
    own = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    other = torch.tensor([[0.6, 0.8]], dtype=torch.float64)  # cosine exactly 0.6
    assert fededit_hits(own, other, tau=0.6)[1].tolist() == [0]
    assert fededit_hits(own, other, tau=0.6 - 1e-9)[1].tolist() == [2]


def test_topk_order():
    keys = torch.stack([_unit(a) for a in (80, 10, 40, 0, 170)])
    scores, idx = topk(_unit(0), keys, 3)
    assert idx.tolist() == [3, 1, 2] and scores.shape == (3,)
    assert torch.all(scores[:-1] >= scores[1:])
    _, i2 = topk(torch.stack([_unit(0), _unit(180)]), keys, 10)
    assert i2.shape == (2, 5) and i2[1, 0].item() == 4
    with pytest.raises(FeditError, match="k must be"):
        topk(_unit(0), keys, -1)


def test_store_retrieve_fededit_searches_other_clients_of_the_slot(store):
    own = torch.stack([_unit(0), _unit(90), _unit(180), _unit(270)])
    store.add("a", 0, own, meta=[{"own": i} for i in range(4)])  # own MKVs are never hits
    ids = store.add("b", 0, torch.stack([_unit(45), _unit(0), -_unit(45)]),
                    payloads=[payload(i) for i in range(3)], meta=[{"fact": i} for i in range(3)])
    store.add("b", 1, torch.stack([_unit(45)]))  # another slot
    hits = store.retrieve_fededit("a", 0, own)
    assert [h.mkv.id for h in hits] == [ids[0], ids[2]]
    assert [h.count for h in hits] == [2, 2] and [h.mkv.meta["fact"] for h in hits] == [0, 2]
    assert hits[0].max_sim == pytest.approx(2 ** -0.5, abs=1e-6)
    assert torch.equal(hits[1].mkv.payload["keys.3"], payload(2)["keys.3"])
    assert store.retrieve_fededit("a", 5, own) == []
    assert store.retrieve_fededit("a", 0, torch.zeros(0, 2)) == []
    with pytest.raises(StoreError, match="not registered"):
        store.retrieve_fededit("zed", 0, own)
    with pytest.raises(StoreError, match="dimension 3"):
        store.retrieve_fededit("a", 0, torch.ones(1, 3))


def test_store_retrieve_topk(store):
    ida = store.add("a", 0, torch.stack([_unit(0), _unit(100)]))
    idb = store.add("b", 1, torch.stack([_unit(20), _unit(-5), _unit(170)]))
    got = store.retrieve_topk(_unit(0), 3)
    assert [m.mkv.id for m in got] == [ida[0], idb[1], idb[0]]
    assert got[0].score == pytest.approx(1.0)
    assert [m.mkv.id for m in store.retrieve_topk(_unit(0), 2, exclude_client="a")] == [idb[1], idb[0]]
    assert [m.mkv.id for m in store.retrieve_topk(_unit(0), 5, slot=0)] == [ida[0], ida[1]]
    batch = store.retrieve_topk(torch.stack([_unit(0), _unit(180)]), 1)
    assert [[m.mkv.id for m in row] for row in batch] == [[ida[0]], [idb[2]]]
    assert store.retrieve_topk(_unit(0), 3, slot=9) == []


def test_new_store_file_is_readable_by_its_owner_only(tmp_path):
    import os
    import stat

    old = os.umask(0o022)  # a usual umask would leave the file world-readable
    try:
        path = tmp_path / "m.sqlite"
        with MKVStore(path, dim=D) as s:
            s.register_client("a")
            s.add("a", 0, vecs(2))
    finally:
        os.umask(old)
    for f in tmp_path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f


def test_store_locked_by_another_writer_is_a_clear_error_and_nothing_changes(tmp_path, monkeypatch):
    import fedit.federation.store as store_mod

    monkeypatch.setattr(store_mod, "LOCK_TIMEOUT", 0.1)
    path = tmp_path / "m.sqlite"
    with MKVStore(path, dim=D) as s:
        s.register_client("a")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            with pytest.raises(StoreError, match="locked by another writer"):
                s.add("a", 0, vecs(2))
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert s.count() == 0
        s.add("a", 0, vecs(2))  # once the lock is gone, the store works
        assert s.count() == 2


@pytest.mark.parametrize("column,value", [("vector", b"\x00\x01\x02"), ("payload", b"not safetensors"),
                                          ("meta", "{not json")])
def test_damaged_record_is_named_not_a_raw_error(tmp_path, column, value):
    path = tmp_path / "m.sqlite"
    with MKVStore(path, dim=D) as s:
        s.register_client("a")
        s.add("a", 0, vecs(2), payloads=[payload(0), payload(1)])
    raw = sqlite3.connect(path)
    raw.execute(f"UPDATE mkvs SET {column} = ? WHERE id = (SELECT MIN(id) FROM mkvs)", (value,))
    raw.commit()
    raw.close()
    with MKVStore(path) as s, pytest.raises(StoreError, match="damaged record"):
        s.for_slot(0)
    if column == "vector":  # the search path reads vectors on its own
        with MKVStore(path) as s, pytest.raises(StoreError, match="damaged record"):
            s.retrieve_topk(vecs(1), k=1)

"""Fuzz targets over every parser of untrusted input (hypothesis; strategies in tests/fuzzing.py).

The property, for each: any input either parses into a valid object or raises fedit's
FeditError (the CLI's exit 2) - never another exception, never a silent acceptance of NaN or of
a shape that does not fit. Bounded for CI (``FEDIT_FUZZ_EXAMPLES``, default 25 per target);
``FEDIT_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py`` fuzzes for longer.
"""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fedit.errors import FeditError

from fuzzing import (FUZZ, VALUES, mutated_bytes, mutated_json_bytes, mutated_safetensors, mutated_value,
                     split_safetensors)


@pytest.fixture(scope="module")
def lm():
    from fedit.testing import tiny_model

    return tiny_model("gpt2", n_layers=2)


@pytest.fixture(scope="module")
def work():
    with tempfile.TemporaryDirectory(prefix="fedit-fuzz-") as d:
        yield Path(d)


def _write(folder: Path, name: str, data: bytes) -> Path:
    p = folder / name
    p.write_bytes(data)
    return p


def _finite(x) -> bool:
    """No NaN/Inf anywhere in a parsed value (tensors, floats, nested lists/dicts/dataclasses)."""
    if isinstance(x, torch.Tensor):
        return not (x.is_floating_point() or x.is_complex()) or bool(torch.isfinite(x).all())
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_finite(v) for v in x)
    return True


# --- requests ----------------------------------------------------------------------------
REQUESTS = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English",
     "target_true": "French", "case_id": 7},
    {"case_id": 3, "requested_rewrite": {"prompt": "{} is located in", "subject": "Eiffel Tower",
                                         "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}}},
    {"prompt": "The capital of France is", "subject": "France", "target_new": "Lyon", "ground_truth": ["Paris"],
     "rephrase_prompt": "France's capital is", "locality_prompt": "The capital of Spain is",
     "locality_ground_truth": "Madrid"},
]


def _check_requests(reqs) -> None:
    from fedit.requests import EditRequest, check_batch

    assert reqs and all(isinstance(r, EditRequest) for r in reqs)
    for r in reqs:
        assert r.prompt.count("{}") == 1 and r.filled_prompt.count(r.subject) >= 1
        assert EditRequest.target_text(r.target_new).strip() == r.target_new.strip()
        json.dumps(r.to_dict())
    try:
        check_batch(reqs)
    except FeditError:
        pass


@FUZZ
@given(data=st.one_of(mutated_json_bytes(REQUESTS),
                      mutated_json_bytes(REQUESTS).map(lambda b: b.replace(b"}, {", b"}\n{").lstrip(b"[")
                                                       .rstrip(b"]"))))  # JSONL
def test_fuzz_request_file(data, work):
    from fedit.requests import load_requests

    path = _write(work, "requests.json", data)
    try:
        reqs = load_requests(path)
    except FeditError:
        return
    _check_requests(reqs)


@FUZZ
@given(items=mutated_value(REQUESTS))
def test_fuzz_request_dicts(items):
    from fedit.requests import as_requests

    try:
        reqs = as_requests(items if isinstance(items, list) else [items])
    except FeditError:
        return
    _check_requests(reqs)


# --- datasets ----------------------------------------------------------------------------
def _sample(kind: str) -> list:
    from fedit.data.loaders import sample_path

    return json.loads(sample_path(kind).read_text())[:2]


@pytest.mark.parametrize("kind", ["counterfact", "counterfact-easyedit", "easyedit", "zsre", "mquake", "known_1000"])
def test_fuzz_dataset_loaders(kind, work):
    from fedit.data.loaders import load_records

    @FUZZ
    @given(data=mutated_json_bytes(_sample(kind)), skip=st.booleans())
    def run(data, skip):
        path = _write(work, f"{kind}.json", data)
        try:
            recs = load_records(kind, path, skip_invalid=skip)
        except FeditError:
            return
        _check_requests([r.request for r in recs]) if recs else None
        for r in recs:
            assert all(isinstance(p, str) and p.strip() for p in r.paraphrases)
            assert all(isinstance(p.prompt, str) and isinstance(p.answer, str) and p.answer.strip()
                       for p in r.neighborhood + r.portability)

    run()


# --- edit files ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def edit_files(lm, work):
    """A weight-delta file (with originals), a GRACE memory and a SERAC edit, all valid."""
    from fedit.deltas import WeightDeltas
    from fedit.memory import MemoryEdit
    from fedit.methods.serac_artifact import SeracEdit

    name = lm.adapter.w_out_name(1)
    w = dict(lm.model.named_parameters())[lm.adapter.w_out_param_name(1)]
    g = torch.Generator().manual_seed(0)
    wd = WeightDeltas(deltas={lm.adapter.w_out_param_name(1): 1e-3 * torch.randn(w.shape, generator=g)},
                      method="rome", model=lm.identity(), requests=[REQUESTS[0]], hparams={"layers": [1]})
    wd.with_originals(lm.model)
    d_in, d_out = lm.adapter.w_out_dims(1)[1], lm.adapter.w_out_dims(1)[0]
    mem = MemoryEdit.build(lm, "grace", [name], {"keys": torch.randn(2, d_in, generator=g),
                                                 "values": torch.randn(2, d_out, generator=g),
                                                 "radii": torch.ones(2), "labels": torch.tensor([5, 6])},
                           {"layer": 1}, method="grace", requests=[REQUESTS[0]], hparams={"layers": [1]})
    serac = SeracEdit(requests=[REQUESTS[0]], hparams={"threshold": 0.5}, model=lm.identity(),
                      classifier={"w": torch.randn(4, 3, generator=g), "b": torch.zeros(3)})
    out = {}
    for kind, edit in (("deltas", wd), ("memory", mem), ("serac", serac)):
        out[kind] = edit.save(work / f"{kind}.safetensors").read_bytes()
    return out


def _forward(lm) -> torch.Tensor:
    ids = lm.tokenizer("The Eiffel Tower is in", return_tensors="pt").input_ids
    with torch.no_grad():
        return lm.model(ids).logits


@pytest.mark.parametrize("kind", ["deltas", "memory", "serac"])
def test_fuzz_edit_files(kind, lm, edit_files, work):
    """Every kind of edit file, damaged: load_edit gives an edit that applies to the model (finite
    logits, reverted exactly) or refuses with a FeditError, at load or at apply."""
    from fedit.memory import load_edit

    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}

    @FUZZ
    @given(data=mutated_safetensors(edit_files[kind]))
    def run(data):
        path = _write(work, f"fuzzed-{kind}.safetensors", data)
        try:
            edit = load_edit(path)
            json.dumps(edit.metadata(), default=str)
            if kind == "serac":
                return  # routing needs the sentence encoder; loading is the parser
            handle = edit.apply(lm.model)
        except FeditError:
            return
        try:
            assert torch.isfinite(_forward(lm)).all(), "an applied edit made the model output NaN/Inf"
        finally:
            handle.revert()
        for n, p in lm.model.named_parameters():
            assert torch.equal(p, before[n]), f"{n} not restored"

    run()


# --- the MKV store -------------------------------------------------------------------------
def _make_store(path: Path) -> None:
    from fedit.federation.store import MKVStore

    g = torch.Generator().manual_seed(1)
    with MKVStore(path, dim=8) as s:
        for c in ("client-0", "client-1"):
            s.register_client(c, {"org": c})
            for slot in (0, 1):
                s.add(c, slot, torch.randn(2, 8, generator=g),
                      payloads=[{"keys.1": torch.randn(2, 4, generator=g), "resid.1": torch.randn(2, 8, generator=g)},
                                None],
                      meta=[{"case_id": 1, "relation": "P19"}, {}])


@pytest.fixture(scope="module")
def store_file(work):
    path = work / "base.sqlite"
    _make_store(path)
    return path


def _read_everything(path: Path) -> None:
    """Open a store and read every record through every read path; what comes back is valid."""
    from fedit.federation.store import MKVStore

    with MKVStore(path) as s:
        dim = s.dim
        assert dim is None or (isinstance(dim, int) and dim > 0)
        for c in s.clients():
            assert isinstance(s.client_info(c), dict)
        n = s.count()
        mkvs = [m for slot in range(3) for m in s.for_slot(slot)]
        mkvs += s.get([m.id for m in mkvs])
        for m in mkvs:
            assert isinstance(m.owner, str) and isinstance(m.slot, int) and m.slot >= 0 and isinstance(m.meta, dict)
            assert m.vector.shape == (dim,) and m.vector.dtype == torch.float32 and _finite(m.vector)
            assert all(isinstance(k, str) and isinstance(t, torch.Tensor) and _finite(t) for k, t in m.payload.items())
        if n and dim:
            s.retrieve_topk(torch.ones(dim), k=3)
            for c in s.clients():
                s.retrieve_fededit(c, 0, torch.ones(2, dim))


@FUZZ
@given(data=st.data())
def test_fuzz_store_file_bytes(data, store_file, work):
    """A store file damaged byte-wise (pages, headers, free lists)."""
    base = store_file.read_bytes()
    path = _write(work, "fuzzed.sqlite", data.draw(mutated_bytes(base, 6)))
    for side in ("-wal", "-shm"):
        Path(str(path) + side).unlink(missing_ok=True)
    try:
        _read_everything(path)
    except FeditError:
        pass


_COLUMNS = {"mkvs": ["owner", "slot", "dim", "created", "vector", "payload", "meta"], "clients": ["id", "info"],
            "settings": ["value"], "schema_version": ["version"]}
_SQL_VALUES = st.one_of(st.none(), st.integers(-2 ** 63, 2 ** 63 - 1), st.floats(allow_nan=True),
                        st.text(max_size=20), st.binary(max_size=40),
                        st.sampled_from(["{}", "[]", "null", "NaN", '{"a": NaN}', "[" * 5000, "client-9", "-1",
                                         b"\x00\x00\xc0\x7f" * 8, b"\x00" * 32]))


@FUZZ
@given(data=st.data())
def test_fuzz_store_rows(data, store_file, work):
    """A store whose rows were changed outside fedit: any column of any table set to a value of
    any SQLite type (text in a number column, a blob as JSON, NaN floats, wrong-size vectors)."""
    path = work / "rows.sqlite"
    shutil.copyfile(store_file, path)
    conn = sqlite3.connect(path)
    for _ in range(data.draw(st.integers(1, 3))):
        table = data.draw(st.sampled_from(sorted(_COLUMNS)))
        col = data.draw(st.sampled_from(_COLUMNS[table]))
        value = data.draw(_SQL_VALUES)
        if table == "mkvs" and col == "payload" and data.draw(st.booleans()):
            value = data.draw(mutated_safetensors(_payload_blob()))
        if table == "mkvs" and col == "meta" and data.draw(st.booleans()):
            value = data.draw(mutated_json_bytes({"case_id": 1, "relation": "P19"})).decode("utf-8", "replace")
        rowid = data.draw(st.integers(1, 8))
        try:
            conn.execute(f"UPDATE {table} SET {col}=? WHERE rowid=?", (value, rowid))
        except sqlite3.Error:
            pass  # a constraint held
    conn.commit()
    conn.close()
    try:
        _read_everything(path)
    except FeditError:
        pass


def _payload_blob() -> bytes:
    from safetensors.torch import save

    return save({"keys.1": torch.ones(2, 4), "resid.1": torch.ones(2, 8)})


# --- hyperparameters -----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rome", "memit", "ft-l", "grace"])
def test_fuzz_hparams_json(method, lm, work):
    """``--hparams FILE``: the method's hyperparameters or a FeditError; no NaN gets through."""
    from fedit.methods import get_method
    from fedit.methods.hparams import resolve_hparams

    m = get_method(method)
    base = json.loads(json.dumps(__import__("dataclasses").asdict(
        resolve_hparams(m.hparams_class, m.name, lm.name, lm.model_type, lm.adapter.n_layers,
                        overrides={"layers": [1]})[0])))

    @FUZZ
    @given(data=mutated_json_bytes(base))
    def run(data):
        path = _write(work, "hp.json", data)
        try:
            hp, _ = resolve_hparams(m.hparams_class, m.name, lm.name, lm.model_type, lm.adapter.n_layers, file=path)
        except FeditError:
            return
        assert _finite(__import__("dataclasses").asdict(hp)), hp

    run()


_YAML = {"alg_name": "ROME", "model_name": "gpt2", "device": 0, "layers": [1], "fact_token": "subject_last",
         "v_num_grad_steps": 20, "v_lr": 5e-1, "v_loss_layer": 1, "v_weight_decay": 0.5, "clamp_norm_factor": 4,
         "kl_factor": 0.0625, "mom2_adjustment": True, "context_template_length_params": [[5, 10], [10, 10]],
         "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "mom2_dataset": "wikipedia",
         "mom2_n_samples": 100000, "mom2_dtype": "float32", "batch_size": 1}


@FUZZ
@given(text=st.one_of(mutated_value(_YAML).map(lambda v: yaml.safe_dump(v).encode()),
                      mutated_bytes(yaml.safe_dump(_YAML).encode())))
def test_fuzz_easyedit_yaml(text, lm, work):
    """An EasyEdit YAML file through ``fedit.editor.load_hparams``."""
    from fedit.editor import load_hparams

    path = _write(work, "hp.yaml", text)
    try:
        hp = load_hparams(path, model=lm)
    except FeditError:
        return
    assert _finite(__import__("dataclasses").asdict(hp.hparams)) and hp.alg_name == "rome"
    assert hp.batch_size is None or (isinstance(hp.batch_size, int) and hp.batch_size >= 1)


# --- target cache and statistics -----------------------------------------------------------
@pytest.fixture(scope="module")
def cache_entry(lm, work):
    from fedit.core.targets import TargetConfig, TargetResult
    from fedit.requests import EditRequest
    from fedit.target_cache import TargetCache

    cache = TargetCache(work / "targets")
    req = EditRequest(**{k: v for k, v in REQUESTS[0].items()})
    (key,) = cache.keys(lm, [req], ["{}"], TargetConfig(layer=1, site="w_out"))
    d = lm.adapter.d_model
    cache.put(key, TargetResult(z=torch.ones(d), h=torch.zeros(d), nll_start=3.0, nll_end=0.1, steps=5,
                                seconds=1.0, history=[3.0, 0.1]))
    return cache, key


@FUZZ
@given(data=st.data())
def test_fuzz_target_cache_entry(data, cache_entry, lm):
    """A damaged cache entry is a miss (recomputed), never an error and never a wrong target."""
    cache, key = cache_entry
    path = cache._path(key)
    base = path.read_bytes()
    try:
        path.write_bytes(data.draw(mutated_bytes(base, 3)))
        got = cache.get(key)
    finally:
        path.write_bytes(base)
    if got is not None:
        d = lm.adapter.d_model
        assert got.z.shape == (d,) and got.h.shape == (d,) and _finite(got.z) and _finite(got.h)


@pytest.fixture(scope="module")
def stats_file(work):
    from safetensors.torch import save_file

    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    path = work / "layer1.safetensors"
    save_file({"mom2": x.T @ x / 50}, str(path), metadata={"layer": "1", "tokens": "50"})
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_fuzz_statistics_file(data, stats_file, work):
    """A cached E[k kᵀ] file, damaged: a float32 [d_in, d_in] second moment or a StatsError."""
    from fedit.errors import StatsError
    from fedit.stats_cache import load_second_moment

    path = _write(work, "layer1-fuzzed.safetensors", data.draw(mutated_safetensors(stats_file)))
    try:
        C = load_second_moment(path, 16)
    except StatsError:
        return
    assert C.shape == (16, 16) and C.dtype == torch.float32 and _finite(C) and (C.diagonal() >= 0).all()


@FUZZ
@given(data=st.data())
def test_fuzz_partial_statistics(data, work):
    """A partial (resumable) statistics file, damaged: resumed from valid sums or started over."""
    from safetensors.torch import save_file

    from fedit.stats_cache import load_partial

    x = torch.randn(10, 16, dtype=torch.float64)
    base = work / "partial.safetensors"
    save_file({"sum1": x.T @ x}, str(base), metadata={"tokens": "10", "chunks": "2"})
    path = _write(work, "partial-fuzzed.safetensors", data.draw(mutated_safetensors(base.read_bytes())))
    running = load_partial(path, {1: 16}, "cpu")
    if running is not None:
        assert running.tokens > 0 and running.chunks > 0 and running.sums[1].shape == (16, 16)
        assert _finite(running.sums[1])


def test_strategies_reach_the_structure():
    """The mutators change what they should (a guard that the fuzz targets fuzz something)."""
    from hypothesis import find, settings

    fixed = settings(derandomize=True, database=None, max_examples=2000)  # the same search on every run

    header, _ = split_safetensors(_payload_blob())
    assert "keys.1" in header

    def has_nan(v) -> bool:
        if isinstance(v, float):
            return math.isnan(v)
        return any(has_nan(x) for x in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else []))

    nan = find(mutated_value({"a": [1.0]}), has_nan, settings=fixed)  # a NaN put somewhere into the value
    assert has_nan(nan)
    assert "a" not in find(mutated_value({"a": [1.0]}), lambda v: isinstance(v, dict) and "a" not in v, settings=fixed)
    assert find(VALUES, lambda v: isinstance(v, dict) and v, settings=fixed) != {}


# --- what the fuzzing found (each a regression test named after the find) ---------------------
DEEP_LIST = "[" * 100_000 + "]" * 100_000
HUGE_NUMBER = '[{"prompt": "{} is in", "subject": "Paris", "target_new": "Rome", "case_id": ' + "9" * 5000 + "}]"


@pytest.mark.parametrize("text", [DEEP_LIST, HUGE_NUMBER], ids=["deep-nesting", "5000-digit-number"])
def test_request_file_nested_too_deep_or_with_a_huge_number_is_a_request_error(text, tmp_path):
    from fedit.errors import RequestError
    from fedit.requests import load_requests

    (tmp_path / "r.json").write_text(text)
    with pytest.raises(RequestError, match="r.json"):
        load_requests(tmp_path / "r.json")


@pytest.mark.parametrize("text", [DEEP_LIST, HUGE_NUMBER], ids=["deep-nesting", "5000-digit-number"])
def test_dataset_file_nested_too_deep_or_with_a_huge_number_is_a_dataset_error(text, tmp_path):
    from fedit.data.loaders import DatasetError, load_records

    (tmp_path / "d.json").write_text(text)
    with pytest.raises(DatasetError, match="d.json"):
        load_records("counterfact", tmp_path / "d.json")


def _resave(src: bytes, dst: Path, change) -> Path:
    """An edit file with its safetensors header changed by ``change(header)``."""
    from fuzzing import join_safetensors

    header, data = split_safetensors(src)
    change(header)
    dst.write_bytes(join_safetensors(header, data))
    return dst


@pytest.mark.parametrize("key,value", [("requests", '{"a": 1}'), ("model", "[" * 50_000 + "]" * 50_000),
                                       ("hparams", '{"n": ' + "9" * 5000 + "}")],
                         ids=["requests-an-object", "model-nested-too-deep", "hparams-5000-digit-number"])
def test_edit_file_metadata_of_the_wrong_type_or_unparsable_is_a_delta_file_error(key, value, edit_files, tmp_path):
    from fedit.errors import DeltaFileError
    from fedit.memory import load_edit

    path = _resave(edit_files["deltas"], tmp_path / "e.safetensors",
                   lambda h: h["__metadata__"].__setitem__(key, value))
    with pytest.raises(DeltaFileError, match=key):
        load_edit(path)


def test_edit_file_whose_originals_do_not_match_its_deltas_is_refused_at_load(edit_files, tmp_path):
    """Found: an original renamed away made apply() fail with a raw KeyError."""
    from fedit.errors import DeltaFileError
    from fedit.memory import load_edit

    def rename(h):
        name = next(k for k in h if k.startswith("orig/"))
        h[name + "x"] = h.pop(name)

    with pytest.raises(DeltaFileError, match="original weights do not match"):
        load_edit(_resave(edit_files["deltas"], tmp_path / "e.safetensors", rename))


def test_edit_file_with_integer_deltas_is_refused(edit_files, tmp_path):
    from fedit.errors import DeltaFileError
    from fedit.memory import load_edit

    def to_int(h):
        for k in h:
            if k != "__metadata__":
                h[k]["dtype"] = "I32"

    with pytest.raises(DeltaFileError, match="not floating point"):
        load_edit(_resave(edit_files["deltas"], tmp_path / "e.safetensors", to_int))


@pytest.mark.parametrize("change", ["drop-keys", "values-wrong-width", "nan-radii"])
def test_grace_memory_missing_or_misshapen_tensor_is_refused_before_any_hook(change, lm, edit_files, tmp_path):
    """Found: a memory without 'keys' was a raw KeyError; values of another width failed inside the
    forward pass (mat1 and mat2 shapes cannot be multiplied)."""
    from fedit.errors import DeltaFileError
    from fedit.memory import MemoryEdit

    mem = MemoryEdit.load(_write(tmp_path, "m.safetensors", edit_files["memory"]))
    if change == "drop-keys":
        del mem.tensors["keys"]
    elif change == "values-wrong-width":
        mem.tensors["values"] = mem.tensors["values"][:, :-1]
    else:
        mem.tensors["radii"] = torch.full_like(mem.tensors["radii"], float("nan"))
    hooks = sum(len(m._forward_hooks) for m in lm.model.modules())
    with pytest.raises(DeltaFileError, match="memory's tensor"):
        mem.apply(lm.model)
    assert sum(len(m._forward_hooks) for m in lm.model.modules()) == hooks


def _store_with(path: Path, sql: str, args=()) -> Path:
    _make_store(path)
    with sqlite3.connect(path) as conn:
        conn.execute(sql, args)
    return path


@pytest.mark.parametrize("sql,args", [
    ("UPDATE clients SET info=CAST(? AS TEXT) WHERE rowid=1", (b"\xff\xfe{}",)),
    ("UPDATE clients SET info='not json' WHERE rowid=1", ()),
    ("UPDATE settings SET value='0.0' WHERE key='dim'", ()),
    ("UPDATE settings SET value='4' WHERE key='dim'", ()),
    ("UPDATE mkvs SET meta='[1]' WHERE id=1", ()),
    ("UPDATE mkvs SET slot='zero' WHERE id=1", ()),
    ("UPDATE mkvs SET payload=? WHERE id=1", (None,)),
], ids=["info-not-utf8", "info-not-json", "dim-not-a-whole-number", "dim-unlike-the-vectors", "meta-a-list",
        "slot-text", "payload-dropped"])
def test_store_with_a_changed_row_is_a_store_error_on_read(sql, args, tmp_path):
    """Found: non-UTF-8 text was a raw UnicodeDecodeError, client info that is not JSON a
    JSONDecodeError, a dim setting of '0.0' a ValueError, and vectors of 8 values in a store
    whose setting says 4 (or a slot stored as text) were handed out as valid MKVs."""
    from fedit.errors import StoreError
    from fedit.federation.store import MKVStore

    path = _store_with(tmp_path / "s.sqlite", sql, args)
    if "payload" in sql:  # dropping a payload is allowed: the record simply has none
        _read_everything(path)
        return
    with pytest.raises(StoreError):
        _read_everything(path)
        with MKVStore(path) as s:
            s.get([1])  # the changed record, whichever slot it now claims


def test_store_payload_holding_nan_is_a_store_error(tmp_path):
    from safetensors.torch import save

    from fedit.errors import StoreError

    path = _store_with(tmp_path / "s.sqlite", "UPDATE mkvs SET payload=? WHERE id=1",
                       (save({"keys.1": torch.full((2, 4), float("nan"))}),))
    with pytest.raises(StoreError, match="NaN"):
        _read_everything(path)


def test_store_file_with_a_malformed_page_is_a_store_error(tmp_path):
    """Found: 'database disk image is malformed' came out of for_slot() as a raw sqlite3 error."""
    from fedit.errors import StoreError

    path = tmp_path / "s.sqlite"
    _make_store(path)
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page * 2 + 100: page * 3] = b"\xa5" * (page - 100)  # the mkvs table's page, garbled
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="s.sqlite"):
        _read_everything(path)


@pytest.mark.parametrize("value", [float("nan"), [0.5], "fast"], ids=["nan", "a-list", "text"])
def test_hparams_file_value_of_the_wrong_type_or_nan_is_an_hparams_error(value, lm, tmp_path):
    """Found: FT-L took num_steps=NaN silently; ROME's checks met a list with a raw TypeError."""
    from fedit.errors import HparamsError
    from fedit.methods import get_method
    from fedit.methods.hparams import resolve_hparams

    for method, key in (("ft-l", "num_steps"), ("rome", "v_lr")):
        (tmp_path / "hp.json").write_text(json.dumps({key: value}))
        m = get_method(method)
        with pytest.raises(HparamsError, match=key):
            resolve_hparams(m.hparams_class, m.name, lm.name, lm.model_type, lm.adapter.n_layers,
                            overrides={"layers": [1]}, file=tmp_path / "hp.json")


@pytest.mark.parametrize("change", ["not-utf8", "v_loss_layer-a-list", "module-path-a-list", "model_name-a-number"])
def test_easyedit_yaml_damaged_is_an_hparams_error(change, lm, tmp_path):
    """Found: a YAML file that is not UTF-8 was a raw UnicodeDecodeError; a list where EasyEdit
    writes a number or a module path was a raw TypeError."""
    from fedit.editor import load_hparams
    from fedit.errors import HparamsError

    data = dict(_YAML)
    if change == "v_loss_layer-a-list":
        data["v_loss_layer"] = [1]
    elif change == "module-path-a-list":
        data["rewrite_module_tmp"] = [{"a": 1}]
    elif change == "model_name-a-number":
        data["model_name"] = 7
    text = yaml.safe_dump(data).encode()
    (tmp_path / "hp.yaml").write_bytes(b"\xe1" + text if change == "not-utf8" else text)
    with pytest.raises(HparamsError):
        load_hparams(tmp_path / "hp.yaml", model=lm if change != "model_name-a-number" else None)


def test_statistics_of_integers_are_refused_and_a_partial_file_without_metadata_starts_over(stats_file, tmp_path):
    """Found: a partial statistics file without metadata was a raw TypeError."""
    from safetensors.torch import save_file

    from fedit.errors import StatsError
    from fedit.stats_cache import load_partial, load_second_moment

    save_file({"mom2": torch.eye(16, dtype=torch.int64)}, str(tmp_path / "s.safetensors"))
    with pytest.raises(StatsError, match="not real numbers"):
        load_second_moment(tmp_path / "s.safetensors", 16)
    save_file({"sum1": torch.eye(16)}, str(tmp_path / "p.safetensors"))
    assert load_partial(tmp_path / "p.safetensors", {1: 16}, "cpu") is None
    save_file({"sum1": torch.eye(8)}, str(tmp_path / "p.safetensors"), metadata={"tokens": "3", "chunks": "1"})
    assert load_partial(tmp_path / "p.safetensors", {1: 16}, "cpu") is None  # sums of another layer size


def test_forged_target_cache_entry_of_the_wrong_shape_is_recomputed(cache_entry, lm, caplog):
    """A cache entry whose key and checksum were forged to match but whose target has another
    size than the model's site is refused by the shape check (and recomputed by the caller)."""
    from fedit.target_cache import _checksum

    cache, key = cache_entry
    path = cache._path(key)
    base = path.read_bytes()
    data = torch.load(path, weights_only=True)
    data.pop("checksum"), data.pop("key")
    data["z"], data["h"] = torch.ones(8), torch.zeros(8)
    data.update(checksum=_checksum(data), key=key)
    torch.save(data, path)
    try:
        with caplog.at_level("WARNING", logger="fedit.target_cache"):
            assert cache.get(key) is None
    finally:
        path.write_bytes(base)
    assert "z has shape (8,)" in caplog.text and f"({lm.adapter.d_model},)" in caplog.text
    assert cache.get(key) is not None

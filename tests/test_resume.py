"""Catching up a FedEdit client that went missing (``federation.resume``), without Flower; the
deployment test with a killed node is ``test_resilience_deploy.py``."""

import json

import pytest

from fedit.federation.resume import merge, previous_run, to_catch_up
from fedit.federation.settings import SettingsError


def _run(missing):
    return {"settings": {"slots": 2, "clients": 3}, "clients": ["a", "b", "c"], "mkvs_stored": 4, "missing": missing,
            "slots": [{"slot": 0, "uploaded": {"a": 1, "b": 1, "c": 1}, "hits": {"a": [], "b": []},
                       "reuse": {"a": {"applied": 1}, "b": {"applied": 1}}, "missing": ["c"]},
                      {"slot": 1, "uploaded": {"a": 1, "b": 1}, "hits": {"a": [], "b": []},
                       "reuse": {"a": {"applied": 1}, "b": {"applied": 1}}, "missing": ["c"]}],
            "fededit": {"a": {"post": {}}, "b": {"post": {}}}}


def test_resume_is_refused_without_a_run_or_with_nobody_missing(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        previous_run(tmp_path, {"slots": 2, "clients": 3})
    (tmp_path / "federation.json").write_text(json.dumps(_run([])))
    with pytest.raises(SettingsError, match="no client .* is missing"):
        previous_run(tmp_path, {"slots": 2, "clients": 3})
    assert json.loads((tmp_path / "federation.json").read_text()) == _run([])  # untouched


def test_resume_with_other_settings_is_refused(tmp_path):
    (tmp_path / "federation.json").write_text(json.dumps(_run([{"client": "c", "slot": 0, "step": "edit", "why": ""}])))
    assert previous_run(tmp_path, {"slots": 2, "clients": 3, "evaluate": False})["clients"] == ["a", "b", "c"]
    with pytest.raises(SettingsError, match="slots was 2, now 3"):
        previous_run(tmp_path, {"slots": 3, "clients": 3})


def test_merge_fills_in_the_late_client_and_marks_it_caught_up():
    prev = _run([{"client": "c", "slot": 0, "step": "reuse", "why": "Node Unavailable"}])
    assert to_catch_up(prev) == ["c"]
    caught = {"mkvs_stored": 5, "fededit": {"c": {"post": {"x": 1}}},
              "slots": [{"slot": 0, "uploaded": {"c": 1}, "hits": {"c": [{"owner": "a"}]}, "reuse": {"c": {"applied": 2}}},
                        {"slot": 1, "uploaded": {"c": 1}, "hits": {"c": []}, "reuse": {"c": {"applied": 0}}}]}
    out = merge(prev, caught, [], ["c"], 1.5)
    assert out["slots"][0]["reuse"]["c"] == {"applied": 2} and out["slots"][1]["uploaded"]["c"] == 1
    assert out["slots"][0]["reuse"]["a"] == {"applied": 1}  # the others' results stay as they were
    assert out["mkvs_stored"] == 5 and set(out["fededit"]) == {"a", "b", "c"}
    assert out["missing"][0]["caught_up"] is True and to_catch_up(out) == []
    assert out["catch_ups"] == [{"clients": ["c"], "seconds": 1.5}]
    assert prev["missing"][0].get("caught_up") is None  # the input is not changed


def test_a_client_that_goes_missing_again_is_still_to_catch_up():
    prev = _run([{"client": "c", "slot": 1, "step": "edit", "why": "Node Unavailable"}])
    caught = {"mkvs_stored": 4, "slots": [{"slot": 0, "uploaded": {"c": 1}, "hits": {"c": []}, "reuse": {"c": {"applied": 0}}}]}
    again = [{"client": "c", "slot": 1, "step": "edit", "why": "no reply"}]
    out = merge(prev, caught, again, ["c"], 2.0)
    assert "caught_up" not in out["missing"][0] and out["missing"][1]["catch_up"] is True
    assert to_catch_up(out) == ["c"]

import json

import pytest

from fedit import EditRequest, RequestError, load_requests
from fedit.core.tokens import validate_for_tokenizer
from fedit.testing import gpt2_tokenizer


def test_valid_request_and_target_text():
    r = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")
    assert r.filled_prompt == "The mother tongue of Danielle Darrieux is"
    assert EditRequest.target_text("English") == " English"
    assert EditRequest.target_text(" English") == " English"


@pytest.mark.parametrize("kwargs, field, hint", [
    (dict(prompt="No placeholder", subject="X", target_new="Y"), "prompt", "exactly one '{}'"),
    (dict(prompt="{} and {}", subject="X", target_new="Y"), "prompt", "found 2"),
    (dict(prompt="{} is", subject="", target_new="Y"), "subject", "empty"),
    (dict(prompt="{} is", subject="X", target_new="  "), "target_new", "empty"),
    (dict(prompt="{} is", subject=" X", target_new="Y"), "subject", "spaces"),
    (dict(prompt="{} is {", subject="X", target_new="Y"), "prompt", "stray brace"),
])
def test_bad_requests_name_field_and_fix(kwargs, field, hint):
    with pytest.raises(RequestError) as e:
        EditRequest(**kwargs)
    msg = str(e.value)
    assert field in msg and hint in msg and "Fix:" in msg


def test_unknown_and_missing_fields():
    with pytest.raises(RequestError, match=r"unknown field\(s\) \['target'\]"):
        EditRequest.from_dict({"prompt": "{} is", "subject": "X", "target": "Y"})
    with pytest.raises(RequestError, match=r"missing field\(s\) \['target_new'\]"):
        EditRequest.from_dict({"prompt": "{} is", "subject": "X"})


def test_build_accepts_spelled_subject_and_rejects_missing_one():
    r = EditRequest.build("The Eiffel Tower is in", "Eiffel Tower", "Rome")
    assert r.prompt == "The {} is in"
    with pytest.raises(RequestError, match="occurs 0 times"):
        EditRequest.build("The tower is in", "Eiffel Tower", "Rome")


def test_load_json_jsonl_and_counterfact(tmp_path):
    items = [{"prompt": "{} is in", "subject": "A", "target_new": "B"},
             {"prompt": "{} speaks", "subject": "C", "target_new": "D", "target_true": "E"}]
    (tmp_path / "r.json").write_text(json.dumps(items))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    assert load_requests(tmp_path / "r.json") == load_requests(tmp_path / "r.jsonl")
    cf = {"case_id": 7, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                              "target_new": {"str": "English", "id": "Q1860"},
                                              "target_true": {"str": "French", "id": "Q150"},
                                              "relation_id": "P103"}, "paraphrase_prompts": []}
    (tmp_path / "cf.json").write_text(json.dumps([cf]))
    (r,) = load_requests(tmp_path / "cf.json")
    assert (r.subject, r.target_new, r.target_true, r.case_id) == ("Danielle Darrieux", "English", "French", 7)


def test_malformed_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "{} is", "subject": "A", "target_new": "B"}\n{oops\n')
    with pytest.raises(RequestError, match="line 2 is not valid JSON"):
        load_requests(tmp_path / "bad.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(RequestError, match="holds no requests"):
        load_requests(tmp_path / "empty.json")
    with pytest.raises(RequestError, match="does not exist"):
        load_requests(tmp_path / "nope.json")


def test_tokenizer_validation_rejects_untokenisable_subject():
    tok = gpt2_tokenizer()
    validate_for_tokenizer(tok, [EditRequest(prompt="{} is", subject="Paris", target_new="big")])
    with pytest.raises(RequestError, match=r"subject '<\|endoftext\|>' tokenises to no ordinary token"):
        validate_for_tokenizer(tok, [EditRequest(prompt="{} is", subject="<|endoftext|>", target_new="big")])


def test_check_batch_merges_duplicates_with_a_warning_and_refuses_conflicts(caplog):
    from fedit.requests import check_batch

    a = EditRequest("{} is located in", "Paris", "Rome")
    with caplog.at_level("WARNING", logger="fedit.requests"):
        assert check_batch([a, a, EditRequest("{} is located in", "Paris", " Rome")]) == [a]
    assert "2 duplicate request(s)" in caplog.text
    with pytest.raises(RequestError, match="two targets.*'Rome' and 'Berlin'"):
        check_batch([a, EditRequest("{} is located in", "Paris", "Berlin")])
    with pytest.raises(RequestError, match="equals target_true"):
        check_batch([EditRequest("{} is located in", "Paris", "France", target_true=" France")])

"""Typed edit requests, validated before any weight changes."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from fedit.errors import RequestError

_FIELDS = ("prompt", "subject", "target_new", "target_true", "case_id")
_EXAMPLE = ('{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", '
            '"target_new": "English", "target_true": "French"}')
# EasyEdit's form of the same request is accepted too (see :func:`is_easyedit`):
# {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
#  "target_new": "English", "ground_truth": "French", "rephrase_prompt": ..., "locality_prompt": ...}


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should be completed by ``target_new``.

    ``prompt`` holds exactly one ``{}`` where the subject goes. Targets are stored as given;
    :func:`target_text` adds the leading space that a continuation needs.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: str | int | None = None

    def __post_init__(self):
        where = f"request {self.case_id!r}" if self.case_id is not None else "request"
        for name in ("prompt", "subject", "target_new"):
            val = getattr(self, name)
            if not isinstance(val, str):
                raise RequestError(f"{where}: field '{name}' must be a string, got {type(val).__name__}.",
                                   f"give it as text, e.g. {_EXAMPLE}")
            if not val.strip():
                raise RequestError(f"{where}: field '{name}' is empty.", f"give a non-empty {name}.")
        if self.target_true is not None and (not isinstance(self.target_true, str) or not self.target_true.strip()):
            raise RequestError(f"{where}: field 'target_true' must be a non-empty string when given.",
                               "leave it out or give the current answer, e.g. \"French\".")
        n = self.prompt.count("{}")
        if n != 1:
            raise RequestError(
                f"{where}: field 'prompt' must contain exactly one '{{}}' where the subject goes; "
                f"found {n} in {self.prompt!r}.",
                "write the prompt as e.g. \"The mother tongue of {} is\" and put the subject in 'subject'.")
        if self.prompt.replace("{}", "").count("{") or self.prompt.replace("{}", "").count("}"):
            raise RequestError(f"{where}: field 'prompt' has a stray brace besides '{{}}': {self.prompt!r}.",
                               "remove the other '{' or '}' characters.")
        if self.subject.strip() != self.subject:
            raise RequestError(f"{where}: field 'subject' has leading or trailing spaces: {self.subject!r}.",
                               "strip the spaces; the prompt carries the spacing around '{}'.")

    @classmethod
    def build(cls, prompt: str, subject: str, target_new: str, target_true: str | None = None,
              case_id: str | int | None = None) -> "EditRequest":
        """Like the constructor, but a prompt that spells the subject out instead of ``{}``
        ("The Eiffel Tower is in" with subject "Eiffel Tower") is accepted when the subject
        occurs in it exactly once."""
        if isinstance(prompt, str) and isinstance(subject, str) and "{}" not in prompt and subject.strip():
            prompt = template_from_sentence(prompt, subject)
        return cls(prompt=prompt, subject=subject, target_new=target_new, target_true=target_true, case_id=case_id)

    # --- derived text -----------------------------------------------------------------
    @property
    def filled_prompt(self) -> str:
        return self.prompt.format(self.subject)

    @staticmethod
    def target_text(target: str) -> str:
        """A continuation target starts with a space unless it already starts with whitespace."""
        return target if target[:1].isspace() else " " + target

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any], index: int | None = None) -> "EditRequest":
        where = f"request #{index}" if index is not None else "request"
        if not isinstance(d, dict):
            raise RequestError(f"{where} is a {type(d).__name__}, not an object.", f"write each request as {_EXAMPLE}")
        d = _normalise_known_schemas(d, where)
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise RequestError(f"{where} has unknown field(s) {unknown}.",
                               f"use only {list(_FIELDS)}; e.g. {_EXAMPLE}")
        missing = [k for k in ("prompt", "subject", "target_new") if k not in d]
        if missing:
            raise RequestError(f"{where} is missing field(s) {missing}.", f"write it as {_EXAMPLE}")
        if "case_id" not in d and index is not None:
            d = {**d, "case_id": index}
        return cls(**d)


# EasyEdit request fields that say how an edit is measured, not what it writes: accepted in
# request dicts and left to the Editor / evaluation (``fedit.editor``), never part of the edit.
EASYEDIT_PROBE_FIELDS = ("rephrase_prompt", "rephrase_prompts", "locality_prompt", "locality_ground_truth",
                         "portability_prompt", "portability_ground_truth", "locality", "portability")
# What EasyEdit writes when no ground truth is known.
EASYEDIT_NO_ANSWER = "<|endoftext|>"


def is_easyedit(d: dict[str, Any]) -> bool:
    """An EasyEdit-style request: ``ground_truth`` or measurement fields, or a prompt that spells
    the subject out instead of holding ``{}``."""
    if "requested_rewrite" in d:
        return False
    prompt = d.get("prompt")
    spelled = isinstance(prompt, str) and "{}" not in prompt and isinstance(d.get("subject"), str)
    return spelled or "ground_truth" in d or any(k in d for k in EASYEDIT_PROBE_FIELDS)


def template_from_sentence(prompt: str, subject: str, where: str = "request") -> str:
    """EasyEdit's prompt (the subject written out) as fedit's template: the subject -> ``{}``.

    Refuses a prompt that does not contain the subject, or contains it more than once."""
    n = prompt.count(subject) if subject else 0
    if n == 1:
        return prompt.replace(subject, "{}")
    fix = ("spell the subject in the prompt exactly as in 'subject' (EasyEdit style) or mark its place with '{}' "
           "(\"{} is located in\")." if n == 0 else
           "mark the place of the edited occurrence with '{}' and spell the others out.")
    raise RequestError(f"{where}: the subject {subject!r} occurs {n} times in the prompt {prompt!r} and the prompt "
                       "has no '{}'; a prompt that spells the subject out must contain it exactly once.", fix)


def _from_easyedit(d: dict[str, Any], where: str) -> dict[str, Any]:
    """The edit part of an EasyEdit request: prompt as a template, ``ground_truth`` as
    ``target_true`` (the first one of a list; EasyEdit's ``<|endoftext|>`` placeholder as none);
    measurement fields dropped."""
    out = {k: v for k, v in d.items() if k not in EASYEDIT_PROBE_FIELDS and k != "ground_truth"}
    prompt, subject = d.get("prompt"), d.get("subject")
    if isinstance(prompt, str) and isinstance(subject, str) and "{}" not in prompt:
        out["prompt"] = template_from_sentence(prompt, subject, where)
    truth = d.get("ground_truth")
    if isinstance(truth, list):
        truth = truth[0] if truth else None
    if truth is not None and truth != EASYEDIT_NO_ANSWER:
        out["target_true"] = truth
    return out


def _normalise_known_schemas(d: dict[str, Any], where: str = "request") -> dict[str, Any]:
    """Accept the ROME/MEMIT ``requested_rewrite`` shape, as in CounterFact records, and
    EasyEdit's request dicts (:func:`is_easyedit`)."""
    if is_easyedit(d):
        return _from_easyedit(d, where)
    if "requested_rewrite" in d and isinstance(d["requested_rewrite"], dict):
        rw = d["requested_rewrite"]

        def text(x):
            return x["str"] if isinstance(x, dict) and "str" in x else x

        out = {"prompt": rw.get("prompt"), "subject": rw.get("subject"), "target_new": text(rw.get("target_new"))}
        if rw.get("target_true") is not None:
            out["target_true"] = text(rw["target_true"])
        if "case_id" in d:
            out["case_id"] = d["case_id"]
        return out
    return d


def load_requests(path: str | Path) -> list[EditRequest]:
    """Read requests from a JSON list, a single JSON object, or JSONL (one object per line)."""
    p = Path(path)
    if not p.exists():
        raise RequestError(f"requests file {p} does not exist.", "check the path given to --requests.")
    if p.is_dir():
        raise RequestError(f"requests file {p} is a folder.", "give the path of one JSON or JSONL file.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"requests file {p} is not UTF-8 text.",
                           "save it as UTF-8 JSON (a list of requests, or one object per line).") from None
    except OSError as e:
        raise RequestError(f"cannot read requests file {p}: {e.strerror or e}.", "check its permissions.") from e
    try:
        data = json.loads(text)
    except RecursionError:
        raise RequestError(f"{p} nests JSON too deeply to be a list of requests.", f"write a JSON list like [{_EXAMPLE}].") from None
    except ValueError:  # not one JSON value (or a number over Python's digit limit): try JSONL
        data = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except (ValueError, RecursionError) as e:
                raise RequestError(f"{p}: line {lineno} is not valid JSON ({getattr(e, 'msg', e)}).",
                                   "write a JSON list of requests, or one JSON object per line (JSONL).") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise RequestError(f"{p} holds no requests.", f"write a JSON list like [{_EXAMPLE}].")
    return [EditRequest.from_dict(d, i) for i, d in enumerate(data)]


def as_requests(items: Iterable[EditRequest | dict]) -> list[EditRequest]:
    """Accept requests or plain dicts; raise on an empty list (see :func:`check_batch` for
    duplicates and conflicts)."""
    out = [r if isinstance(r, EditRequest) else EditRequest.from_dict(r, i) for i, r in enumerate(items)]
    if not out:
        raise RequestError("no edit requests were given.", "pass at least one request.")
    return out


def check_batch(requests: list[EditRequest]) -> list[EditRequest]:
    """The requests of one batch, with exact duplicates merged (logged as a warning).

    Refused: two different targets for the same subject and prompt (which should win is the
    user's call), and a target equal to the request's own ``target_true`` (nothing to edit).
    """
    seen: dict[tuple[str, str], EditRequest] = {}
    out, merged = [], 0
    for r in requests:
        where = f"request {r.case_id!r}" if r.case_id is not None else f"request for {r.subject!r}"
        if r.target_true is not None and r.target_true.strip() == r.target_new.strip():
            raise RequestError(f"{where}: target_new {r.target_new!r} equals target_true, the current answer; "
                               "there is nothing to edit.", "give a new target that differs from target_true.")
        key = (r.prompt, r.subject)
        prev = seen.get(key)
        if prev is None:
            seen[key] = r
            out.append(r)
        elif prev.target_new.strip() == r.target_new.strip():
            merged += 1
        else:
            raise RequestError(f"two targets for the same subject and prompt in one batch: {r.subject!r} in "
                               f"{r.prompt!r} -> {prev.target_new!r} and {r.target_new!r}.",
                               "keep only the target that should win, or edit them in separate sequential batches.")
    if merged:
        log.warning("%d duplicate request(s) in the batch were merged; %d distinct remain.", merged, len(out))
    return out


REQUEST_FIELDS = tuple(f.name for f in fields(EditRequest))

"""Load the standard fact-editing datasets into :class:`~fedit.data.records.EvalRecord` lists.

One loader per file format (``kind``), all behind :func:`load_records`. ``path=None`` loads the
small sample shipped in ``fedit/resources/datasets`` (provenance in its ``SOURCES.md``); full
files are read from a path the user gives. Nothing here downloads: :func:`fetch_instructions`
only says where the canonical files live.

Every malformed input raises :class:`DatasetError` naming the file, the record index (and
case id), the field, and the fix. The mapping from each format to requests, paraphrases,
neighbourhood and portability probes is documented in ``docs/datasets.md``.
"""

from __future__ import annotations

import json
import logging
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Iterator

from fedit.data.records import EvalRecord, Probe
from fedit.errors import FeditError, RequestError
from fedit.requests import EditRequest

log = logging.getLogger(__name__)

KINDS = ("counterfact", "counterfact-easyedit", "zsre", "mquake", "known_1000", "easyedit")

_SAMPLES = {
    "counterfact": "counterfact_sample.json",
    "counterfact-easyedit": "counterfact_easyedit_sample.json",
    "easyedit": "counterfact_easyedit_sample.json",
    "zsre": "zsre_sample.json",
    "mquake": "mquake_sample.json",
    "known_1000": "known_1000_sample.json",
}

# One line per kind, quoted in errors so that a user sees what a record should look like.
_SCHEMAS = {
    "counterfact": '{"case_id", "requested_rewrite": {"prompt" (with "{}"), "subject", "relation_id", '
                   '"target_new": {"str"}, "target_true": {"str"}}, "paraphrase_prompts": [...], '
                   '"neighborhood_prompts": [...], "attribute_prompts", "generation_prompts", "portability" (optional)}',
    "counterfact-easyedit": '{"case_id", "prompt" (subject filled in), "subject", "target_new", "ground_truth", '
                            '"rephrase_prompt", "locality_prompt", "locality_ground_truth"}',
    "easyedit": '{"prompt" (subject filled in), "subject", "target_new", optional "ground_truth", '
                '"rephrase_prompt", "locality_prompt"/"locality_ground_truth", '
                '"portability_prompt"/"portability_ground_truth"}',
    "zsre": '{"subject", "src", "alt", "answers": [...], "rephrase", "loc", "loc_ans", '
            'optional "pred", "cond", "portability"}',
    "mquake": '{"case_id", "requested_rewrite": [{"prompt", "subject", "target_new": {"str"}, '
              '"target_true": {"str"}, ...}, ...], "questions": [...], "new_answer", ...}',
    "known_1000": '{"known_id", "subject", "attribute", "template" (with "{}"), "prediction", "prompt", "relation_id"}',
}

_MEMIT_DSETS = "https://memit.baulab.info/data/dsets/"
_MQUAKE_RAW = "https://raw.githubusercontent.com/princeton-nlp/MQuAKE/main/datasets/"
_EASYEDIT_BUNDLE = "https://drive.google.com/file/d/1WRo2SqqgNtZF11Vq0sF5nL_-bHi18Wi4/view"
_BUNDLE_RAW = ("https://raw.githubusercontent.com/leonz-z/EasyEdit/"
               "5d49c472bd4b8447a70d276fb577d28088588e62/dataset/edit_data/")
_BUNDLE_COPY = "A copy of the bundle's files is committed in the GitHub repository leonz-z/EasyEdit:\n"
_MET_RAW = "https://raw.githubusercontent.com/furonglegend/Met/3cafe6f48801444aae7bb353367821671967782a/data/"
_WHERE = {  # one line each, for error messages; fetch_instructions() says more
    "counterfact": f"{_MEMIT_DSETS}counterfact.json (or multi_counterfact.json).",
    "zsre": f"{_MEMIT_DSETS}zsre_mend_eval.json.",
    "known_1000": f"{_MEMIT_DSETS}known_1000.json.",
    "mquake": "the datasets/ folder of github.com/princeton-nlp/MQuAKE.",
    "counterfact-easyedit": f"EasyEdit's editing-data bundle (zjunlp/EasyEdit README): {_EASYEDIT_BUNDLE}",
    "easyedit": f"EasyEdit's editing-data bundle (zjunlp/EasyEdit README): {_EASYEDIT_BUNDLE}",
}


class DatasetError(FeditError):
    """A dataset file is missing, not JSON, or holds a record that does not fit its format."""


# --- public API --------------------------------------------------------------------------

def load_records(kind: str, path: str | Path | None = None, n: int | None = None, *,
                 skip_invalid: bool = False) -> list[EvalRecord]:
    """Read a local dataset file of format ``kind`` (one of :data:`KINDS`) into evaluation records.

    Only files on disk are read; nothing is fetched (``fedit datasets`` says where to get the
    full files).

    ``path=None`` loads the sample shipped with fedit for that kind. ``n`` keeps the first
    ``n`` records (for ``"mquake"``, records are edits: a case with 4 edits gives 4 records in
    a row, so ``n`` may cut a case short). With ``skip_invalid=True`` a record that cannot be
    turned into a valid request is logged and left out instead of raising; a file that is not
    a JSON list always raises. Raises :class:`DatasetError`.
    """
    kind = _check_kind(kind)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise DatasetError(f"n must be a non-negative whole number or None, got {n!r}.",
                           "pass e.g. n=100 to keep the first 100 records, or leave it out for all.")
    p = sample_path(kind) if path is None else Path(path).expanduser()
    data = _read_json_list(p, kind)
    convert = _CONVERTERS[kind]
    out: list[EvalRecord] = []
    skipped = 0
    for i, raw in enumerate(data):
        if n is not None and len(out) >= n:
            break
        try:
            for rec in convert(raw, _Ctx(p, kind, i, raw)):
                if n is not None and len(out) >= n:
                    break
                out.append(rec)
        except DatasetError as e:
            if not skip_invalid:
                raise
            skipped += 1
            log.warning("skipping: %s", e.problem)
    if skipped:
        log.warning("%s: skipped %d of %d records that could not be read as %s.", p, skipped, len(data), kind)
    return out


def sample_path(kind: str) -> Path:
    """Where the sample shipped with fedit for ``kind`` lies."""
    kind = _check_kind(kind)
    return Path(str(files("fedit").joinpath("resources/datasets", _SAMPLES[kind])))


def fetch_instructions(kind: str) -> str:
    """How to get the canonical full file(s) for ``kind`` (text only; fedit downloads nothing)."""
    kind = _check_kind(kind)
    if kind == "counterfact":
        body = (
            "CounterFact (ROME/MEMIT schema) is published by the ROME/MEMIT authors:\n"
            f"  {_MEMIT_DSETS}counterfact.json        (21,919 records)\n"
            f"  {_MEMIT_DSETS}multi_counterfact.json  (20,877 records; MEMIT's mass-editing set)\n"
            "For example:\n"
            f"  curl -L -o counterfact.json {_MEMIT_DSETS}counterfact.json\n"
            "The one-hop portability variant (counterfact_portability_gpt4.json) is in EasyEdit's\n"
            f"editing-data bundle (portability/One Hop/), linked from the zjunlp/EasyEdit README:\n  {_EASYEDIT_BUNDLE}\n"
            f"{_BUNDLE_COPY}  curl -L -o counterfact_portability_gpt4.json '{_BUNDLE_RAW}portability/One%20Hop/"
            "counterfact_portability_gpt4.json'\n  (1,031 records, sha256 fac215b3…c5ed)\n"
            "counterfact_500.json (500 records drawn at random, seed 42, from counterfact.json; fedit's docs\n"
            "measure on it) is data/counterfact_500.json in the GitHub repository furonglegend/Met:\n"
            f"  curl -L -o counterfact_500.json {_MET_RAW}counterfact_500.json\n  (sha256 99a455fe…5803)\n")
    elif kind == "zsre":
        body = (
            "zsRE in the MEND/MEMIT eval schema is published by the ROME/MEMIT authors:\n"
            f"  {_MEMIT_DSETS}zsre_mend_eval.json\n"
            "For example:\n"
            f"  curl -L -o zsre_mend_eval.json {_MEMIT_DSETS}zsre_mend_eval.json\n"
            "The one-hop portability variant (zsre_mend_eval_portability_gpt4.json) is in EasyEdit's\n"
            f"editing-data bundle (portability/One Hop/), linked from the zjunlp/EasyEdit README:\n  {_EASYEDIT_BUNDLE}\n"
            f"{_BUNDLE_COPY}  curl -L -o zsre_mend_eval_portability_gpt4.json '{_BUNDLE_RAW}portability/One%20Hop/"
            "zsre_mend_eval_portability_gpt4.json'\n  (1,037 records, sha256 0cf155da…ecd9)\n")
    elif kind == "known_1000":
        body = (
            "known_1000 (the causal-tracing facts of ROME; 1,209 records despite the name):\n"
            f"  {_MEMIT_DSETS}known_1000.json\n"
            "For example:\n"
            f"  curl -L -o known_1000.json {_MEMIT_DSETS}known_1000.json\n")
    elif kind == "mquake":
        body = (
            "MQuAKE is in the datasets/ folder of the GitHub repository princeton-nlp/MQuAKE\n"
            "(https://github.com/princeton-nlp/MQuAKE/tree/main/datasets): MQuAKE-CF-3k-v2.json,\n"
            "MQuAKE-CF-3k.json, MQuAKE-CF.json and MQuAKE-T.json. For example:\n"
            f"  curl -L -o MQuAKE-CF-3k-v2.json {_MQUAKE_RAW}MQuAKE-CF-3k-v2.json\n")
    else:  # counterfact-easyedit, easyedit
        body = (
            "EasyEdit's data bundle ('editing-data': counterfact/counterfact-{edit,train,val}.json,\n"
            "zsre/, portability/, locality/) is linked from the README of the GitHub repository\n"
            "zjunlp/EasyEdit (Google Drive; a BaiduNetDisk mirror is linked there too):\n"
            f"  {_EASYEDIT_BUNDLE}\n"
            "Download the archive with a browser (or `gdown 1WRo2SqqgNtZF11Vq0sF5nL_-bHi18Wi4`) and unzip it.\n"
            f"{_BUNDLE_COPY}  curl -L -o counterfact-edit.json {_BUNDLE_RAW}counterfact/counterfact-edit.json\n"
            "  (10,000 records, sha256 20c225e6…b967)\n"
            "The three counterfact/ splits together hold all 21,919 CounterFact rewrites. The zsre/ and\n"
            "portability/One Hop/ files are in the MEND/ROME schemas: load them with kind 'zsre' or 'counterfact'.\n")
    return (f"{body}"
            f"Then pass the file's path: `fedit eval --dataset {kind} --data FILE.json ...` or, in Python,\n"
            f"load_records({kind!r}, 'FILE.json').\n"
            f"Without a path, fedit uses its shipped sample ({_SAMPLES[kind]}).")


# --- reading -----------------------------------------------------------------------------

def _check_kind(kind: str) -> str:
    if isinstance(kind, str):
        key = kind.strip().lower().replace("_", "-")
        for k in KINDS:
            if k.replace("_", "-") == key:
                return k
    raise DatasetError(f"unknown dataset kind {kind!r}.", f"use one of {', '.join(KINDS)}.")


def _read_json_list(p: Path, kind: str) -> list:
    if not p.exists():
        raise DatasetError(f"dataset file {p} does not exist.",
                           f"check the path, or leave it out to use the shipped {kind} sample. "
                           f"The full file: {_WHERE[kind]}")
    if p.is_dir():
        raise DatasetError(f"{p} is a folder, not a dataset file.", "give the path of one JSON file.")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DatasetError(f"{p} is not UTF-8 text.", f"give a JSON file of {kind} records.") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{p} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).",
                           f"give a JSON list of {kind} records, each like {_SCHEMAS[kind]}.") from None
    except (ValueError, RecursionError) as e:  # a number over Python's digit limit, nesting too deep
        raise DatasetError(f"{p} cannot be read as JSON ({type(e).__name__}: {str(e)[:80]}).",
                           f"give a JSON list of {kind} records, each like {_SCHEMAS[kind]}.") from None
    if not isinstance(data, list):
        raise DatasetError(f"{p} holds {_a(_json_type(data))} (JSON), not a list of records.",
                           f"give a JSON list of {kind} records, each like {_SCHEMAS[kind]}.")
    return data


def _json_type(x: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "number" if isinstance(x, (int, float)) else type(x).__name__)


class _Ctx:
    """Where a record comes from, to name it in errors."""

    def __init__(self, path: Path, kind: str, index: int, raw: Any):
        self.path, self.kind, self.index, self.raw = path, kind, index, raw
        self.case_id = None
        if isinstance(raw, dict):
            self.case_id = raw.get("case_id", raw.get("known_id"))
        if not isinstance(raw, dict):
            raise self.error(None, f"is {_a(_json_type(raw))} (JSON), not an object")

    @property
    def where(self) -> str:
        cid = f" (case_id {self.case_id!r})" if self.case_id is not None else ""
        return f"{self.path}: record #{self.index}{cid}"

    def error(self, field: str | None, problem: str, fix: str | None = None) -> DatasetError:
        what = f": field '{field}' {problem}" if field else f" {problem}"
        if fix is None:
            guess = _guess_kind(self.raw)
            if guess and guess != self.kind and {guess, self.kind} != {"easyedit", "counterfact-easyedit"}:
                fix = (f"this record looks like a '{guess}' record: load the file with kind '{guess}'. "
                       f"A {self.kind} record looks like {_SCHEMAS[self.kind]}.")
            else:
                fix = (f"correct or remove the record (a {self.kind} record looks like {_SCHEMAS[self.kind]}), "
                       "or pass skip_invalid=True to leave out records that cannot be read.")
        return DatasetError(f"{self.where}{what}.", fix)

    # typed field access; ``obj`` defaults to the record, ``name`` is the dotted name for errors
    def get(self, obj: dict, key: str, name: str | None = None, *, kind: type | tuple = str,
            required: bool = True, nonempty: bool = True) -> Any:
        name = name or key
        if key not in obj or obj[key] is None:
            if required:
                raise self.error(name, "is missing")
            return None
        val = obj[key]
        if not isinstance(val, kind) or isinstance(val, bool):
            want = "/".join(_json_type(t()) for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.error(name, f"must be {_a(want)}, got {_a(_json_type(val))} ({_short(val)})")
        if nonempty and isinstance(val, str) and not val.strip():
            raise self.error(name, "is empty")
        return val

    def texts(self, obj: dict, key: str, name: str | None = None, *, required: bool = True) -> list[str]:
        """A list of non-empty strings (a single string counts as a list of one)."""
        name = name or key
        val = self.get(obj, key, name, kind=(list, str), required=required)
        if val is None:
            return []
        items = [val] if isinstance(val, str) else val
        for j, t in enumerate(items):
            if not isinstance(t, str) or not t.strip():
                raise self.error(f"{name}[{j}]", f"must be a non-empty string, got {_short(t)}")
        return list(items)

    def target(self, obj: dict, key: str, name: str) -> str:
        """A CounterFact target: ``{"str": ..., "id": ...}`` (a plain string is accepted too)."""
        val = self.get(obj, key, name, kind=(dict, str))
        if isinstance(val, dict):
            return self.get(val, "str", f"{name}.str")
        return val

    def request(self, build: Callable[[], EditRequest], mapping: str) -> EditRequest:
        try:
            return build()
        except RequestError as e:
            raise DatasetError(f"{self.where}: cannot make an edit request from it ({mapping}): {e.problem}",
                               e.fix or "correct or remove the record.") from None


def _guess_kind(raw: Any) -> str | None:
    """Which format a record looks like, to suggest the right ``kind`` in errors."""
    if not isinstance(raw, dict):
        return None
    rw = raw.get("requested_rewrite")
    if isinstance(rw, list):
        return "mquake"
    if isinstance(rw, dict):
        return "counterfact"
    if "src" in raw and "alt" in raw:
        return "zsre"
    if "known_id" in raw or ("template" in raw and "attribute" in raw):
        return "known_1000"
    if "prompt" in raw and "target_new" in raw:
        return "counterfact-easyedit" if "locality_ground_truth" in raw and "ground_truth" in raw else "easyedit"
    return None


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _short(x: Any, limit: int = 60) -> str:
    s = json.dumps(x, ensure_ascii=False)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _template(ctx: _Ctx, prompt: str, subject: str, prompt_field: str) -> str:
    """Turn a prompt with the subject written out into one with ``{}`` (first occurrence)."""
    if "{}" in prompt:
        return prompt
    at = prompt.find(subject)
    if at < 0:
        raise ctx.error(prompt_field, f"does not contain the subject {subject!r} ({prompt!r})",
                        f"the {prompt_field} must spell the subject exactly as 'subject' does, or mark its place "
                        "with '{}'; correct or remove the record.")
    return prompt[:at] + "{}" + prompt[at + len(subject):]


def _portability(ctx: _Ctx, rec: dict) -> tuple[Probe, ...]:
    """EasyEdit's one-hop ``portability: {"New Question", "New Answer"}`` (or a list of them)."""
    val = ctx.get(rec, "portability", kind=(dict, list), required=False)
    if val is None:
        return ()
    items = [val] if isinstance(val, dict) else val
    out = []
    for j, item in enumerate(items):
        name = "portability" if isinstance(val, dict) else f"portability[{j}]"
        if not isinstance(item, dict):
            raise ctx.error(name, f"must be an object with 'New Question' and 'New Answer', got {_short(item)}")
        out.append(Probe(ctx.get(item, "New Question", f"{name}.New Question"),
                         ctx.get(item, "New Answer", f"{name}.New Answer")))
    return tuple(out)


def _source(ctx: _Ctx) -> str:
    return f"{ctx.kind}:{ctx.path.name}"


# --- one converter per kind: raw record -> EvalRecords ------------------------------------

def _counterfact(rec: dict, ctx: _Ctx) -> Iterator[EvalRecord]:
    rw = ctx.get(rec, "requested_rewrite", kind=dict)
    prompt = ctx.get(rw, "prompt", "requested_rewrite.prompt")
    subject = ctx.get(rw, "subject", "requested_rewrite.subject")
    new = ctx.target(rw, "target_new", "requested_rewrite.target_new")
    true = ctx.target(rw, "target_true", "requested_rewrite.target_true")
    case_id = ctx.get(rec, "case_id", kind=(int, str), required=False)
    case_id = ctx.index if case_id is None else case_id
    req = ctx.request(lambda: EditRequest(prompt=prompt, subject=subject, target_new=new, target_true=true,
                                          case_id=case_id),
                      "prompt, subject, target_new.str, target_true.str of requested_rewrite")
    extra = {k: rec[k] for k in ("pararel_idx",) if k in rec}
    for side in ("target_new", "target_true"):
        if isinstance(rw.get(side), dict) and "id" in rw[side]:
            extra[f"{side}_id"] = rw[side]["id"]
    if isinstance(rec.get("portability"), dict) and "Recalled Relation" in rec["portability"]:
        extra["recalled_relation"] = rec["portability"]["Recalled Relation"]
    yield EvalRecord(
        request=req,
        paraphrases=tuple(ctx.texts(rec, "paraphrase_prompts")),
        neighborhood=tuple(Probe(p, true) for p in ctx.texts(rec, "neighborhood_prompts")),
        generation_prompts=tuple(ctx.texts(rec, "generation_prompts", required=False)),
        attribute_prompts=tuple(ctx.texts(rec, "attribute_prompts", required=False)),
        portability=_portability(ctx, rec),
        relation_id=ctx.get(rw, "relation_id", "requested_rewrite.relation_id", required=False),
        source=_source(ctx),
        extra=extra,
    )


def _pairs(ctx: _Ctx, rec: dict, pkey: str, akey: str) -> tuple[Probe, ...]:
    """Probes from EasyEdit's parallel prompt/answer fields (strings or equal-length lists).

    An answer that is itself a list (aliases) contributes its first entry."""
    prompts = ctx.texts(rec, pkey, required=False)
    if not prompts:
        return ()
    if akey not in rec or rec[akey] is None:
        raise ctx.error(akey, f"is missing (it gives the expected answers of '{pkey}')")
    raw = rec[akey]
    answers = [raw] if isinstance(raw, str) else raw
    if not isinstance(answers, list):
        raise ctx.error(akey, f"must be a string or a list, got {_a(_json_type(raw))}")
    if len(prompts) == 1 and isinstance(raw, list) and len(answers) > 1 and all(isinstance(a, str) for a in answers):
        answers = answers[:1]  # one prompt, several aliases of its answer
    if len(answers) != len(prompts):
        raise ctx.error(akey, f"has {len(answers)} answers for {len(prompts)} prompts in '{pkey}'",
                        f"give one answer per prompt of '{pkey}'.")
    out = []
    for j, a in enumerate(answers):
        if isinstance(a, list) and a:
            a = a[0]
        if not isinstance(a, str) or not a.strip():
            raise ctx.error(f"{akey}[{j}]" if isinstance(raw, list) else akey,
                            f"must be a non-empty string, got {_short(a)}")
        out.append(Probe(prompts[j], a))
    return tuple(out)


def _easyedit(rec: dict, ctx: _Ctx) -> Iterator[EvalRecord]:
    prompt = ctx.get(rec, "prompt")
    subject = ctx.get(rec, "subject")
    new = ctx.get(rec, "target_new")
    true = ctx.get(rec, "ground_truth", kind=(str, list), required=False)
    if isinstance(true, list):
        true = true[0] if true and isinstance(true[0], str) and true[0].strip() else None
    template = _template(ctx, prompt, subject, "prompt")
    case_id = ctx.get(rec, "case_id", kind=(int, str), required=False)
    case_id = ctx.index if case_id is None else case_id
    req = ctx.request(lambda: EditRequest(prompt=template, subject=subject, target_new=new, target_true=true,
                                          case_id=case_id),
                      "prompt with the subject replaced by '{}', subject, target_new, ground_truth")
    portability = _pairs(ctx, rec, "portability_prompt", "portability_ground_truth") + _portability(ctx, rec)
    yield EvalRecord(
        request=req,
        paraphrases=tuple(ctx.texts(rec, "rephrase_prompt", required=False)),
        neighborhood=_pairs(ctx, rec, "locality_prompt", "locality_ground_truth"),
        portability=portability,
        relation_id=ctx.get(rec, "relation_id", required=False),
        source=_source(ctx),
    )


def _counterfact_easyedit(rec: dict, ctx: _Ctx) -> Iterator[EvalRecord]:
    """EasyEdit's CounterFact split files: the generic EasyEdit format with every field present."""
    for key in ("ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth"):
        ctx.get(rec, key)
    yield from _easyedit(rec, ctx)


def _zsre(rec: dict, ctx: _Ctx) -> Iterator[EvalRecord]:
    subject = ctx.get(rec, "subject")
    src = ctx.get(rec, "src")
    alt = ctx.get(rec, "alt")
    answers = ctx.texts(rec, "answers", required=False)
    template = _template(ctx, src, subject, "src")
    case_id = ctx.get(rec, "case_id", kind=(int, str), required=False)
    case_id = ctx.index if case_id is None else case_id
    req = ctx.request(lambda: EditRequest(prompt=template, subject=subject, target_new=alt,
                                          target_true=answers[0] if answers else None, case_id=case_id),
                      "prompt = src with the subject replaced by '{}', subject, target_new = alt, "
                      "target_true = answers[0]")
    extra = {k: rec[k] for k in ("pred", "cond") if k in rec}
    extra["answers"] = answers
    if isinstance(rec.get("portability"), dict) and "Recalled Relation" in rec["portability"]:
        extra["recalled_relation"] = rec["portability"]["Recalled Relation"]
    yield EvalRecord(
        request=req,
        paraphrases=(ctx.get(rec, "rephrase"),),
        neighborhood=(Probe(ctx.get(rec, "loc"), ctx.get(rec, "loc_ans")),),
        portability=_portability(ctx, rec),
        source=_source(ctx),
        extra=extra,
    )


def _mquake(rec: dict, ctx: _Ctx) -> Iterator[EvalRecord]:
    case_id = ctx.get(rec, "case_id", kind=(int, str))
    rewrites = ctx.get(rec, "requested_rewrite", kind=list)
    if not rewrites:
        raise ctx.error("requested_rewrite", "is an empty list")
    questions = ctx.texts(rec, "questions")
    new_answer = ctx.get(rec, "new_answer")
    aliases = rec.get("new_answer_alias") or []
    portability = tuple(Probe(q, new_answer) for q in questions)
    # Check every edit of the case before yielding any, so a bad case never half-loads.
    built = []
    for k, rw in enumerate(rewrites):
        name = f"requested_rewrite[{k}]"
        if not isinstance(rw, dict):
            raise ctx.error(name, f"must be an object, got {_short(rw)}")
        prompt = ctx.get(rw, "prompt", f"{name}.prompt")
        subject = ctx.get(rw, "subject", f"{name}.subject")
        new = ctx.target(rw, "target_new", f"{name}.target_new")
        true = ctx.target(rw, "target_true", f"{name}.target_true")
        question = ctx.get(rw, "question", f"{name}.question", required=False)
        req = ctx.request(lambda: EditRequest(prompt=prompt, subject=subject, target_new=new, target_true=true,
                                              case_id=f"{case_id}:{k}"),
                          f"prompt, subject, target_new.str, target_true.str of {name}")
        built.append(EvalRecord(
            request=req,
            paraphrases=(question,) if question else (),
            portability=portability,
            relation_id=ctx.get(rw, "relation_id", f"{name}.relation_id", required=False),
            source=_source(ctx),
            extra={"case_id": case_id, "edit_index": k, "n_edits": len(rewrites), "questions": questions,
                   "new_answer": new_answer, "new_answer_alias": list(aliases),
                   "answer": rec.get("answer"), "answer_alias": list(rec.get("answer_alias") or []),
                   "new_single_hops": rec.get("new_single_hops")},
        ))
    yield from built


def _known(rec: dict, ctx: _Ctx) -> Iterator[EvalRecord]:
    known_id = ctx.get(rec, "known_id", kind=(int, str))
    subject = ctx.get(rec, "subject")
    attribute = ctx.get(rec, "attribute")
    template = ctx.get(rec, "template")
    req = ctx.request(lambda: EditRequest(prompt=template, subject=subject, target_new=attribute,
                                          target_true=attribute, case_id=known_id),
                      "prompt = template, subject, target_new = target_true = attribute")
    yield EvalRecord(
        request=req,
        relation_id=ctx.get(rec, "relation_id", required=False),
        source=_source(ctx),
        extra={"prompt": rec.get("prompt"), "prediction": rec.get("prediction")},
    )


_CONVERTERS: dict[str, Callable[[dict, _Ctx], Iterator[EvalRecord]]] = {
    "counterfact": _counterfact,
    "counterfact-easyedit": _counterfact_easyedit,
    "easyedit": _easyedit,
    "zsre": _zsre,
    "mquake": _mquake,
    "known_1000": _known,
}

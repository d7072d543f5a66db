"""EasyEdit's edit inputs as cases: the request to write and the prompts that measure it.

Two input forms, as EasyEdit has them: parallel lists (``prompts``, ``target_new``,
``subject``, ``ground_truth``, ``rephrase_prompts``, ``locality_inputs``,
``portability_inputs``, as ``BaseEditor.edit`` takes them) and request dicts (EasyEdit's data
files, or the ``requested_rewrite`` records of its metrics). Everything is validated here,
before any weight changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from fedit.data.records import Probe
from fedit.errors import RequestError
from fedit.requests import EASYEDIT_NO_ANSWER, EditRequest

# Keys EasyEdit gives the locality / portability probes of flat request fields.
FLAT_LOCALITY_KEY = "neighborhood"
FLAT_PORTABILITY_KEY = "one_hop"


@dataclass(frozen=True)
class Case:
    """One edit request with its measurement prompts.

    ``rephrase``: rewordings of the prompt that should now give ``target_new``;
    ``locality`` / ``portability``: probes by EasyEdit key (``"neighborhood"``, ``"one_hop"`` ...),
    each a prompt and the answer scored under teacher forcing.
    """

    request: EditRequest
    rephrase: tuple[str, ...] = ()
    locality: dict[str, tuple[Probe, ...]] = field(default_factory=dict)
    portability: dict[str, tuple[Probe, ...]] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The request as EasyEdit reports it (``requested_rewrite``): the prompt with the
        subject written out, ``ground_truth`` (EasyEdit's placeholder when unknown), probes."""
        req = self.request
        out: dict[str, Any] = {
            "prompt": req.filled_prompt, "target_new": req.target_new,
            "ground_truth": req.target_true if req.target_true is not None else EASYEDIT_NO_ANSWER,
            "portability": _probe_record(self.portability), "locality": _probe_record(self.locality),
            "subject": req.subject,
        }
        if self.rephrase:
            out["rephrase_prompt"] = self.rephrase[0] if len(self.rephrase) == 1 else list(self.rephrase)
        return out


def _probe_record(probes: dict[str, tuple[Probe, ...]]) -> dict[str, dict[str, Any]]:
    def one(xs):
        return xs[0] if len(xs) == 1 else list(xs)

    return {k: {"prompt": one([p.prompt for p in ps]), "ground_truth": one([p.answer for p in ps])}
            for k, ps in probes.items()}


def _listify(name: str, value: Any, n: int) -> list:
    """A per-request field: one value for a single request, or a list of one per request."""
    if isinstance(value, (str, dict)) or value is None:
        value = [value] * n if n == 1 or value is None else value
    if not isinstance(value, (list, tuple)) or len(value) != n:
        got = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
        raise RequestError(f"'{name}' must give one entry per prompt ({n}), got {got}.",
                           f"pass a list of {n} entries (or a single string for a single prompt).")
    return list(value)


def _texts(name: str, value: Any) -> tuple[str, ...]:
    """A string or a list of strings (one probe or several)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) and x.strip() for x in items):
        raise RequestError(f"'{name}' must be a non-empty string or a list of them, got {value!r}.",
                           "give the prompt text(s).")
    return tuple(items)


def _answer(name: str, value: Any) -> str:
    """An expected answer; a list of aliases contributes its first entry (as EasyEdit scores it)."""
    while isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"'{name}' must be a non-empty string (or a list of aliases), got {value!r}.",
                           "give the answer text expected after the prompt.")
    return value


def _probes(name: str, prompts: Any, answers: Any) -> tuple[Probe, ...]:
    """Probes from a prompt (or list) and its answer (or list, aliases allowed per answer)."""
    ps = _texts(f"{name}.prompt", prompts)
    if isinstance(answers, str) or (len(ps) == 1 and isinstance(answers, list)
                                    and not any(isinstance(a, list) for a in answers)):
        answers = [answers]
    if not isinstance(answers, (list, tuple)) or len(answers) != len(ps):
        raise RequestError(f"'{name}' has {len(ps)} prompt(s) but the ground truth {answers!r} does not give one "
                           "answer per prompt.", f"give '{name}.ground_truth' as a list of {len(ps)} answers.")
    return tuple(Probe(p, _answer(f"{name}.ground_truth", a)) for p, a in zip(ps, answers))


def _keyed(kind: str, inputs: Any, n: int) -> list[dict[str, tuple[Probe, ...]]]:
    """EasyEdit's ``locality_inputs`` / ``portability_inputs``:
    ``{key: {"prompt": [one per request], "ground_truth": [one per request]}}``; an entry may be
    a list of prompts (several probes for that request) or None (no probe for it)."""
    out: list[dict[str, tuple[Probe, ...]]] = [{} for _ in range(n)]
    if inputs is None:
        return out
    if not isinstance(inputs, dict):
        raise RequestError(f"'{kind}' must be a dict like {{'neighborhood': {{'prompt': [...], "
                           f"'ground_truth': [...]}}}}, got {type(inputs).__name__}.", "pass it in EasyEdit's shape.")
    for key, spec in inputs.items():
        if not isinstance(spec, dict) or set(spec) != {"prompt", "ground_truth"}:
            raise RequestError(f"'{kind}[{key!r}]' must be a dict with exactly 'prompt' and 'ground_truth'.",
                               f"write it as {{'{key}': {{'prompt': [...], 'ground_truth': [...]}}}}.")
        prompts = [spec["prompt"]] if isinstance(spec["prompt"], str) else spec["prompt"]
        truths = [spec["ground_truth"]] if isinstance(spec["prompt"], str) else spec["ground_truth"]
        if not isinstance(prompts, list) or not isinstance(truths, list) or not len(prompts) == len(truths) == n:
            raise RequestError(f"'{kind}[{key!r}]' must give one prompt and one ground truth per edit request ({n}).",
                               "one entry per request (None where a request has no such probe).")
        for i, (p, a) in enumerate(zip(prompts, truths)):
            if p is not None:
                out[i][key] = _probes(f"{kind}[{key!r}][{i}]", p, a)
    return out


def cases_from_lists(prompts: Any, target_new: Any, subject: Any = None, ground_truth: Any = None,
                     rephrase_prompts: Any = None, locality_inputs: Any = None,
                     portability_inputs: Any = None) -> list[Case]:
    """Cases from ``BaseEditor.edit``'s arguments (EasyEdit's ``_prepare_requests`` shape).

    ``prompts`` spell the subject out ("The Eiffel Tower is located in") or hold ``{}``;
    ``subject`` is required (fedit's methods locate the subject in the prompt)."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise RequestError("'prompts' must be a non-empty string or list of strings.", "pass the prompts to edit.")
    n = len(prompts)
    if subject is None:
        raise RequestError("no 'subject' was given; fedit's methods edit what the model recalls about the subject "
                           "and need to find it in each prompt.",
                           "pass subject=[...] with one subject per prompt, spelled as in the prompt.")
    targets = _listify("target_new", target_new, n)
    subjects = _listify("subject", subject, n)
    truths = _listify("ground_truth", ground_truth, n)
    rephrases = _listify("rephrase_prompts", rephrase_prompts, n) if rephrase_prompts is not None else [None] * n
    locs = _keyed("locality_inputs", locality_inputs, n)
    ports = _keyed("portability_inputs", portability_inputs, n)
    out = []
    for i in range(n):
        d = {"prompt": prompts[i], "subject": subjects[i], "target_new": targets[i], "case_id": i}
        if truths[i] is not None:
            d["ground_truth"] = truths[i]
        req = EditRequest.from_dict(d, i)
        reph = _texts(f"rephrase_prompts[{i}]", rephrases[i]) if rephrases[i] is not None else ()
        out.append(Case(req, reph, locs[i], ports[i]))
    return out


def _flat_or_keyed(d: dict, kind: str, flat_key: str, where: str) -> dict[str, tuple[Probe, ...]]:
    """A request dict's probes of one kind: ``<kind>_prompt`` / ``<kind>_ground_truth`` (under
    ``flat_key``) and/or ``<kind>: {key: {"prompt", "ground_truth"}}``; a ``portability`` of
    ``{"New Question", "New Answer"}`` (EasyEdit's one-hop files) is read too."""
    out: dict[str, tuple[Probe, ...]] = {}
    if d.get(f"{kind}_prompt") is not None:
        out[flat_key] = _probes(f"{where}.{kind}_prompt", d[f"{kind}_prompt"], d.get(f"{kind}_ground_truth"))
    nested = d.get(kind)
    if nested is None or nested == {}:
        return out
    items = nested if isinstance(nested, list) else [nested]
    if all(isinstance(x, dict) and "New Question" in x for x in items):
        out[flat_key] = out.get(flat_key, ()) + tuple(
            Probe(_texts(f"{where}.{kind}.New Question", x["New Question"])[0],
                  _answer(f"{where}.{kind}.New Answer", x.get("New Answer"))) for x in items)
        return out
    if not isinstance(nested, dict):
        raise RequestError(f"{where}: '{kind}' must be a dict of probes by key, got {type(nested).__name__}.",
                           f"write it as {{'{flat_key}': {{'prompt': ..., 'ground_truth': ...}}}}.")
    for key, spec in nested.items():
        if not isinstance(spec, dict) or "prompt" not in spec or "ground_truth" not in spec:
            raise RequestError(f"{where}: '{kind}[{key!r}]' must hold 'prompt' and 'ground_truth'.",
                               f"write it as {{'{key}': {{'prompt': ..., 'ground_truth': ...}}}}.")
        out[key] = _probes(f"{where}.{kind}[{key!r}]", spec["prompt"], spec["ground_truth"])
    return out


def case_from_dict(d: EditRequest | dict[str, Any], index: int) -> Case:
    """A case from a request dict (fedit's, CounterFact's or EasyEdit's) or an :class:`EditRequest`."""
    if isinstance(d, EditRequest):
        return Case(d)
    req = EditRequest.from_dict(d, index)  # validates and refuses unknown fields
    where = f"request #{index}"
    reph = d.get("rephrase_prompts", d.get("rephrase_prompt"))
    return Case(req, _texts(f"{where}.rephrase_prompt", reph) if reph is not None else (),
                _flat_or_keyed(d, "locality", FLAT_LOCALITY_KEY, where),
                _flat_or_keyed(d, "portability", FLAT_PORTABILITY_KEY, where))


def cases_from_dicts(items: Sequence[EditRequest | dict[str, Any]]) -> list[Case]:
    out = [case_from_dict(d, i) for i, d in enumerate(items)]
    if not out:
        raise RequestError("no edit requests were given.", "pass at least one request.")
    return out

"""What an evaluation dataset record holds, whatever file format it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedit.requests import EditRequest


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer expected from it (teacher-forced)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EvalRecord:
    """One edit with the prompts that measure it.

    - ``request``: the edit (prompt with ``{}``, subject, target_new, target_true when known).
    - ``paraphrases``: rewordings of the edited prompt (subject filled in); they should now
      give ``request.target_new``.
    - ``neighborhood``: prompts about other subjects with the same relation; their answers
      must not change. For CounterFact the expected answer is the edited record's
      ``target_true`` (the neighbours share it); for zsRE it is ``loc_ans``.
    - ``generation_prompts``: prompts for fluency/consistency generations (CounterFact).
    - ``portability``: questions whose answers follow from the edit (multi-hop, one-hop).
    - ``relation_id``: Wikidata relation where the source has one (used to split clients).
    """

    request: EditRequest
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[Probe, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    portability: tuple[Probe, ...] = ()
    relation_id: str | None = None
    source: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def case_id(self):
        return self.request.case_id

"""The library's front door: edit a loaded model with a named method.

    lm = fedit.load_model()                      # gemma-3-270m, offline
    out = fedit.edit(lm, [req], method="rome")   # computes and applies
    out.applied.revert()                         # bit-identical weights again
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from fedit.deltas import AppliedEdit, WeightDeltas
from fedit.methods import EditOutcome, Resources, get_method, hparams_for
from fedit.requests import EditRequest, as_requests, check_batch


@dataclass
class EditResult:
    outcome: EditOutcome
    applied: AppliedEdit | None

    @property
    def deltas(self):
        return self.outcome.deltas


def edit(lm, requests: Iterable[EditRequest | dict], method: str = "memit", hparams: Any = None,
         overrides: dict[str, Any] | None = None, hparams_file: str | Path | None = None,
         resources: Resources | None = None, apply: bool = True, state: Any = None,
         check: bool = True) -> EditResult:
    """Compute an edit with ``method`` and (by default) apply it to ``lm.model`` in place.

    Requests are validated before anything is computed. ``hparams`` (an instance of the
    method's hyperparameter class) wins over ``overrides``/``hparams_file``. ``state`` is for
    stateful methods (AlphaEdit): the ``outcome.state`` of the previous sequential batch, or
    None for the first; other methods ignore it. The new state is ``result.outcome.state``.
    With ``check`` (default) exact duplicates are merged with a warning and conflicting targets
    or a target equal to ``target_true`` are refused (:func:`fedit.requests.check_batch`);
    benchmark runs pass ``check=False`` to edit dataset records as the dataset gives them.
    """
    reqs = check_batch(as_requests(requests)) if check else as_requests(requests)
    m = get_method(method)
    hp = hparams if hparams is not None else hparams_for(m.name, lm, overrides, hparams_file)
    outcome = m.run(lm, reqs, hp, resources or Resources(), state=state)
    applied = None
    if apply:
        outcome.deltas.with_originals(lm.model)
        applied = outcome.deltas.apply(lm.model)
    return EditResult(outcome=outcome, applied=applied)


def sequential_edit(lm, batches: Iterable[Iterable[EditRequest | dict]], method: str = "memit",
                    **kwargs) -> list[EditResult]:
    """Apply batches one after another, each computed on the model edited by the ones before.

    A stateful method's state (AlphaEdit's keys of earlier edits) is carried from each batch
    to the next.
    """
    results: list[EditResult] = []
    state = kwargs.pop("state", None)
    for b in batches:
        results.append(edit(lm, b, method=method, apply=True, state=state, **kwargs))
        state = results[-1].outcome.state
    return results


def combined(lm, results: list[EditResult], requests: list[EditRequest]) -> WeightDeltas:
    """One :class:`WeightDeltas` for several applied edits (e.g. sequential batches).

    The delta of each parameter is its current value minus its value before the first edit
    that touched it; those first values are kept as the originals, for exact revert.
    """
    if len(results) == 1:
        return results[0].deltas
    if getattr(results[-1].deltas, "kind", None) is not None:  # a MemoryEdit: the last holds the whole memory
        return results[-1].deltas
    originals: dict = {}
    for r in results:
        for n, o in r.applied.originals.items():
            originals.setdefault(n, o)
    params = dict(lm.model.named_parameters())
    first = results[0].deltas
    return WeightDeltas(deltas={n: (params[n].detach() - o).cpu() for n, o in originals.items()},
                        method=first.method, model=first.model, requests=[r.to_dict() for r in requests],
                        hparams=first.hparams, originals={n: o.cpu() for n, o in originals.items()})

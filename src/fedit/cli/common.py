"""What every ``fedit`` command shares: the parser class, flags, loading, output and errors.

A command module (``cli/<command>.py``) exposes ``register(subparsers)`` and ``run(args)``;
it builds its parser with :func:`add_command` and the flag groups here, and prints with
:func:`emit`. Only this package configures logging, progress bars and output.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Any, Callable

from fedit.errors import FeditError

log = logging.getLogger("fedit.cli")


# --- parser -------------------------------------------------------------------------------

class UsageError(Exception):
    """Bad command-line arguments (argparse's error), raised instead of exiting."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        self.parser, self.prog, self.message = parser, parser.prog, message
        super().__init__(f"{parser.prog}: error: {message}")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are raised (as :class:`UsageError`), so that
    ``main`` can print them as JSON under ``--json``; sub-parsers inherit the class."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(self, message)


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help where it has a default and the help does
    not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text.lower() or not action.option_strings
                or default is None or default is False or default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def add_command(sub, name: str, help: str, **kw) -> argparse.ArgumentParser:
    """A sub-command parser with fedit's help formatter; ``help`` is also its description."""
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter, **kw)


# --- flag groups --------------------------------------------------------------------------

def output_flags(p: argparse.ArgumentParser) -> None:
    """``--json`` and ``--verbose`` (every command has them)."""
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON object on stdout (errors too) and no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO) on stderr")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars on stderr (--json implies it)")


def model_flags(p: argparse.ArgumentParser, model: bool = True) -> None:
    """Model, device, precision, cache and threads, then :func:`output_flags`."""
    from fedit.models.loading import DEFAULT_MODEL

    if model:
        p.add_argument("--model", default=None,
                       help=f"built-in name, local folder or hub name (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA when present, else cpu)")
    p.add_argument("--dtype", default=None,
                   help="weights: float32, bfloat16, float16, or auto (the checkpoint's own); editing math stays "
                        "float32/float64 (default: float32)")
    p.add_argument("--device-map", default=None, choices=["auto"],
                   help="auto: spread the model over every GPU, then the CPU (accelerate), e.g. a 7B model in "
                        "bfloat16 (default: one device)")
    p.add_argument("--cache-dir", default=None,
                   help="cache for models, statistics, templates (default: $FEDIT_CACHE or ~/.cache/fedit)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often faster on a shared machine)")
    output_flags(p)


def hparams_flags(p: argparse.ArgumentParser, what: str = "the method's") -> None:
    """``--layers``, ``--hparams FILE``, ``--set KEY=VALUE`` and ``--target-precision``."""
    from fedit.methods.hparams import PRECISIONS

    p.add_argument("--layers", default=None,
                   help="comma-separated layers to edit (default: the model's hyperparameter file)")
    p.add_argument("--hparams", default=None, metavar="FILE",
                   help=f"JSON file of {what} hyperparameters, over the model's file (default: none)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", dest="set",
                   help="set one hyperparameter, typed by its field (repeatable; applied last; default: none; "
                        "`fedit hparams show METHOD` lists them)")
    p.add_argument("--target-precision", default=None, choices=PRECISIONS,
                   help="precision of target optimisation (default: the hyperparameter file's, float32); "
                        "bfloat16 is ~1.4x faster on CPUs with AMX and on GPUs")


def corpus_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default=None,
                   help="text file or folder for second moments (default: the shipped WikiText-2 sample)")


def target_cache_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-cache", default=None, metavar="DIR",
                   help="keep optimised target vectors in DIR and reuse them (default: none; an interrupted run "
                        "resumes; a sweep of λ or of lower layers re-solves without re-optimising)")


def method_flag(p: argparse.ArgumentParser, choices: list[str], default: str = "memit", extra: str = "") -> None:
    """``--method`` with choices from the registry (:func:`fedit.methods.names`)."""
    p.add_argument("--method", default=default, choices=choices,
                   help=f"editing method{extra} (`fedit hparams list` describes them)")


def edit_flags(p: argparse.ArgumentParser, choices: list[str]) -> None:
    """What ``edit`` and ``eval`` share: method, hyperparameters, corpus, target cache."""
    method_flag(p, choices)
    hparams_flags(p)
    corpus_flag(p)
    target_cache_flag(p)
    p.add_argument("--editor", default=None, metavar="DIR",
                   help="the trained editor of a method that needs one (MEND, KE, SERAC; written by `fedit train`; "
                        "default: the hyperparameter file's archive)")


def population_flags(p: argparse.ArgumentParser, clients: int, rounds: int, records: str) -> None:
    """The words ``fed run`` and ``collab run`` share: ``--clients``, ``--rounds`` (alias
    ``--slots``, FedEdit's time slots), ``--records-per-client`` (alias ``--n-per-client``; all
    rounds together) or ``--per-client`` (each round). ``records`` says the default in words."""
    p.add_argument("--clients", type=int, default=clients, help="number of clients (organisations)")
    p.add_argument("--rounds", "--slots", dest="rounds", type=int, default=rounds,
                   help="rounds of editing (FedEdit's time slots; --slots is the same flag)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--records-per-client", "--n-per-client", dest="records_per_client", type=int, default=None,
                   help=f"records each client edits over all rounds (--n-per-client is the same flag; default: {records})")
    g.add_argument("--per-client", dest="per_round", type=int, default=None,
                   help="records each client edits in each round: --per-client K is --records-per-client K×rounds "
                        "(default: see --records-per-client)")


def records_per_client(args, default: int) -> int:
    """Records per client over all rounds, from ``--records-per-client`` or ``--per-client``."""
    if args.per_round is not None:
        return args.per_round * args.rounds
    return default if args.records_per_client is None else args.records_per_client


# --- from flags to objects ----------------------------------------------------------------

def parse_layers(text: str | None) -> list[int] | None:
    """``--layers 3,4,5`` as ``[3, 4, 5]`` (None when not given)."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FeditError(f"--layers {text!r} is not a list of integers.", "write it like --layers 3,4,5") from None


def sets_from(args, method: str) -> dict[str, Any]:
    """``--set KEY=VALUE`` items typed by ``method``'s hyperparameter class."""
    from fedit.methods import get_method
    from fedit.methods.hparams import parse_sets

    return parse_sets(get_method(method).hparams_class, getattr(args, "set", None))


def overrides_from(args, method: str | None = None) -> dict:
    """Hyperparameter overrides given on the command line: ``--layers``, ``--target-precision``
    (None where not given), then ``--set`` (typed by ``method``'s class, when given)."""
    out = {"layers": parse_layers(getattr(args, "layers", None)),
           "target_precision": getattr(args, "target_precision", None)}
    if getattr(args, "editor", None):  # a trained editor (MEND, KE, SERAC)
        out["archive"] = args.editor
    if method is not None:
        out.update(sets_from(args, method))
    return out


def resolve_hparams(args, lm, method: str, form: str | None = None):
    """``(hparams, sources)``: what ``method`` will use on ``lm`` with this command line and
    where each value came from (:func:`fedit.methods.hparams.resolve_hparams`)."""
    import dataclasses

    from fedit.methods import get_method
    from fedit.methods.hparams import resolve_hparams as resolve

    m = get_method(method)
    hp, sources = resolve(m.hparams_class, m.name, lm.name, lm.model_type, lm.adapter.n_layers,
                          overrides_from(args), getattr(args, "hparams", None), sets_from(args, method))
    if form is not None and getattr(hp, "form", form) != form:
        hp, sources = dataclasses.replace(hp, form=form), {**sources, "form": f"fixed by the command ({form})"}
    return hp, sources


def resources_from(args):
    from fedit.methods import Resources

    return Resources(cache_dir=args.cache_dir, corpus=getattr(args, "corpus", None), progress=not args.json,
                     target_cache=getattr(args, "target_cache", None))


def load(args):
    """The model of ``--model`` (default: the built-in one) with ``--device``/``--dtype``."""
    from fedit.models.loading import DEFAULT_MODEL, load_model
    from fedit.paths import cache_root

    cache_root(args.cache_dir)  # a cache folder that is a file or not writable: refused before loading
    return load_model(args.model or DEFAULT_MODEL, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
                      device_map=getattr(args, "device_map", None))


def provenance(lm=None, **kw) -> dict:
    """:func:`fedit.provenance.describe`, for the ``"provenance"`` key of outputs and reports."""
    from fedit.provenance import describe

    return describe(lm, **kw)


# --- output -------------------------------------------------------------------------------

def strict_json(obj):
    """``obj`` with every NaN/Inf float replaced by None, so that it prints as valid JSON
    (``null``) rather than the bare ``NaN`` no JSON parser accepts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def emit(args, obj: dict, text: str) -> None:
    """Print ``obj`` as one JSON line under ``--json`` (with at least fedit's version as
    provenance; NaN/Inf as ``null``), else ``text``."""
    if args.json:
        obj = obj if "provenance" in obj else {**obj, "provenance": provenance()}
        sys.stdout.write(json.dumps(strict_json(obj), allow_nan=False) + "\n")
    else:
        sys.stdout.write(text.rstrip() + "\n")


def say(args, tag: str) -> Callable[[str], None]:
    """A printer of what a long run is doing, as log lines (INFO: shown with ``--verbose``); the
    progress bars show the same to everyone else."""
    return lambda s: log.info("[%s] %s", tag, s)


def table(rows: list[dict]) -> str:
    """Rows ``{"text", "target", "before", "after"}`` as a before/after table."""
    lines = [f"{'prompt':<58} {'target':<14} {'before p':>9} {'top':<12} {'after p':>9} {'top':<12}"]
    for r in rows:
        b, a = r["before"], r.get("after", r["before"])
        lines.append(f"{r['text'][:58]:<58} {r['target'][:14]:<14} {b['target_prob']:>9.4f} {b['top_token'][:12]!r:<12} "
                     f"{a['target_prob']:>9.4f} {a['top_token'][:12]!r:<12}")
    return "\n".join(lines)


def probe(lm, rows: list[dict], key: str) -> None:
    """Set ``row[key] = {"target_prob", "top_token"}`` for every row's text and target."""
    from fedit.core.probe import describe

    for r in rows:
        d = describe(lm, r["text"], r["target"])
        r[key] = {"target_prob": d["target_prob"], "top_token": d["top_token"]}


def request_rows(requests) -> list[dict]:
    """Table rows of edit requests (probe them with :func:`probe`)."""
    return [{"request": r, "text": r.filled_prompt, "target": r.target_new} for r in requests]


def rows_json(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["request"].prompt, "subject": r["request"].subject, "target": r["target"],
             "before": r["before"], "after": r["after"]} for r in rows]


# --- running a command --------------------------------------------------------------------

def configure(args) -> None:
    """Logging, threads and Hugging Face progress bars, from the common flags."""
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Flower's own handler prints its warnings; its DEBUG lines reach ours only with --verbose
    logging.getLogger("flwr").propagate = bool(getattr(args, "verbose", False))
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "json", False) or getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # also in the processes this one starts (Ray workers)


def error_object(e: BaseException) -> dict:
    """The JSON error object: ``{"error", "problem", "fix", "type", "exit_code"}``."""
    if isinstance(e, UsageError):
        return {"error": str(e), "problem": e.message, "fix": f"see `{e.prog} --help`.", "type": "UsageError",
                "exit_code": 2}
    if isinstance(e, FeditError):
        return {"error": str(e), "problem": e.problem, "fix": e.fix, "type": type(e).__name__, "exit_code": 2}
    return {"error": f"{type(e).__name__}: {e}", "problem": str(e), "fix": None, "type": type(e).__name__,
            "exit_code": 1}


def fail(e: BaseException, as_json: bool) -> int:
    """Report ``e`` (one JSON object on stdout under ``--json``, a line on stderr always) and
    return its exit code: 2 for bad input (usage or :class:`FeditError`), 1 otherwise."""
    obj = error_object(e)
    if as_json:
        sys.stdout.write(json.dumps(obj) + "\n")
    if isinstance(e, UsageError):
        sys.stderr.write(f"{e.parser.format_usage()}{e}\n")
    else:
        sys.stderr.write(f"fedit: error: {e}\n")
    return obj["exit_code"]

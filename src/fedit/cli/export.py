"""``fedit export`` and the output flags of ``fedit edit`` (``--format peft``, ``--out``).

``fedit export FILE --peft DIR`` turns a saved delta file into a PEFT LoRA adapter;
``fedit edit ... --save DIR --format peft`` does so for the edit just made, falling back to
the dense delta file (``DIR/edit.safetensors``) when the edit's rank is too high for a
smaller low-rank form; ``fedit edit --out DIR`` writes the edited model folder.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fedit.errors import FeditError

log = logging.getLogger("fedit.cli")
FORMATS = ("safetensors", "peft")
DENSE_FALLBACK = "edit.safetensors"


def edit_args(p) -> None:
    """The output flags of ``fedit edit`` (besides ``--save``)."""
    p.add_argument("--format", default="safetensors", choices=FORMATS,
                   help="format of --save: safetensors (dense deltas + originals, for fedit apply/revert; default) "
                        "or peft (a PEFT LoRA adapter folder, exact low-rank factors)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write the edited model to this folder (loadable with --model, like fedit apply --out)")


def check_edit_outputs(args) -> None:
    """Refuse inconsistent output flags before any work."""
    from fedit.methods import get_method

    if (args.out or args.format == "peft") and not get_method(args.method).writes_weights:
        raise FeditError(f"{args.method} edits through hooks, not weights: a model folder (--out) or a PEFT "
                         "adapter (--format peft) cannot hold it.",
                         "save the edit with --save FILE.safetensors and apply it after loading the model, "
                         "or use a method that writes weights (fedit hparams list).")
    if args.format == "peft":
        if not args.save:
            raise FeditError("--format peft needs --save DIR (the adapter folder).",
                             "add --save DIR, e.g. --save ./eiffel-lora --format peft")
        if str(args.save).endswith(".safetensors"):
            raise FeditError(f"--save {args.save} with --format peft: a PEFT adapter is a folder.",
                             "give a folder name, e.g. --save ./eiffel-lora")
        from fedit.extras import require

        require("peft", "peft")
    elif args.save:
        from fedit.atomic import check_out_file

        check_out_file(args.save)
    from fedit.cli.apply import check_out

    check_out(args.out)


def save_edit(args, lm, make_deltas) -> dict:
    """Write what ``--save/--format/--out`` ask for; return the JSON fields that say where.

    ``make_deltas()`` builds the :class:`~fedit.deltas.WeightDeltas` (only called when needed).
    """
    out: dict = {}
    wd = make_deltas() if args.save or args.out else None
    if args.save:
        try:
            if args.format == "peft":
                out.update(_save_peft(wd, args.save))
            else:
                wd.save(args.save)
                out.update(saved=str(args.save), format="safetensors")
        except FeditError as e:
            redo = "fedit export {kept} --peft {target}" if args.format == "peft" else "mv {kept} {target}"
            raise _kept(e, wd, args.save, getattr(args, "cache_dir", None), redo) from e
    if args.out:
        from fedit.cli.apply import save_model

        try:
            save_model(lm, args.out, lm.identity())
        except FeditError as e:
            if args.save:  # the edit itself is already saved
                raise
            raise _kept(e, wd, args.out, getattr(args, "cache_dir", None), "fedit apply {kept} --out {target}") from e
        out["out"] = str(args.out)
    return out


def _kept(error: FeditError, wd, target, cache_dir, redo: str) -> FeditError:
    """After the edit was computed, writing ``target`` failed (the folder became unwritable, the
    disk filled): keep the edit in the cache folder so that nothing is lost, and say where
    (``redo``: the command that finishes the job, with ``{kept}`` and ``{target}``). Returns the error to raise (the original one when the edit cannot be kept either)."""
    from fedit.paths import cache_root

    try:
        kept = cache_root(cache_dir) / "unsaved" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.safetensors"
        wd.save(kept)
    except FeditError as e2:
        log.warning("could not keep the computed edit in the cache either: %s", e2)
        return error
    log.warning("the computed edit was kept in %s", kept)
    again = redo.format(kept=kept, target=target)
    return FeditError(f"{error.problem} The computed edit was kept in {kept}.",
                      f"nothing needs recomputing: once {target} can be written, {again}.")


def describe(saved: dict) -> str:
    """One line of text for what :func:`save_edit` wrote."""
    parts = []
    if "saved" in saved:
        what = {"peft": "PEFT adapter", "safetensors": "deltas"}[saved["format"]]
        parts.append(f"{what} saved to {saved['saved']}"
                     + (f" (rank {saved['rank']})" if saved["format"] == "peft" else ""))
    if saved.get("fallback"):
        parts.append(saved["fallback"])
    if "out" in saved:
        parts.append(f"edited model written to {saved['out']}")
    return "; ".join(parts)


def _save_peft(wd, folder: str) -> dict:
    from fedit.export import RankTooHighError, export_peft

    try:
        info = export_peft(wd, folder)
    except RankTooHighError as e:
        dense = Path(folder) / DENSE_FALLBACK
        wd.save(dense)
        msg = f"no PEFT adapter: {e.problem} The dense edit is in {dense} (fedit apply {dense})."
        log.warning(msg)
        return {"saved": str(dense), "format": "safetensors", "fallback": msg, "ranks": e.ranks}
    return {"saved": str(folder), "format": "peft", "rank": info.rank, "ranks": info.ranks,
            "adapter_numbers": info.adapter_numbers, "dense_numbers": info.dense_numbers}


def register(sub) -> None:
    from fedit.cli import common

    p = common.add_command(sub, "export", "turn a saved edit (.safetensors deltas) into a PEFT LoRA adapter folder")
    p.add_argument("file", help="an edit file written by fedit edit --save FILE.safetensors")
    p.add_argument("--peft", required=True, metavar="DIR", help="the adapter folder to write")
    p.add_argument("--base-model", default=None,
                   help="base_model_name_or_path recorded in adapter_config.json (default: the edit's model name)")
    common.output_flags(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from fedit.cli import common
    from fedit.deltas import WeightDeltas
    from fedit.export import RankTooHighError, export_peft
    from fedit.extras import require

    require("peft", "peft")
    wd = WeightDeltas.load(args.file)
    try:
        info = export_peft(wd, args.peft, base_model=args.base_model)
    except RankTooHighError as e:
        raise FeditError(e.problem, f"keep {args.file}, the dense edit (fedit apply {args.file}); "
                                    "or edit fewer facts per layer.") from e
    obj = {"file": args.file, **info.to_dict()}
    text = (f"wrote a PEFT LoRA adapter of rank {info.rank} for {len(info.target_modules)} module(s) to {info.path} "
            f"({info.adapter_numbers:,} numbers instead of {info.dense_numbers:,}); load it with "
            f"peft.PeftModel.from_pretrained(base_model, {str(info.path)!r})")
    common.emit(args, obj, text)
    return 0

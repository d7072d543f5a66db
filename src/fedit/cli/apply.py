"""``fedit apply``: apply a saved edit to a model (and keep the edited model as a folder)."""

from __future__ import annotations

import json

from fedit.cli import common


def register(sub) -> None:
    file_command(sub, "apply", "apply a saved edit to a model", run,
                 file="a .safetensors edit written by `fedit edit --save`",
                 out="write the edited model to this folder (loadable with --model; default: memory only)",
                 force="apply even if the base weights differ or the delta is over 100 times its weight's norm")


def file_command(sub, name: str, help: str, run, *, file: str, out: str, force: str) -> None:
    """A command over a saved edit: ``FILE``, ``--out DIR``, ``--force`` and the model flags."""
    p = common.add_command(sub, name, help)
    common.model_flags(p)
    p.add_argument("file", help=file)
    p.add_argument("--out", help=out)
    p.add_argument("--force", action="store_true", help=force)
    p.set_defaults(run=run)


def save_model(lm, folder: str, base: dict) -> None:
    """Write ``lm`` to ``folder`` (weights, tokenizer and the identity of its base model)."""
    from fedit.atomic import new_folder
    from fedit.models.loading import BASE_FILE

    with new_folder(folder) as path:  # complete or not at all: a full disk leaves no half folder
        lm.model.save_pretrained(path)
        lm.tokenizer.save_pretrained(path)
        (path / BASE_FILE).write_text(json.dumps(base, indent=1))


def check_out(folder: str | None) -> None:
    """Refuse a bad ``--out`` folder before any work (a file, foreign files, not writable)."""
    if folder:
        from fedit.atomic import check_out_folder
        from fedit.models.loading import BASE_FILE

        check_out_folder(folder, BASE_FILE)


def file_rows(wd) -> list[dict]:
    """Table rows of the requests a delta file carries."""
    from fedit.requests import EditRequest

    return common.request_rows([EditRequest.from_dict(r) for r in wd.requests])


def file_provenance(lm, wd, path: str) -> dict:
    """Provenance of a result made from a delta file: the model, the edit's method and
    hyperparameters as the file records them, the file and its sha256."""
    from fedit.provenance import data_file

    return common.provenance(lm, method=wd.method, hparams=getattr(wd, "hparams", None),
                             data=data_file(path, "deltas"))


def run(args) -> int:
    from fedit.memory import load_edit, refuse_saving_memory

    wd = load_edit(args.file)
    refuse_saving_memory(wd, args.out)
    check_out(args.out)
    lm = common.load(args)
    rows = file_rows(wd)
    common.probe(lm, rows, "before")
    wd.apply(lm.model, check_base=not args.force, check_norm=not args.force)
    common.probe(lm, rows, "after")
    if args.out:
        save_model(lm, args.out, lm.identity())
    out = {"file": args.file, "model": lm.name, "method": wd.method, "out": args.out,
           "requests": common.rows_json(rows), "provenance": file_provenance(lm, wd, args.file)}
    common.emit(args, out, common.table(rows) + f"\n\napplied {args.file} ({wd.method}) to {lm.name}"
                + kept_where(wd, args.out))
    return 0


def kept_where(edit, out: str | None) -> str:
    """Where the applied edit lives now, and how to keep it (a memory edit has no model folder)."""
    from fedit.memory import is_memory

    if out:
        return f"; edited model written to {out}"
    if is_memory(edit):
        return (" (in memory only: a memory edit lives in hooks, so keep the edit file and apply it"
                " after loading the model)")
    return " (in memory only; pass --out DIR to keep it)"

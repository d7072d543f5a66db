"""``fedit revert``: undo a saved edit on a model that carries it (bit-identical)."""

from __future__ import annotations

from fedit.cli import common


def register(sub) -> None:
    from fedit.cli.apply import file_command

    file_command(sub, "revert", "undo a saved edit on a model that carries it (bit-identical)", run,
                 file="the .safetensors edit the model carries",
                 out="write the reverted model to this folder (default: memory only)",
                 force="revert even if the weights are not exactly base + delta")


def run(args) -> int:
    from fedit.cli.apply import check_out, file_provenance, file_rows, save_model
    from fedit.deltas import revert_file_edit
    from fedit.memory import load_edit, refuse_memory_revert

    wd = load_edit(args.file)
    refuse_memory_revert(wd)
    check_out(args.out)
    lm = common.load(args)
    rows = file_rows(wd)
    common.probe(lm, rows, "before")
    revert_file_edit(lm.model, wd, force=args.force)
    common.probe(lm, rows, "after")
    if args.out:
        save_model(lm, args.out, lm.identity())
    out = {"file": args.file, "model": lm.name, "out": args.out, "requests": common.rows_json(rows),
           "provenance": file_provenance(lm, wd, args.file)}
    common.emit(args, out, common.table(rows) + f"\n\nreverted {args.file} on {lm.name}"
                + (f"; written to {args.out}" if args.out else ""))
    return 0

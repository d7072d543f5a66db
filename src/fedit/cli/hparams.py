"""``fedit hparams list`` and ``fedit hparams show METHOD [--model M]``: the methods, their
hyperparameters on a model, and where each value comes from."""

from __future__ import annotations

from fedit.cli import common


def register(sub) -> None:
    from fedit.methods import names

    p = common.add_command(sub, "hparams", "the editing methods and the hyperparameters they use on a model")
    hsub = p.add_subparsers(dest="hparams_command", required=True, metavar="{list,show}")
    r = common.add_command(hsub, "list", "registered methods with their family, description and model files")
    common.output_flags(r)
    r.set_defaults(run=run_list)
    r = common.add_command(hsub, "show", "resolved hyperparameters of METHOD on a model, and where each came from")
    r.add_argument("method", choices=names(), help="a registered method (`fedit hparams list`)")
    common.model_flags(r)
    common.hparams_flags(r)
    r.set_defaults(run=run_show)


def run_list(args) -> int:
    from fedit.methods import METHODS
    from fedit.methods.hparams import model_files

    rows = [{"name": m.name, "family": m.family, "description": m.description, "model_files": model_files(m.name),
             "capabilities": {k: getattr(m, k) for k in ("stateful", "private_mkvs", "takes_targets",
                                                           "needs_training", "federates")}}
            for m in sorted(METHODS.values(), key=lambda m: m.name)]
    lines = []
    for r in rows:
        caps = ", ".join(k.replace("_", " ") + (f" {v}" if isinstance(v, str) else "")
                         for k, v in r["capabilities"].items() if v)
        lines += [f"{r['name']} ({r['family']}{'; ' + caps if caps else ''}): {r['description']}",
                  f"    model files: {', '.join(r['model_files']) or 'none (defaults, layers chosen by depth)'}"]
    common.emit(args, {"methods": rows}, "\n".join(lines))
    return 0


def run_show(args) -> int:
    common.sets_from(args, args.method)  # refuse a bad --set before loading the model
    lm = common.load(args)
    hp, sources = common.resolve_hparams(args, lm, args.method)
    prov = common.provenance(lm, method=args.method, hparams=hp, sources=sources)
    values = prov["hparams"]
    width = max(len(k) for k in values)
    lines = [f"{args.method} on {lm.name} ({lm.model_type}, {lm.adapter.n_layers} layers):"]
    lines += [f"  {k:<{width}} = {values[k]!r:<24} ← {sources[k]}" for k in values]
    out = {"method": args.method, "model": lm.name, "hparams": values, "sources": sources, "provenance": prov}
    common.emit(args, out, "\n".join(lines))
    return 0

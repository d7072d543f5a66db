"""``fedit edit``: edit facts and show what the model says before and after."""

from __future__ import annotations

import time

from fedit.cli import common
from fedit.cli import export as export_cli
from fedit.errors import FeditError


def register(sub) -> None:
    from fedit.methods import names

    p = common.add_command(sub, "edit", "edit facts and show what the model says before and after")
    common.model_flags(p)
    common.edit_flags(p, names())
    p.add_argument("--prompt", help='prompt with {} for the subject, e.g. "{} is located in"')
    p.add_argument("--subject", help="the subject the prompt is about, e.g. \"Eiffel Tower\"")
    p.add_argument("--target", help="the new answer")
    p.add_argument("--target-true", default=None, help="the current answer (optional; default: none)")
    p.add_argument("--requests", help="JSON/JSONL file of requests (instead of --prompt/--subject/--target)")
    p.add_argument("--sequential", type=int, default=0, metavar="B",
                   help="apply the requests in batches of B, one after another (default: 0, one batch)")
    p.add_argument("--save", help="write the edit (deltas + metadata) to this .safetensors file (default: not saved)")
    export_cli.edit_args(p)  # --format peft, --out DIR
    p.set_defaults(run=run)


def _requests(args):
    from fedit.requests import EditRequest, check_batch, load_requests

    if args.requests:
        if args.prompt or args.subject or args.target:
            raise FeditError("give either --requests FILE or --prompt/--subject/--target, not both.")
        reqs = load_requests(args.requests)
        return reqs if args.sequential else check_batch(reqs)
    missing = [f"--{n}" for n in ("prompt", "subject", "target") if getattr(args, n) is None]
    if missing:
        raise FeditError(f"missing {', '.join(missing)}.",
                         'e.g. fedit edit --prompt "{} is located in the city of" --subject "Eiffel Tower" --target Rome')
    return check_batch([EditRequest.build(args.prompt, args.subject, args.target, args.target_true)])


def run(args) -> int:
    from fedit.api import combined, sequential_edit
    from fedit.core.tokens import validate_for_tokenizer
    from fedit.provenance import data_file

    requests = _requests(args)
    export_cli.check_edit_outputs(args)
    common.sets_from(args, args.method)  # refuse a bad --set before loading the model
    lm = common.load(args)
    validate_for_tokenizer(lm.tokenizer, requests, lm.model)
    hp, sources = common.resolve_hparams(args, lm, args.method)
    rows = common.request_rows(requests)
    common.probe(lm, rows, "before")
    t0 = time.perf_counter()
    batches = ([requests[i:i + args.sequential] for i in range(0, len(requests), args.sequential)]
               if args.sequential else [requests])
    # one after another, a stateful method's state (AlphaEdit's keys) carried between batches
    results = sequential_edit(lm, batches, method=args.method, overrides=common.overrides_from(args, args.method),
                              hparams_file=args.hparams, resources=common.resources_from(args))
    seconds = time.perf_counter() - t0
    common.probe(lm, rows, "after")
    saved = export_cli.save_edit(args, lm, lambda: combined(lm, results, requests))
    out = {"method": args.method, "model": lm.name, "seconds": round(seconds, 3), "requests": common.rows_json(rows)}
    out.update(saved)
    out["provenance"] = common.provenance(lm, method=args.method, hparams=hp, sources=sources,
                                          data=data_file(args.requests, "requests") if args.requests else None)
    text = common.table(rows) + f"\n\n{args.method} on {lm.name}: {len(requests)} request(s) in {seconds:.1f} s"
    if saved:
        text += f"; {export_cli.describe(saved)}"
    common.emit(args, out, text)
    return 0

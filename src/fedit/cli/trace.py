"""``fedit trace``: causal tracing — which layers and tokens carry a fact (heat map)."""

from __future__ import annotations

import time

from fedit.cli import common
from fedit.errors import FeditError


def register(sub) -> None:
    from fedit.core.trace import KINDS

    p = common.add_command(sub, "trace", "causal tracing: which layers and tokens carry a fact (heat map)")
    common.model_flags(p)
    p.add_argument("--prompt", help='prompt with {} for the subject (or spelling it out), e.g. "{} is located in"')
    p.add_argument("--subject", help="the subject whose tokens are corrupted with noise")
    p.add_argument("--answer", default=None, help="answer to score (default: the model's own greedy next token)")
    p.add_argument("--dataset", default=None,
                   help="known_1000: trace facts of a dataset and average the maps (default: one --prompt)")
    p.add_argument("--data", default=None,
                   help="known_1000.json file (default: the sample shipped with fedit; `fedit datasets known_1000`)")
    p.add_argument("--n", type=int, default=20, help="with --dataset: number of facts the model knows to trace")
    p.add_argument("--include-unknown", action="store_true",
                   help="with --dataset: also trace facts whose answer the model does not predict (default: skip them)")
    p.add_argument("--kind", default="all", choices=[*KINDS, "all"],
                   help="state restored: hidden (residual stream), mlp or attn (windows of outputs), or all three")
    p.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn")
    p.add_argument("--samples", type=int, default=10, help="noise samples per prompt")
    p.add_argument("--seed", type=int, default=1, help="seed of the noise")
    p.add_argument("--noise", type=float, default=None,
                   help="noise standard deviation (default: 3x the spread of subject-token embeddings)")
    p.add_argument("--noise-data", default=None,
                   help="known_1000-format file whose subjects set the noise level (default: --data, else the shipped sample)")
    p.add_argument("--edit-layers", type=int, default=None,
                   help="how many consecutive layers to recommend for MEMIT-style methods (default: as many as "
                        "the model's MEMIT hyperparameters edit)")
    p.add_argument("--out", required=True, help="PNG file for the heat map(s)")
    p.set_defaults(run=run)


def _check(args) -> None:
    if args.dataset is None and (args.prompt is None or args.subject is None):
        raise FeditError("give --prompt and --subject, or --dataset known_1000.",
                         'e.g. fedit trace --prompt "The {} is located in the city of" --subject "Eiffel Tower" '
                         "--out trace.png")
    if args.dataset is not None and args.dataset != "known_1000":
        raise FeditError(f"tracing averages over known_1000-format facts, not {args.dataset!r}.",
                         "use --dataset known_1000 (with --data PATH for the full file).")
    if args.n < 1:
        raise FeditError(f"--n {args.n}: trace at least one fact.", "use e.g. --n 20.")


def _noise(args, lm, records) -> float:
    from fedit.data.loaders import load_records
    from fedit.locate import noise_level

    if args.noise is not None:
        return args.noise
    src = args.noise_data or (args.data if args.dataset else None)
    subjects = [r.request.subject for r in load_records("known_1000", src)] if src or records else None
    return noise_level(lm, subjects, cache_dir=args.cache_dir)


def _lines(title: str, out: dict, maps, level: float, samples: int) -> list[str]:
    lines = [title, f"clean p = {maps[0].high:.4f}, corrupted p = {maps[0].low:.4f} (noise {level:.3g}, "
             f"{samples} samples)"]
    for m in maps:
        pk = out["peak"][m.kind]
        where = pk.get("row") or repr(pk.get("token_text"))
        lines.append(f"{m.kind:>6}: peak indirect effect {pk['effect']:.4f} at {where}, layer {pk['layer']}")
    if "recommendation" in out:
        r = out["recommendation"]
        lines.append(f"recommended edit layers: ROME {r['rome_layer']}, MEMIT {r['memit_layers']} ({r['basis']})")
    lines.append(f"heat map written to {out['out']} in {out['seconds']:.1f} s")
    return lines


def run(args) -> int:
    from fedit.core.trace import KINDS
    from fedit.data.loaders import load_records
    from fedit.locate import recommend_layers, trace_prompt, trace_records
    from fedit.locate.plot import draw
    from fedit.provenance import data_file

    kinds = list(KINDS) if args.kind == "all" else [args.kind]
    _check(args)
    records = load_records("known_1000", args.data) if args.dataset else None
    lm = common.load(args)
    level = _noise(args, lm, records)
    t0 = time.perf_counter()
    out: dict = {"model": lm.name, "kinds": kinds, "samples": args.samples, "window": args.window, "seed": args.seed,
                 "noise_level": level}
    if args.dataset:
        from fedit import progress

        with progress.task("tracing facts", total=args.n, unit="fact") as bar:
            res = trace_records(lm, records, args.n, kinds, noise=level, samples=args.samples, window=args.window,
                                seed=args.seed, cache_dir=args.cache_dir, progress=bar.callback(),
                                known_only=not args.include_unknown)
        maps = [res["averages"][k] for k in kinds]
        out.update(mode="dataset", n=len(res["facts"]), scanned=res["scanned"], skipped_unknown=res["skipped"],
                   facts=res["facts"], maps={k: m.to_dict() for k, m in zip(kinds, maps)})
        title = f"{lm.name}: causal traces averaged over {len(res['facts'])} known_1000 facts"
    else:
        res = trace_prompt(lm, args.prompt, args.subject, args.answer, kinds, noise=level, samples=args.samples,
                           window=args.window, seed=args.seed)
        maps = [res[k] for k in kinds]
        out.update(mode="prompt", maps={k: m.to_dict() for k, m in zip(kinds, maps)})
        title = f"{lm.name}: {maps[0].prompt!r} -> {maps[0].answer.strip()!r}"
    out["peak"] = {m.kind: m.peak() for m in maps}
    if "mlp" in kinds:
        k = args.edit_layers
        if k is None:
            from fedit.methods import hparams_for

            k = len(hparams_for("memit", lm).layers)
        out["recommendation"] = recommend_layers(maps[kinds.index("mlp")], k)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["out"] = str(draw(maps, args.out, title))
    out["provenance"] = common.provenance(lm, data=data_file(args.data, "known_1000") if args.dataset else None)
    common.emit(args, out, "\n".join(_lines(title, out, maps, level, args.samples)))
    return 0

"""``fedit collab run``: collaborative editing (CollabEdit) of one model by several clients.

    fedit collab run --clients 10 --rounds 1 --records-per-client 50 --dataset counterfact \\
        --merge collabedit,task-arithmetic,average,ties,fedavg --out runs/collab

By default the clients and the server are Flower apps in Flower's simulation engine
(``--engine flower``; CollabEdit's statistics go through SecAgg+ unless ``--no-secagg``; ``--dp-noise``
adds differential privacy to them); ``--engine local``
runs the same protocol in this process, sharing edit vectors between merge methods.
"""

from __future__ import annotations

import time

from fedit.cli import common
from fedit.errors import FeditError

ENGINES = ("flower", "local")



def _defaults():
    """The run settings' defaults (the one source: :class:`fedit.collab.settings.CollabSettings`)."""
    from fedit.collab.settings import CollabSettings

    return CollabSettings()


def register(sub) -> None:
    """Add ``collab run`` to the ``fedit`` parser."""
    from fedit.collab import MERGES, POLICIES, CollabConfig as C
    from fedit.data.loaders import KINDS

    p = common.add_command(sub, "collab", "collaborative editing: many clients' edits merged into one model (CollabEdit)")
    csub = p.add_subparsers(dest="collab_command", required=True, metavar="{run}")
    r = common.add_command(csub, "run", "split a dataset among clients and rounds, edit, merge, evaluate")
    common.model_flags(r)
    common.hparams_flags(r, "MEMIT")
    common.corpus_flag(r)
    common.target_cache_flag(r)
    S = _defaults()
    common.population_flags(r, S.clients, S.rounds, f"{S.per_client} per round")
    r.add_argument("--dataset", default=S.dataset,
                   help=f"dataset format: {', '.join(k for k in KINDS if k != 'known_1000')}")
    r.add_argument("--data", default=None, help="dataset file (default: the small sample shipped with fedit)")
    r.add_argument("--merge", default=",".join(C.merges),
                   help=f"one or more (comma-separated) of {', '.join(MERGES)}, or 'all'")
    r.add_argument("--conflict-policy", default=C.conflict_policy, choices=POLICIES,
                   help="what to do when clients edit the same subject and relation to different targets")
    r.add_argument("--priority", default=None,
                   help="client ids by priority for --conflict-policy priority, e.g. c3,c0 (default: none)")
    r.add_argument("--overlap", type=float, default=0.0, help="fraction of each client's facts copied from another client")
    r.add_argument("--conflict", type=float, default=0.0,
                   help="fraction of each client's facts that are another client's with a different target")
    r.add_argument("--ties-density", type=float, default=C.ties_density, help="TIES: fraction of each update's entries kept")
    r.add_argument("--ties-scale", type=float, default=C.ties_scale, help="TIES: scaling of the merged update")
    r.add_argument("--no-c1", action="store_true", help="multi-round CollabEdit without the running covariance C₁")
    r.add_argument("--c1-weight", type=float, default=C.c1_weight, help="C₁ += w·KKᵀ (1: equals the global solve)")
    r.add_argument("--residual-tol", type=float, default=C.residual_tol,
                   help="a fact whose ‖z − h‖/‖h‖ is at most this is already said by the model and not edited")
    r.add_argument("--form", default="base", choices=["base", "layerwise"],
                   help="CollabEdit's exchange: base (one per round, the paper's) or layerwise (one per edited layer)")
    r.add_argument("--engine", default="flower", choices=ENGINES,
                   help="flower: clients and server as Flower apps in Flower's simulation; local: in this process")
    r.add_argument("--no-secagg", action="store_true",
                   help="flower engine: send CollabEdit's statistics one by one instead of through SecAgg+ (on by default)")
    r.add_argument("--secagg", action="store_true", help="accepted for old commands: SecAgg+ is on by default")
    r.add_argument("--dp-noise", type=float, default=S.dp_noise, metavar="Z",
                   help="differential privacy of CollabEdit's sums: Gaussian noise multiplier (0: off)")
    r.add_argument("--dp-clip-key", type=float, default=S.dp_clip_key, metavar="C",
                   help="DP: bound on each fact's key norm at every edited layer")
    r.add_argument("--dp-clip-resid", type=float, default=S.dp_clip_resid, metavar="C",
                   help="DP: bound on each fact's residual norm at every edited layer")
    r.add_argument("--dp-delta", type=float, default=S.dp_delta, help="DP: the δ the reported ε is for")
    r.add_argument("--no-reference", action="store_true", help="skip global MEMIT over the union (the reference)")
    r.add_argument("--no-layerwise-reference", action="store_true", help="skip the layer-by-layer MEMIT reference")
    r.add_argument("--seed", type=int, default=0, help="seed for the targets of injected conflicts")
    r.add_argument("--out", required=True, help="folder for report.json, report.md and chart.png")
    r.set_defaults(run=run)


def per_round(args) -> int:
    """Facts per client and round, from ``--per-client`` or ``--records-per-client``."""
    total = common.records_per_client(args, _defaults().per_client * args.rounds)
    if args.rounds < 1 or total % args.rounds:
        raise FeditError(f"{total} records per client do not split evenly over {args.rounds} round(s).",
                         "give --records-per-client a multiple of --rounds, or --per-client (records per round).")
    return total // args.rounds


def _merges(text: str) -> tuple[str, ...]:
    from fedit.collab import MERGES

    names = MERGES if text.strip() == "all" else tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in MERGES]
    if bad or not names:
        raise FeditError(f"unknown merge method(s) {bad or text!r}.", f"use one or more of {', '.join(MERGES)}, or 'all'.")
    return tuple(names)


def run(args) -> int:
    from fedit.collab import CollabConfig, split_plan
    from fedit.collab.driver import run_collab
    from fedit.data.loaders import load_records
    from fedit.evaluate.collab_report import markdown, write
    from fedit.provenance import data_file

    if args.collab_command != "run":
        raise FeditError(f"unknown collab command {args.collab_command!r}.", "use: fedit collab run …")
    t0 = time.perf_counter()
    cfg = CollabConfig(merges=_merges(args.merge), conflict_policy=args.conflict_policy,
                       priority=[x.strip() for x in args.priority.split(",")] if args.priority else None,
                       ties_density=args.ties_density, ties_scale=args.ties_scale, c1=not args.no_c1,
                       c1_weight=args.c1_weight, residual_tol=args.residual_tol, reference=not args.no_reference,
                       layerwise_reference=not args.no_layerwise_reference,
                       dataset="zsre" if args.dataset == "zsre" else "counterfact", form=args.form)
    if args.priority and cfg.conflict_policy != "priority":
        raise FeditError("--priority is only used with --conflict-policy priority.", "add --conflict-policy priority.")
    if args.secagg and (args.engine != "flower" or args.no_secagg):
        raise FeditError("--secagg needs the Flower engine (and contradicts --no-secagg).",
                         "drop --engine local or --secagg; SecAgg+ is on by default with the Flower engine.")
    secagg = args.engine == "flower" and not args.no_secagg and "collabedit" in cfg.merges
    from fedit.collab.secure import MAX_CLIENTS

    if secagg and not 2 <= args.clients <= MAX_CLIENTS:
        raise FeditError(f"SecAgg+ needs 2 to {MAX_CLIENTS} clients, got {args.clients}.",
                         "run with more clients, or add --no-secagg (or --engine local).")
    cfg.dp = _dp(args, secagg)
    cfg.__post_init__()  # DP covers CollabEdit's base form only
    per = per_round(args)
    common.sets_from(args, "memit")  # refuse a bad --set before loading the model
    n_own = per - round(args.overlap * per) - round(args.conflict * per)
    records = load_records(args.dataset, args.data, max(1, args.clients * args.rounds * max(1, n_own)))
    plan = split_plan(records, args.clients, args.rounds, per, args.overlap, args.conflict, args.seed)
    if cfg.priority:
        unknown = [c for c in cfg.priority if c not in plan]
        if unknown:
            raise FeditError(f"--priority names unknown clients {unknown}.", f"client ids are {', '.join(plan)}.")
    lm = common.load(args)
    from fedit.core.tokens import validate_for_tokenizer

    validate_for_tokenizer(lm.tokenizer, [r.request for recs in plan.values() for rr in recs for r in rr], lm.model)
    overrides = common.overrides_from(args, "memit")
    hp, sources = common.resolve_hparams(args, lm, "memit", form="base")
    prov = common.provenance(lm, method="memit", hparams=hp, sources=sources, data=data_file(args.data, args.dataset))
    res = common.resources_from(args)
    say = common.say(args, "collab")
    if args.engine == "local":
        report = run_collab(lm, plan, hp, res, cfg, progress=say)
    else:
        report = _run_flower(args, lm, plan, hp, res, cfg, overrides, say)
    if cfg.dp is not None:
        from fedit.collab.privacy import accounting

        report["privacy"] = accounting(cfg.dp, len(hp.layers))
    report.update(per_client=per, dataset=args.dataset, model=lm.name, overlap=args.overlap, conflict=args.conflict,
                  seconds_total=round(time.perf_counter() - t0, 3), provenance=prov)
    files = write(report, args.out)
    out = {"engine": report["engine"], "secagg": bool(report.get("secagg")), "privacy": report.get("privacy"),
           "dropped_out": report.get("dropped_out") or {},
           "model": lm.name, "clients": args.clients,
           "rounds": args.rounds, "per_client": per, "records_per_client": per * args.rounds,
           "merges": list(cfg.merges),
           "duplicates": report["duplicates_total"], "conflicts": report["conflicts_total"],
           "rejected": report["rejected_total"],
           "final": {m: r["final"] for m, r in report["runs"].items()},
           "reference": (report.get("reference") or {}).get("rounds", [{}])[-1] if report.get("reference") else None,
           "vs_reference": {m: r["rounds"][-1].get("vs_reference") for m, r in report["runs"].items() if r["rounds"]},
           "seconds": report["seconds_total"], "files": files, "provenance": prov}
    common.emit(args, out, markdown(report) + f"\nwritten: {files['json']}, {files['md']}, {files['chart']}")
    return 0


def _dp(args, secagg: bool):
    """The DP mechanism the flags ask for (None without --dp-noise), checked before any work."""
    if not args.dp_noise:
        return None
    from fedit.collab.settings import CollabSettings, threshold_count

    S = CollabSettings
    t = threshold_count(args.clients, S.secagg_shares, S.secagg_threshold) if secagg else args.clients
    from fedit.collab.privacy import DPConfig

    return DPConfig(args.dp_noise, args.dp_clip_key, args.dp_clip_resid, args.dp_delta, t)


def _run_flower(args, lm, plan, hp, res, cfg, overrides, say):
    import json

    from fedit.collab.app.simulation import run_flower
    from fedit.collab.settings import CollabSettings

    over = {k: v for k, v in overrides.items() if v is not None}
    s = CollabSettings(model=args.model or lm.name, device=args.device or "", dtype=args.dtype or "",
                       cache_dir=args.cache_dir or "", corpus=args.corpus or "", threads=args.threads or 0,
                       overrides=json.dumps(over) if over else "", hparams_file=args.hparams or "",
                       dataset=args.dataset, data=args.data or "", clients=args.clients, rounds=args.rounds,
                       per_client=per_round(args), overlap=args.overlap, conflict=args.conflict, seed=args.seed,
                       merge=",".join(cfg.merges), conflict_policy=cfg.conflict_policy,
                       priority=",".join(cfg.priority or []), ties_density=cfg.ties_density,
                       ties_scale=cfg.ties_scale, c1=cfg.c1, c1_weight=cfg.c1_weight, residual_tol=cfg.residual_tol,
                       secagg=not args.no_secagg, form=cfg.form, dp_noise=args.dp_noise, dp_clip_key=args.dp_clip_key,
                       dp_clip_resid=args.dp_clip_resid, dp_delta=args.dp_delta)
    return run_flower(s, cfg, lm, plan, hp, res, say)

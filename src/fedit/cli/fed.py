"""``fedit fed run``: FedEdit on Flower's simulation engine (one machine)."""

from __future__ import annotations

import json


def register(sub, common) -> None:
    from fedit.cli.main import precision_arg

    p = sub.add_parser("fed", help="federated editing (FedEdit) on the Flower engine")
    fsub = p.add_subparsers(dest="fed_command", required=True)
    r = fsub.add_parser("run", help="run a FedEdit federation on Flower's simulation engine, then report")
    common(r)
    r.add_argument("--clients", type=int, default=3, help="number of organisations (default 3)")
    r.add_argument("--slots", type=int, default=2, help="time slots T (default 2)")
    r.add_argument("--dataset", default="counterfact", help="counterfact, counterfact-easyedit, zsre, easyedit")
    r.add_argument("--data", default=None, help="dataset file (default: the sample shipped with fedit)")
    r.add_argument("--n-per-client", type=int, default=6, help="requests per client, spread over the slots")
    r.add_argument("--partition", default=None, choices=["relation", "cluster", "iid"],
                   help="how clients' requests differ (default: relation for CounterFact, cluster for zsRE)")
    r.add_argument("--mode", default="private", choices=["private", "paper"],
                   help="private: MKVs carry keys and residuals, no request text (default); paper: z + plaintext request")
    r.add_argument("--share-requests", action="store_true",
                   help="paper mode: every owner opts in to sending its plaintext requests with its MKVs")
    r.add_argument("--tau", type=float, default=0.4, help="cosine threshold of the FedEdit hit rule (default 0.4)")
    r.add_argument("--match", default="z", choices=["z", "delta"],
                   help="what the hit rule compares: z, the MKV itself (the paper; default), or delta = z − h, "
                        "the edit's direction (selective where all z point one way, as on Gemma)")
    r.add_argument("--baseline", default=None, choices=["fedavg"], help="also run the FedAvg baseline")
    r.add_argument("--method", default="memit",
                   help="editing method: memit (default) or pmet in any mode; alphaedit in paper mode only")
    r.add_argument("--layers", default=None, help="comma-separated layers to edit (overrides the data file)")
    r.add_argument("--hparams", default=None, help="JSON file of hyperparameters")
    precision_arg(r)
    r.add_argument("--corpus", default=None, help="text file for second moments (default: shipped WikiText-2 sample)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-reference", action="store_true", help="skip the centralised MEMIT reference")
    r.add_argument("--out", required=True, help="folder for the MKV store, federation.json and the report")

    r = fsub.add_parser("report", help="(re)build the report of a finished run from its federation.json, "
                                       "e.g. a deployment's, with the centralised MEMIT reference")
    common(r, model=False)
    r.add_argument("--no-reference", action="store_true", help="skip the centralised MEMIT reference")
    r.add_argument("--out", required=True, help="the folder holding federation.json")


def cmd_fed(args, emit) -> int:
    from fedit.federation.report import markdown
    from fedit.federation.settings import FedSettings

    if args.fed_command == "report":
        from fedit.federation.simulate import report_from_dir

        report = report_from_dir(args.out, reference=not args.no_reference)
        emit(args, _summary(report), markdown(report) + f"\nwritten: {', '.join(report['files'].values())}")
        return 0

    from fedit.cli.main import overrides_from

    overrides = {k: v for k, v in overrides_from(args).items() if v is not None}
    partition = args.partition or ("cluster" if args.dataset == "zsre" else "relation")
    s = FedSettings(model=args.model or "gemma-3-270m", device=args.device or "", dtype=args.dtype or "",
                    cache_dir=args.cache_dir or "", corpus=args.corpus or "", threads=args.threads or 0,
                    dataset=args.dataset, data=args.data or "", clients=args.clients, n_per_client=args.n_per_client,
                    slots=args.slots, partition=partition, seed=args.seed, method=args.method,
                    overrides=json.dumps(overrides) if overrides else "", hparams_file=args.hparams or "",
                    mode=args.mode, share_requests=args.share_requests, tau=args.tau, match=args.match, baseline=args.baseline or "",
                    out=args.out)
    from fedit.federation.simulate import run

    report = run(s, reference=not args.no_reference)
    emit(args, _summary(report), markdown(report) + f"\nwritten: {', '.join(report['files'].values())}")
    return 0


def _summary(report: dict) -> dict:
    s = report["settings"]
    return {"clients": len(report["clients"]), "slots": s["slots"], "mode": s["mode"], "model": s["model"],
            "n": len(report["clients"]) * s["n-per-client"], "seconds": report["seconds"],
           "metrics": report["fededit"]["post"], "metrics_pre": report["fededit"]["pre"],
           "per_client": report["per_client"], "reuse": report["reuse"],
           "retention": report.get("retention"), "centralised": report.get("centralised_mean_over_clients"),
           "fedavg": (report.get("fedavg") or {}).get("post"), "files": report["files"],
           "headline": report["headline"]}

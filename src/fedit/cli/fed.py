"""``fedit fed run`` (FedEdit on Flower's simulation engine, one machine) and ``fedit fed
report`` (the report of a finished run, e.g. a deployment's). Defaults come from
:class:`fedit.federation.settings.FedSettings`."""

from __future__ import annotations

import gc
import json

from fedit.cli import common
from fedit.errors import FeditError


def register(sub) -> None:
    from fedit.data.loaders import KINDS
    from fedit.federation.settings import FedSettings as S
    from fedit.federation.codebook import federating
    from fedit.methods import names

    p = common.add_command(sub, "fed", "federated editing (FedEdit) on the Flower engine")
    fsub = p.add_subparsers(dest="fed_command", required=True, metavar="{run,report}")
    r = common.add_command(fsub, "run", "run a FedEdit federation on Flower's simulation engine, then report")
    common.model_flags(r)
    common.population_flags(r, S.clients, S.slots, str(S.n_per_client))
    r.add_argument("--dataset", default=S.dataset,
                   help=f"dataset format: {', '.join(k for k in KINDS if k not in ('known_1000', 'mquake'))}")
    r.add_argument("--data", default=None, help="dataset file (default: the sample shipped with fedit)")
    r.add_argument("--partition", default=None, choices=["relation", "cluster", "iid"],
                   help="how clients' requests differ (default: relation for CounterFact, cluster for zsRE)")
    r.add_argument("--mode", default=S.mode, choices=["private", "paper"],
                   help="private: MKVs carry keys and residuals, no request text; paper: z + plaintext request")
    r.add_argument("--share-requests", action="store_true",
                   help="paper mode: every simulated node consents to sending its plaintext requests with its MKVs "
                        "(in a deployment each node decides with share-requests=true in its own --node-config)")
    r.add_argument("--tau", type=float, default=S.tau, help="cosine threshold of the FedEdit hit rule")
    r.add_argument("--match", default=S.match, choices=["z", "delta"],
                   help="what the hit rule compares: z, the MKV itself (the paper), or delta = z − h, "
                        "the edit's direction (selective where all z point one way, as on Gemma)")
    r.add_argument("--norm-factor", type=float, default=S.norm_factor,
                   help="a received vector's norm may be at most this times the receiver's own model scale "
                        "(docs/federation.md, privacy and bounds)")
    r.add_argument("--baseline", default=None, choices=["fedavg"], help="also run the FedAvg baseline (default: none)")
    # any method name: FedSettings refuses those that cannot federate (as asked), naming those that can
    common.method_flag(r, names(), default=S.method,
                       extra=f"; FedEdit takes {', '.join(federating())} (private mode: "
                             f"{', '.join(names(private_mkvs=True) + names(federates='codebook'))})")
    common.hparams_flags(r)
    common.corpus_flag(r)
    r.add_argument("--seed", type=int, default=S.seed, help="seed of the partition")
    r.add_argument("--overlap", type=int, default=S.overlap,
                   help="client 0's first K records are also the last K of every other client (facts that "
                        "several organisations must edit, met later by the others)")
    r.add_argument("--no-reference", action="store_true", help="skip the centralised MEMIT reference")
    r.add_argument("--out", required=True, help="folder for the MKV store, federation.json and the report")
    r.set_defaults(run=run)

    r = common.add_command(fsub, "report", "(re)build the report of a finished run from its federation.json, "
                                           "e.g. a deployment's, with the centralised MEMIT reference")
    common.model_flags(r, model=False)
    r.add_argument("--no-reference", action="store_true", help="skip the centralised MEMIT reference")
    r.add_argument("--out", required=True, help="the folder holding federation.json")
    r.set_defaults(run=run_report)


def settings_from(args):
    """The run's :class:`FedSettings` from the command line (unset flags: its defaults)."""
    from fedit.federation.settings import FedSettings

    overrides = {k: v for k, v in common.overrides_from(args, args.method).items() if v is not None}
    given = {"model": args.model, "device": args.device, "dtype": args.dtype, "cache_dir": args.cache_dir,
             "corpus": args.corpus, "threads": args.threads, "data": args.data, "hparams_file": args.hparams,
             "baseline": args.baseline, "overrides": json.dumps(overrides) if overrides else None,
             "partition": args.partition or ("cluster" if args.dataset == "zsre" else None)}
    return FedSettings(clients=args.clients, slots=args.rounds,
                       n_per_client=common.records_per_client(args, FedSettings.n_per_client),
                       dataset=args.dataset, seed=args.seed, overlap=args.overlap, method=args.method, mode=args.mode,
                       share_requests=args.share_requests, tau=args.tau, match=args.match, out=args.out,
                       norm_factor=args.norm_factor,
                       **{k: v for k, v in given.items() if v is not None})


def provenance(s, sets: dict | None = None) -> dict:
    """Provenance of a federated run: the model its clients load, the method's resolved
    hyperparameters with the run's overrides (``sets``: those that came from ``--set``), the
    dataset file. The model is freed again."""
    from fedit.methods import get_method
    from fedit.methods.hparams import resolve_hparams
    from fedit.models.loading import load_model
    from fedit.provenance import data_file

    lm = load_model(s.model, device=s.device or None, dtype=s.dtype or None, cache_dir=s.cache_dir or None)
    m = get_method(s.method)
    sets = sets or {}
    overrides = {k: v for k, v in s.hparam_overrides().items() if k not in sets}
    hp, sources = resolve_hparams(m.hparams_class, m.name, lm.name, lm.model_type, lm.adapter.n_layers,
                                  overrides, s.hparams_file or None, sets)
    out = common.provenance(lm, method=s.method, hparams=hp, sources=sources, data=data_file(s.data or None, s.dataset))
    del lm
    gc.collect()
    return out


def _finish(args, report: dict, prov: dict) -> int:
    from fedit.federation.report import markdown, write

    report.pop("files", None)
    report["provenance"] = prov
    report["files"] = write(report, args.out)
    common.emit(args, {**_summary(report), "provenance": prov},
                markdown(report) + f"\nwritten: {', '.join(report['files'].values())}")
    return 0


def run(args) -> int:
    from fedit.federation.simulate import run as simulate

    s = settings_from(args)
    # also refuses hyperparameters the model cannot take, before Flower starts
    prov = provenance(s, common.sets_from(args, args.method))
    return _finish(args, simulate(s, reference=not args.no_reference), prov)


def run_report(args) -> int:
    from fedit.federation.settings import FedSettings
    from fedit.federation.simulate import report_from_dir

    report = report_from_dir(args.out, reference=not args.no_reference)
    s = FedSettings.from_user_config(report["settings"])
    try:
        prov = provenance(s)
    except FeditError as e:  # a deployment's model may live on another machine
        common.log.warning("provenance without the model: %s", e)
        prov = common.provenance(method=s.method, data=None, settings=report["settings"])
    return _finish(args, report, prov)


def _summary(report: dict) -> dict:
    s = report["settings"]
    return {"clients": len(report["clients"]), "slots": s["slots"], "rounds": s["slots"], "mode": s["mode"],
            "model": s["model"], "n": len(report["clients"]) * s["n-per-client"],
            "records_per_client": s["n-per-client"], "seconds": report["seconds"],
            "metrics": report["fededit"]["post"], "metrics_pre": report["fededit"]["pre"],
            "per_client": report["per_client"], "reuse": report["reuse"],
            "retention": report.get("retention"), "centralised": report.get("centralised_mean_over_clients"),
            "fedavg": (report.get("fedavg") or {}).get("post"), "files": report["files"],
            "headline": report["headline"]}

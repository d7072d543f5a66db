"""``fedit ui``: a local web page to edit, revert, download, trace and browse reports and stores."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from fedit.errors import FeditError


def parse_set(items: list[str] | None) -> dict:
    """``KEY=VALUE`` pairs; a VALUE that reads as JSON (numbers, lists, true) is taken as such."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FeditError(f"--set {item!r} is not KEY=VALUE.", "write e.g. --set v_num_grad_steps=10")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ui", help="a local web page: edit facts, revert, download edits, trace, open reports "
                                         "and MKV stores")
    p.add_argument("--model", default=None, help="built-in name (default gemma-3-270m), local folder or hub name")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA when present)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--cache-dir", default=None, help="cache for models, statistics, templates "
                                                     "(default $FEDIT_CACHE or ~/.cache/fedit)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="hyperparameter override for every edit made on the page, for the methods that have KEY "
                        "(repeatable; default: none)")
    p.add_argument("--hparams", default=None, help="JSON file of hyperparameters (default: the model's data file)")
    p.add_argument("--corpus", default=None, help="text file or folder for second moments "
                                                  "(default: shipped WikiText-2 sample)")
    p.add_argument("--dataset", default=None, help="format of --data: counterfact, counterfact-easyedit, zsre, mquake")
    p.add_argument("--data", default=None, help="a dataset file to pick facts from (default: the shipped samples only)")
    p.add_argument("--report", default=None, help="eval report folder to show in the report panel (default: none)")
    p.add_argument("--store", default=None, help="MKV store to show in the store panel (default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the page's address when it is up")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO) on stderr")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from fedit.ui.facts import FactSources  # refuses a bad --data before the model loads

    overrides = parse_set(args.set)
    facts = FactSources(args.dataset, args.data)
    try:
        import uvicorn

        from fedit.ui.app import create_app
    except ImportError as e:
        raise FeditError(f"the web page needs {e.name}, which is not installed.", "pip install 'fedit[ui]'") from None
    from fedit.methods import Resources
    from fedit.models.loading import DEFAULT_MODEL, load_model
    from fedit.ui.session import Session

    logging.getLogger("fedit").setLevel(logging.INFO)  # the page shows fedit's INFO lines as job progress
    lm = load_model(args.model or DEFAULT_MODEL, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    session = Session(lm, defaults=overrides, hparams_file=args.hparams,
                      resources=Resources(cache_dir=args.cache_dir, corpus=args.corpus))
    app = create_app(session, facts, report=args.report, store=args.store)
    url = f"http://{args.host}:{args.port}/"
    if args.json:
        sys.stdout.write(json.dumps({"url": url, "model": lm.name}) + "\n")
    else:
        sys.stdout.write(f"fedit ui: {lm.name} at {url} (Ctrl-C stops)\n")
    sys.stdout.flush()
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0

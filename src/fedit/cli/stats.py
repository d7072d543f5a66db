"""``fedit stats``: precompute second-moment statistics of keys (cached for later edits)."""

from __future__ import annotations

import time

from fedit.cli import common


def register(sub) -> None:
    p = common.add_command(sub, "stats", "precompute second-moment statistics of keys")
    common.model_flags(p)
    p.add_argument("--layers", required=True, help="comma-separated layers, e.g. 3,4,5,6")
    common.corpus_flag(p)
    p.add_argument("--samples", type=int, default=1000, help="number of corpus chunks")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per chunk")
    p.set_defaults(run=run)


def run(args) -> int:
    from fedit.corpus import open_corpus
    from fedit.stats_cache import second_moments, stats_dir

    layers = common.parse_layers(args.layers)
    lm = common.load(args)
    for l in layers:
        lm.adapter.check_layer(l)
    corpus = open_corpus(args.corpus)
    t0 = time.perf_counter()
    mom = second_moments(lm, layers, corpus=corpus, samples=args.samples, seq_len=args.seq_len,
                         cache_dir=args.cache_dir, progress=not args.json)
    seconds = time.perf_counter() - t0
    folder = stats_dir(lm, corpus, args.cache_dir)
    out = {"model": lm.name, "layers": layers, "corpus": corpus.id, "samples": args.samples, "seq_len": args.seq_len,
           "seconds": round(seconds, 3), "dir": str(folder),
           "trace": {str(l): float(m.trace()) for l, m in mom.items()},
           "provenance": common.provenance(lm, corpus=corpus.id)}
    common.emit(args, out, f"second moments for layers {layers} of {lm.name} over {corpus.id} "
                f"({args.samples} chunks × {args.seq_len} tokens) in {seconds:.1f} s\ncached in {folder}")
    return 0

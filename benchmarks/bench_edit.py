"""Benchmark ROME and MEMIT on a real model (default: Gemma 3 270M, offline).

This is a measuring script, not a test: it prints figures and asserts nothing about time.

Measured, after a warm-up that loads (or computes once) the context templates and the
second-moment statistics of every layer either method edits, so that no timing below
includes those one-off costs:

* seconds per ROME edit: the mean of ``--rome-n`` single-fact edits, each a separate
  ``fedit.edit(..., method="rome", apply=False)`` call;
* seconds per MEMIT batch, one ``fedit.edit(..., method="memit", apply=False)`` call per size
  in ``--memit-sizes`` (default 10 and 100 facts);
* memory: the process's peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``, which only grows),
  the RSS before each run and the peak during it (psutil, sampled in a thread every
  ``--rss-interval`` seconds; the increase is peak - before), and on CUDA
  ``torch.cuda.max_memory_allocated()`` per run (reset before each);
* the share of each run spent optimising target vectors,
  ``EditOutcome.target_seconds / EditOutcome.seconds``;
* the speed-up of the target optimisation from caching the blocks below the edit site
  (``TargetConfig.reuse_lower=True``, the default) against a full forward pass on every
  step (``reuse_lower=False``), timing ``fedit.core.targets.compute_target`` on the same
  ``--compare-n`` requests with MEMIT's target configuration (and ROME's), alternating the
  order of the two variants per request.

Usage (from the repository root)::

    python benchmarks/bench_edit.py            # full run: ROME x3, MEMIT 10 and 100
    python benchmarks/bench_edit.py --quick    # smoke run: ROME x1, MEMIT 2 and 5
    python benchmarks/bench_edit.py --json     # one JSON object on stdout (table on stderr)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

DEFAULT_DATA = "the CounterFact sample shipped with fedit (300 records)"


# --------------------------------------------------------------------------------------------
# memory


def _ru_maxrss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux: KiB; macOS: bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class RssSampler:
    """Samples this process's RSS in a thread; ``peak - start`` is the increase during a run."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.start_mib = self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import psutil

            self._proc = psutil.Process(os.getpid())
        except ImportError:  # psutil is optional: then only ru_maxrss is reported
            self._proc = None

    @property
    def available(self) -> bool:
        return self._proc is not None

    def _rss(self) -> float:
        return self._proc.memory_info().rss / (1024 * 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mib = max(self.peak_mib, self._rss())

    def __enter__(self) -> "RssSampler":
        if self._proc is not None:
            self.start_mib = self.peak_mib = self._rss()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self.peak_mib, self._rss())


def measured(fn: Callable[[], Any], device, rss_interval: float) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` and return its result with wall time and memory figures."""
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with RssSampler(rss_interval) as rss:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    mem: dict[str, Any] = {"wall_seconds": wall, "cpu_seconds": cpu, "ru_maxrss_mib": _ru_maxrss_mib(),
                           "loadavg_1min_after": (_loadavg() or [None])[0]}
    if rss.available:
        mem.update(rss_before_mib=rss.start_mib, rss_peak_mib=rss.peak_mib,
                   rss_increase_mib=rss.peak_mib - rss.start_mib)
    if cuda:
        mem["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out, mem


# --------------------------------------------------------------------------------------------
# data


def load_requests(path: Path, n: int):
    """The first ``n`` CounterFact records as EditRequests (cycling if the file has fewer)."""
    from fedit import EditRequest

    if not path.is_file():
        sys.exit(f"error: the CounterFact file {path} does not exist.\n"
                 f"  pass --data PATH pointing at counterfact_500.json (a JSON list of CounterFact "
                 f"records with 'requested_rewrite'); `fedit datasets` says where to get it.")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: cannot read {path} as JSON ({e}).")
    if not isinstance(records, list) or not records:
        sys.exit(f"error: {path} holds no records (expected a JSON list of CounterFact records).")
    reqs = [EditRequest.from_dict(r, i) for i, r in enumerate(records)]
    if len(reqs) < n:
        log(f"note: {path.name} has {len(reqs)} records, fewer than the {n} needed; requests repeat")
    return [reqs[i % len(reqs)] for i in range(n)]


# --------------------------------------------------------------------------------------------
# runs


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _share(target: float, total: float) -> float | None:
    return target / total if total > 0 else None


def _target_summary(targets: list[dict]) -> dict[str, Any]:
    if not targets:
        return {}
    n = len(targets)
    return {"mean_steps": sum(t["steps"] for t in targets) / n,
            "mean_nll_start": sum(t["nll_start"] for t in targets) / n,
            "mean_nll_end": sum(t["nll_end"] for t in targets) / n}


def bench_rome(lm, reqs, res, hp, rss_interval: float) -> dict[str, Any]:
    from fedit import edit

    runs = []
    for i, r in enumerate(reqs):
        out, mem = measured(lambda: edit(lm, [r], method="rome", hparams=hp, resources=res, apply=False), lm.device,
                            rss_interval)
        o = out.outcome
        runs.append({"case_id": r.case_id, "seconds": o.seconds, "target_seconds": o.target_seconds,
                     "target_share": _share(o.target_seconds, o.seconds), **mem, **_target_summary(o.targets)})
        log(f"ROME edit {i + 1}/{len(reqs)} (case {r.case_id}): {o.seconds:.2f} s, "
            f"targets {o.target_seconds:.2f} s, {o.targets[0]['steps']} steps, CPU {mem['cpu_seconds']:.1f} s, "
            f"load {mem['loadavg_1min_after']}")
    n = len(runs)
    tot, tgt = sum(x["seconds"] for x in runs), sum(x["target_seconds"] for x in runs)
    summary = {"n": n, "seconds_per_edit": tot / n, "min_seconds": min(x["seconds"] for x in runs),
               "max_seconds": max(x["seconds"] for x in runs), "target_seconds_per_edit": tgt / n,
               "target_share": _share(tgt, tot), "cpu_seconds_per_edit": sum(x["cpu_seconds"] for x in runs) / n,
               "ru_maxrss_mib": runs[-1]["ru_maxrss_mib"]}
    for key in ("rss_before_mib", "rss_peak_mib", "rss_increase_mib", "cuda_max_allocated_mib"):
        if key in runs[0]:
            summary[key] = max(x[key] for x in runs) if key != "rss_before_mib" else runs[0][key]
    summary["runs"] = runs
    return summary


def bench_memit(lm, reqs, res, hp, rss_interval: float) -> dict[str, Any]:
    from fedit import edit

    out, mem = measured(lambda: edit(lm, reqs, method="memit", hparams=hp, resources=res, apply=False), lm.device,
                        rss_interval)
    o = out.outcome
    diag = o.diagnostics or {}
    log(f"MEMIT batch of {len(reqs)}: {o.seconds:.2f} s, targets {o.target_seconds:.2f} s, "
        f"CPU {mem['cpu_seconds']:.1f} s, peak RSS {mem.get('rss_peak_mib', 0):.0f} MiB, "
        f"load {mem['loadavg_1min_after']}")
    return {"n": len(reqs), "seconds": o.seconds, "seconds_per_edit": o.seconds / len(reqs),
            "target_seconds": o.target_seconds, "target_share": _share(o.target_seconds, o.seconds),
            "other_seconds": o.seconds - o.target_seconds, **mem, **_target_summary(o.targets),
            "residual_norms": diag.get("residual_norms"), "step_scales": diag.get("step_scales"),
            "pullback": diag.get("pullback")}


def bench_reuse_lower(lm, reqs, res, method: str, hp, rss_interval: float, repeats: int = 1) -> dict[str, Any]:
    """compute_target with reuse_lower=True (default) vs False on the same requests.

    Each variant runs ``repeats`` times per request, the order alternating (A B, B A, ...);
    the fastest run of each is kept, which filters out other load on the machine.
    """
    from fedit.core.targets import compute_target
    from fedit.core.templates import flat

    templates = flat(res.templates(lm, hp.context_template_length_params))
    cfg_fast = hp.target_config()
    cfg_full = dataclasses.replace(cfg_fast, reuse_lower=False)
    variants = {"reuse_lower": cfg_fast, "full_forward": cfg_full}
    rows = []
    for i, r in enumerate(reqs):
        got: dict[str, dict] = {}
        for rep in range(repeats):
            order = list(variants) if (i + rep) % 2 == 0 else list(reversed(variants))  # alternate who goes first
            for name in order:
                tr, mem = measured(lambda: compute_target(lm, r, templates, variants[name]), lm.device,
                                   rss_interval)
                row = {"seconds": tr.seconds, "all_seconds": [], "steps": tr.steps,
                       "forward_passes": len(tr.history), "nll_end": tr.nll_end, "z": tr.z,
                       **{k: v for k, v in mem.items() if k != "wall_seconds"}}
                prev = got.get(name)
                row["all_seconds"] = (prev["all_seconds"] if prev else []) + [tr.seconds]
                if prev is None or tr.seconds < prev["seconds"]:
                    got[name] = row
                else:
                    prev["all_seconds"] = row["all_seconds"]
        z_diff = float((got["reuse_lower"]["z"] - got["full_forward"]["z"]).norm()
                       / got["full_forward"]["z"].norm().clamp_min(1e-12))
        row = {"case_id": r.case_id, "z_rel_diff": z_diff}
        for name, g in got.items():
            g.pop("z")
            row[name] = g
        rows.append(row)
        log(f"{method} target, case {r.case_id}: reuse_lower {got['reuse_lower']['all_seconds']} s "
            f"({got['reuse_lower']['forward_passes']} passes), full {got['full_forward']['all_seconds']} s "
            f"({got['full_forward']['forward_passes']} passes), |Δz|/|z| {z_diff:.1e}, load {_loadavg()}")
    out: dict[str, Any] = {"method": method, "site": cfg_fast.site, "layer": cfg_fast.layer,
                           "n_layers": lm.adapter.n_layers, "n_templates": len(templates),
                           "n_requests": len(reqs), "repeats": repeats}
    for name in variants:
        secs = sum(x[name]["seconds"] for x in rows)
        passes = sum(x[name]["forward_passes"] for x in rows)
        out[name] = {"seconds_per_request": secs / len(rows), "seconds_per_pass": secs / passes,
                     "mean_forward_passes": passes / len(rows)}
    out["speedup"] = out["full_forward"]["seconds_per_request"] / out["reuse_lower"]["seconds_per_request"]
    out["speedup_per_pass"] = out["full_forward"]["seconds_per_pass"] / out["reuse_lower"]["seconds_per_pass"]
    out["max_z_rel_diff"] = max(x["z_rel_diff"] for x in rows)
    out["runs"] = rows
    return out


# --------------------------------------------------------------------------------------------
# output


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _mem_cells(d: dict) -> list[str]:
    cells = [_f(d.get("rss_peak_mib"), ".0f"), _f(d.get("rss_increase_mib"), "+.0f"), _f(d.get("ru_maxrss_mib"), ".0f")]
    if "cuda_max_allocated_mib" in d:
        cells.append(_f(d["cuda_max_allocated_mib"], ".0f"))
    return cells


def render_table(report: dict[str, Any]) -> str:
    cuda = report["machine"]["device"].startswith("cuda")
    env = report["machine"]
    lines = [f"fedit edit benchmark: model {report['model']} on {env['device']} "
             f"({env['cpu_count']} CPUs, torch {env['torch']}, {env['torch_threads']} threads; "
             f"load average at start {env.get('loadavg_start')}, at end {env.get('loadavg_end')})",
             f"warm-up (not timed below): model load {report['warmup']['load_seconds']:.1f} s, "
             f"templates + second moments {report['warmup']['stats_seconds']:.1f} s, "
             f"first target pass {report['warmup']['first_target_seconds']:.1f} s",
             ""]
    head = ["run", "edits", "s/run", "s/edit", "CPU s/run", "target s", "target share", "peak RSS MiB", "RSS incr MiB",
            "ru_maxrss MiB"] + (["CUDA max MiB"] if cuda else [])
    rows = []
    rome = report.get("rome")
    if rome:
        rows.append([f"ROME (mean of {rome['n']})", "1", _f(rome["seconds_per_edit"]), _f(rome["seconds_per_edit"]),
                     _f(rome["cpu_seconds_per_edit"]),
                     _f(rome["target_seconds_per_edit"]), _f(rome["target_share"], ".1%"), *_mem_cells(rome)])
    for m in report.get("memit", []):
        rows.append([f"MEMIT batch of {m['n']}", str(m["n"]), _f(m["seconds"]), _f(m["seconds_per_edit"]),
                     _f(m["cpu_seconds"]),
                     _f(m["target_seconds"]), _f(m["target_share"], ".1%"), *_mem_cells(m)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    for rl in report.get("reuse_lower", []):
        a, b = rl["reuse_lower"], rl["full_forward"]
        lines += ["",
                  f"target optimisation, {rl['method']} config (site {rl['site']} of layer {rl['layer']}/"
                  f"{rl['n_layers']}, {rl['n_templates']} templates, {rl['n_requests']} requests, "
                  f"fastest of {rl['repeats']} runs each):",
                  f"  reuse_lower=True  (default): {a['seconds_per_request']:.2f} s/request, "
                  f"{a['seconds_per_pass'] * 1000:.0f} ms/pass, {a['mean_forward_passes']:.1f} passes",
                  f"  reuse_lower=False (baseline): {b['seconds_per_request']:.2f} s/request, "
                  f"{b['seconds_per_pass'] * 1000:.0f} ms/pass, {b['mean_forward_passes']:.1f} passes",
                  f"  speed-up: {rl['speedup']:.2f}x per request, {rl['speedup_per_pass']:.2f}x per pass "
                  f"(max |z_reuse - z_full| / |z_full| = {rl['max_z_rel_diff']:.1e})"]
    for err in report.get("errors", []):
        lines += ["", f"FAILED {err['stage']}: {err['error']}"]
    lines += ["", "s/run and target s come from EditOutcome.seconds / .target_seconds; target share = their ratio;",
              "CPU s/run: process CPU time (all threads) during the run.",
              "peak RSS / RSS incr: psutil samples during the run (incr = peak - RSS before it); "
              "ru_maxrss: process peak so far."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    if text.strip().lower() in ("none", "0", ""):
        return []  # skip MEMIT
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m", help="model name or folder (default: gemma-3-270m)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: CUDA if present, else CPU)")
    p.add_argument("--data", type=Path, default=None, help=f"CounterFact JSON file (default: {DEFAULT_DATA})")
    p.add_argument("--rome-n", type=int, default=3,
                   help="number of single-fact ROME edits to average (default 3; 0 skips ROME)")
    p.add_argument("--memit-sizes", type=parse_sizes, default=[10, 100],
                   help="comma-separated MEMIT batch sizes (default 10,100; 'none' skips MEMIT)")
    p.add_argument("--compare-n", type=int, default=3,
                   help="requests for the reuse_lower=True/False comparison (default 3)")
    p.add_argument("--compare-methods", default="memit,rome",
                   help="whose target configuration to compare reuse_lower with (default memit,rome)")
    p.add_argument("--compare-repeats", type=int, default=2,
                   help="runs of each variant per request in the comparison; the fastest counts (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--rss-interval", type=float, default=0.02, help="RSS sampling interval in seconds")
    p.add_argument("--quick", action="store_true", help="smoke run: ROME n=1, MEMIT sizes 2,5, compare n=1")
    p.add_argument("--out", type=Path, default=None,
                   help="also write the JSON report to this file, updated after every stage")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table goes to stderr)")
    args = p.parse_args(argv)
    if args.quick:
        args.rome_n, args.memit_sizes, args.compare_n, args.compare_repeats = 1, [2, 5], 1, 1
    compare_methods = [m.strip().lower() for m in args.compare_methods.split(",") if m.strip()]
    if any(m not in ("rome", "memit") for m in compare_methods):
        p.error(f"--compare-methods takes rome and/or memit, got {args.compare_methods!r}")

    import torch

    from fedit import Resources, hparams_for, load_model
    from fedit.core.targets import compute_target
    from fedit.core.templates import flat

    if args.threads:
        torch.set_num_threads(args.threads)

    # Distinct requests for every run: ROME, then each MEMIT batch, then the comparison.
    need = args.rome_n + sum(args.memit_sizes) + args.compare_n + 1
    from fedit.data.loaders import sample_path

    args.data = args.data or sample_path("counterfact")
    reqs = load_requests(args.data, need)
    warm_req, pos = reqs[0], 1
    rome_reqs, pos = reqs[pos:pos + args.rome_n], pos + args.rome_n
    memit_batches = []
    for s in args.memit_sizes:
        memit_batches.append(reqs[pos:pos + s])
        pos += s
    compare_reqs = reqs[pos:pos + args.compare_n]

    log(f"loading {args.model} ...")
    t0 = time.perf_counter()
    lm = load_model(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    sampler = RssSampler()
    rss_after_load = sampler._rss() if sampler.available else None
    log(f"loaded in {load_s:.1f} s on {lm.device}")

    # Warm-up: context templates and second moments for both methods (computed once and cached
    # on disk; loaded here), then one short target optimisation so that lazy initialisation in
    # torch does not land in the first timed run.
    res = Resources(progress=False)
    t0 = time.perf_counter()
    hps = {m: hparams_for(m, lm) for m in ("rome", "memit")}  # read once; every run below uses these
    for m, hp in hps.items():
        res.templates(lm, hp.context_template_length_params)
        if m == "memit" or getattr(hp, "mom2_adjustment", True):
            log(f"warm-up: {m} second moments for layers {hp.layers} ({hp.mom2_samples} x {hp.mom2_seq_len} tokens)")
            res.second_moments(lm, hp.layers, hp.mom2_samples, hp.mom2_seq_len)
    stats_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hp = hps["memit"]
    compute_target(lm, warm_req, flat(res.templates(lm, hp.context_template_length_params)),
                   dataclasses.replace(hp.target_config(), steps=2))
    first_s = time.perf_counter() - t0
    log(f"warm-up done: statistics {stats_s:.1f} s, first target pass {first_s:.1f} s")

    report: dict[str, Any] = {
        "model": args.model,
        "machine": {"device": str(lm.device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_start": _loadavg(), "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
                    "cuda_name": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else None},
        "hparams": {m: {"layers": h.layers, "steps": h.v_num_grad_steps,
                        "templates": len(flat(res.templates(lm, h.context_template_length_params))),
                        **({k: getattr(h, k) for k in ("pullback_steps", "backtrack_steps", "v_batch_size")
                            if hasattr(h, k)})}
                    for m, h in hps.items()},
        "warmup": {"load_seconds": load_s, "stats_seconds": stats_s, "first_target_seconds": first_s,
                   "rss_after_load_mib": rss_after_load,
                   "note": "templates and second moments were loaded/computed before timing; timings exclude them"},
        "options": {"rome_n": args.rome_n, "memit_sizes": args.memit_sizes, "compare_n": args.compare_n,
                    "compare_repeats": args.compare_repeats, "quick": args.quick, "data": str(args.data)},
    }

    report["memit"], report["reuse_lower"], report["errors"] = [], [], []

    def stage(name: str, fn: Callable[[], Any], store: Callable[[Any], None]) -> None:
        # One failing stage (e.g. the library changing under a long run) must not lose the others.
        try:
            store(fn())
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            log(f"{name} failed: {type(e).__name__}: {e}")
            report["errors"].append({"stage": name, "error": f"{type(e).__name__}: {e}"})
        report["ru_maxrss_mib"] = _ru_maxrss_mib()
        report["machine"]["loadavg_end"] = _loadavg()
        if args.out:  # partial results survive a killed run
            args.out.write_text(json.dumps(report, indent=1, default=str))

    if args.rome_n > 0:
        stage("rome", lambda: bench_rome(lm, rome_reqs, res, hps["rome"], args.rss_interval),
              lambda v: report.__setitem__("rome", v))
    for b in memit_batches:
        stage(f"memit-{len(b)}", lambda: bench_memit(lm, b, res, hps["memit"], args.rss_interval),
              report["memit"].append)
    if args.compare_n > 0:
        for m in compare_methods:
            stage(f"reuse_lower-{m}", lambda: bench_reuse_lower(lm, compare_reqs, res, m, hps[m], args.rss_interval,
                                                                max(1, args.compare_repeats)),
                  report["reuse_lower"].append)

    table = render_table(report)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(report, indent=1, default=str))
    else:
        print(table)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

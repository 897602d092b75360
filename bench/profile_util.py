"""Device-time tables from a JAX profiler trace: where a step's GPU time goes, by kernel and by
XLA op, without TensorBoard.

    from profile_util import profile
    table = profile(lambda: step(...), logdir, steps=2)   # runs fn `steps` times under the trace

`summarize(trace_json_gz)` reads the Chrome-trace file that `jax.profiler.trace` writes beside
the xplane, keeps the events of the device processes (`/device:GPU:*`), and totals their
durations per (line, name): the stream lines hold CUDA kernels and copies, the "XLA Ops" line
holds HLO instructions. Times are per profiled step.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re


def _classify(name: str) -> str:
    n = name.lower()
    if "alibi_flash" in n or "flash" in n:
        return "attention (pallas)"
    if any(s in n for s in ("gemm", "cutlass", "cublas", "nvjet", "xmma", "gemv", "matmul",
                            "dot")):
        return "matmul"
    if "nccl" in n or "all-reduce" in n or "all-gather" in n or "reduce-scatter" in n:
        return "collective"
    if "memcpy" in n or "memset" in n or n.startswith("copy"):
        return "copy/memset"
    if "reduce" in n or "fusion" in n or "convert" in n or "transpose" in n:
        return "fusion/elementwise"
    return "other"


def _busy(spans) -> float:
    """Length of the union of (start, duration) intervals."""
    busy, end = 0.0, float("-inf")
    for ts, dur in sorted(spans):
        if ts + dur > end:
            busy += ts + dur - max(ts, end)
            end = ts + dur
    return busy


def summarize(path: str, steps: int = 1, top: int = 30) -> str:
    with gzip.open(path, "rt") as fh:
        trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pnames, tnames = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pnames[e["pid"]] = e["args"]["name"]
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            tnames[(e["pid"], e.get("tid"))] = e["args"]["name"]
    dev_pids = {p for p, n in pnames.items() if n.startswith("/device:")}
    per_line = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
    spans = collections.defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in dev_pids:
            continue
        line = tnames.get((e["pid"], e.get("tid")), str(e.get("tid")))
        line = pnames[e["pid"]] + " " + re.sub(r"#\d+", "#", line)  # one table per device
        name = e.get("name", "?")
        rec = per_line[line][name]
        rec[0] += float(e.get("dur", 0.0))
        rec[1] += 1
        spans[line].append((float(e.get("ts", 0.0)), float(e.get("dur", 0.0))))
    out = [f"# profile {path} (times per step, {steps} step(s) traced)"]
    for line, recs in sorted(per_line.items()):
        total = sum(r[0] for r in recs.values()) / steps / 1e3
        out.append(f"\n## line {line!r}: {total:.2f} ms/step over {len(recs)} names, busy "
                   f"{_busy(spans[line]) / steps / 1e3:.2f} ms/step (overlaps counted once)")
        if "stream" in line.lower():
            cats = collections.defaultdict(float)
            for name, (dur, _) in recs.items():
                cats[_classify(name)] += dur
            for c, dur in sorted(cats.items(), key=lambda kv: -kv[1]):
                out.append(f"  [{c}] {dur / steps / 1e3:9.3f} ms")
        ranked = sorted(recs.items(), key=lambda kv: -kv[1][0])[:top]
        for name, (dur, n) in ranked:
            out.append(f"  {dur / steps / 1e3:9.3f} ms  x{n / steps:<6.0f} {name[:150]}")
    return "\n".join(out)


def profile(fn, logdir: str, steps: int = 2, top: int = 30) -> str:
    """Runs fn() `steps` times under jax.profiler.trace (fn must block on its result) and
    returns the summary table; the trace stays under logdir."""
    import jax

    os.makedirs(logdir, exist_ok=True)
    with jax.profiler.trace(logdir, create_perfetto_trace=False):
        for _ in range(steps):
            fn()
    files = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.trace.json.gz")),
                   key=os.path.getmtime)
    if not files:
        return f"# profile: no trace file under {logdir}"
    return summarize(files[-1], steps=steps, top=top)

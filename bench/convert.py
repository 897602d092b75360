"""Converter benchmark: MPT-7B-shaped bf16 checkpoint, import and export, time and peak RSS.

Writes random MPT-7B-shaped bf16 weights as two safetensors shards + index (13.3 GB), then in
the same run times `cat` of the files (the plain read), `cp` + `sync` of them (the plain copy:
the same bytes read and written), `convert_torch.py import`, the same two for our params, and
`convert_torch.py export`, each as a subprocess under /usr/bin/time -v (peak RSS of
the whole process). Prints a table and appends rows to bench/RESULTS.md. Files are deleted
afterwards. Goal (issue 2): each direction within 2x the plain read, peak RSS under 3 GB.

    python bench/convert.py [--dir DIR]   # DIR needs ~55 GB free (default: /tmp)

Note: the machine cannot drop the page cache, so the files just written are (partly) cached
for every step alike; the read figure is what `cat` takes in that same state.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mpt_jax.model.config import MPTConfig  # noqa: E402
from mpt_jax.convert.convert import name_table  # noqa: E402
from mpt_jax.convert.io import SafetensorsWriter  # noqa: E402


def write_source(d: Path, cfg: MPTConfig) -> int:
    d.mkdir(parents=True)
    cfg.to_json_file(d / "config.json", form="hf")
    rows = name_table(cfg)
    entries = []
    for r in rows:
        for k in r.keys(cfg.n_layers):
            entries.append((k, r.torch_shape()))
    bf16 = np.dtype(ml_dtypes.bfloat16)
    pool = (np.random.default_rng(0).standard_normal(64 << 20, np.float32) * 0.02).astype(bf16)
    half = len(entries) // 2
    shards = [entries[:half], entries[half:]]
    weight_map, total = {}, 0
    for j, shard in enumerate(shards):
        name = f"model-{j + 1:05d}-of-00002.safetensors"
        w = SafetensorsWriter(d / name, [(k, bf16, s) for k, s in shard])
        for k, s in shard:
            n = int(np.prod(s))
            off = int(np.random.default_rng(n + j).integers(0, pool.size))
            flat = np.roll(pool, -off)[:n] if n <= pool.size else np.resize(np.roll(pool, -off), n)
            w.write(k, flat.reshape(s))
            weight_map[k] = name
            total += n * 2
        w.close()
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of a subprocess under /usr/bin/time -v."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"{cmd} failed:\n{p.stdout}\n{p.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return wall, rss_kb / 1e6


def cat_files(d: Path) -> list[str]:
    files = sorted(str(p) for p in d.rglob("*") if p.is_file())
    return ["sh", "-c", 'cat "$@" > /dev/null', "cat"] + files


def plain_copy(src: Path, dst: Path) -> float:
    """Seconds to copy `src` to `dst` and sync: the same bytes read and written as a
    conversion, without the conversion (the floor on a disk slower than the page cache)."""
    t, _ = timed(["sh", "-c", f'cp -r "{src}" "{dst}" && sync'])
    shutil.rmtree(dst)
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--n_layers", type=int, default=32, help="fewer for a quick check")
    ap.add_argument("--no_record", action="store_true")
    args = ap.parse_args()
    base = Path(args.dir) / "mpt_convert_bench"
    print(subprocess.run(["df", "-h", args.dir], capture_output=True, text=True).stdout)
    free = shutil.disk_usage(args.dir).free
    if free < 55e9:
        sys.exit(f"{args.dir}: {free / 1e9:.0f} GB free, need 55 GB")
    shutil.rmtree(base, ignore_errors=True)
    cfg = MPTConfig.mpt_7b(n_layers=args.n_layers)
    src, ours, out = base / "hf", base / "ours", base / "export"
    results = []
    try:
        t = time.perf_counter()
        nbytes = write_source(src, cfg)
        print(f"wrote {nbytes / 1e9:.2f} GB source in {time.perf_counter() - t:.1f}s")
        py = sys.executable
        cat_src, rss_cat = timed(cat_files(src))
        cp_src = plain_copy(src, base / "copy")
        t_imp, rss_imp = timed([py, "convert_torch.py", "import", str(src), str(ours)])
        t_imp += timed(["sync"])[0]  # written to disk, as the plain copy is
        cat_ours, _ = timed(cat_files(ours / "params"))
        cp_ours = plain_copy(ours / "params", base / "copy")
        t_exp, rss_exp = timed([py, "convert_torch.py", "export", str(ours), str(out)])
        t_exp += timed(["sync"])[0]
        results = [
            ("cat source shards (plain read)", f"{cat_src:.1f} s"),
            ("import MPT-7B bf16 (2 shards), + sync", f"{t_imp:.1f} s"),
            ("import / plain read", f"{t_imp / cat_src:.2f}x"),
            ("plain copy of the source (cp + sync)", f"{cp_src:.1f} s"),
            ("import / plain copy", f"{t_imp / cp_src:.2f}x"),
            ("import peak RSS", f"{rss_imp:.2f} GB"),
            ("cat our params (plain read)", f"{cat_ours:.1f} s"),
            ("export MPT-7B bf16 (5 GB shards), + sync", f"{t_exp:.1f} s"),
            ("export / plain read", f"{t_exp / cat_ours:.2f}x"),
            ("plain copy of our params (cp + sync)", f"{cp_ours:.1f} s"),
            ("export / plain copy", f"{t_exp / cp_ours:.2f}x"),
            ("export peak RSS", f"{rss_exp:.2f} GB"),
        ]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\n| figure | value |\n|---|---|")
    for k, v in results:
        print(f"| {k} | {v} |")
    if args.no_record or args.n_layers != 32:
        return
    machine = f"CPU {os.cpu_count()} cores, {platform.node()}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    date = datetime.date.today().isoformat()
    path = ROOT / "bench" / "RESULTS.md"
    if not path.exists():
        path.write_text("| date | bench | figure | value | card/machine | commit |\n"
                        "|---|---|---|---|---|---|\n")
    with open(path, "a") as fh:
        for k, v in results:
            fh.write(f"| {date} | convert | {k} | {v} | {machine} | {commit} |\n")


if __name__ == "__main__":
    main()

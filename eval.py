"""Evaluate an MPT checkpoint: perplexity by context length, llm-foundry's ICL tasks and
gauntlet, or any lm-evaluation-harness task.

    python eval.py perplexity --checkpoint C --data D --seq_lens 2048,8192,65536
        [--stride S --final_tokens F --max_tokens N --output perplexity.json]
    python eval.py icl --checkpoint C --tasks tasks.yaml [--gauntlet eval_gauntlet.yaml
        --output icl.json --samples samples.jsonl --max_seq_len L]
    python eval.py harness --checkpoint C --tasks hellaswag,piqa [--include_path DIR
        --num_fewshot K --limit N --batch_size B --output harness.json]

C: an HF directory, one of our converted checkpoints, a training workdir or step directory;
the tokenizer comes from C unless --tokenizer names one. Common flags: --dtype (bfloat16),
--mesh data,fsdp,tensor (default: every device data-parallel), --batch_tokens (tokens per
scoring batch), --min_bucket (shortest padded length), and for several hosts
--coordinator_address / --num_processes / --process_id (as train.py; TPU pods and SLURM are
detected). Results go to --output (JSON; perplexity also draws a PNG beside it, icl writes a
markdown table beside it) on process 0, and a table to stdout. Bad input: one line on stderr,
exit status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def _write(path: str, text: str) -> None:
    """Written whole or not at all (local, gs:// or s3://)."""
    from mpt_jax import storage

    storage.makedirs(storage.dirname(storage.abspath(path)))
    storage.write_atomic(path, text)


def _json(obj) -> str:
    return json.dumps(obj, indent=1, default=str) + "\n"


def _beside(path: str, suffix: str) -> str:
    root, _ = os.path.splitext(path)
    return root + suffix


_SIDECAR = {"perplexity": ".png", "icl": ".md"}  # written beside --output
_POSITIVE = ("batch_tokens", "min_bucket", "max_tokens", "final_tokens", "max_seq_len",
             "generation_batch_size", "max_length")


def _check_args(args) -> None:
    """Bad flags and unusable output paths, before any loading or scoring."""
    for name in _POSITIVE:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if getattr(args, "num_fewshot", None) is not None and args.num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be 0 or more, got {args.num_fewshot}")
    if getattr(args, "limit", None) is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive (a count, or a fraction below 1), got "
                         f"{args.limit}")
    outputs = [args.output] + ([args.samples] if getattr(args, "samples", None) else [])
    side = _SIDECAR.get(args.cmd)
    if side and _beside(args.output, side) == args.output:
        raise ValueError(f"--output {args.output}: the {side} is written beside the JSON "
                         f"results under that name; give the results another name (.json)")
    from mpt_jax import storage

    for path in outputs:
        if storage.is_remote(path):
            continue
        parent = os.path.dirname(os.path.abspath(path)) or "."
        while not os.path.exists(parent):  # the directories it would create
            parent = os.path.dirname(parent)
        if os.path.isdir(path):
            raise ValueError(f"--output {path}: is a directory")
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"{path}: cannot be written ({parent} is not a writable "
                             "directory)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True)
    common.add_argument("--tokenizer", default=None, help="default: the checkpoint's")
    common.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    common.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes; one may be -1 "
                        "(default -1,1,1)")
    common.add_argument("--batch_tokens", type=int, default=None,
                        help="tokens per scoring batch (default 32768)")
    common.add_argument("--min_bucket", type=int, default=16,
                        help="shortest row bucket (default 16): larger trades padding for "
                             "fewer compiled shapes")
    common.add_argument("--no_progress", action="store_true")
    common.add_argument("--coordinator_address", default="")
    common.add_argument("--num_processes", type=int, default=0)
    common.add_argument("--process_id", type=int, default=-1)

    p = sub.add_parser("perplexity", parents=[common], help="loss by context length")
    p.add_argument("--data", required=True, help="prepared shards dir, or text/JSONL files")
    p.add_argument("--seq_lens", required=True, help="window lengths, e.g. 2048,8192,65536")
    p.add_argument("--stride", type=int, default=None, help="sliding windows (default: "
                   "non-overlapping)")
    p.add_argument("--final_tokens", type=int, default=None,
                   help="tokens scored at every length (default: min(seq_lens) // 2)")
    p.add_argument("--max_tokens", type=int, default=None, help="use the first N tokens")
    p.add_argument("--text_field", default="text", help="JSON lines' text field")
    p.add_argument("--output", default="perplexity.json")

    i = sub.add_parser("icl", parents=[common], help="llm-foundry ICL tasks and gauntlet")
    i.add_argument("--tasks", required=True, nargs="+", help="llm-foundry task YAML file(s)")
    i.add_argument("--gauntlet", default=None, help="llm-foundry eval_gauntlet YAML")
    i.add_argument("--max_seq_len", type=int, default=None,
                   help="longest context + continuation (default: the model's max_seq_len)")
    i.add_argument("--generation_batch_size", type=int, default=16)
    i.add_argument("--output", default="icl_results.json")
    i.add_argument("--samples", default=None, help="write per-example records (JSON lines)")

    h = sub.add_parser("harness", parents=[common], help="lm-evaluation-harness tasks")
    h.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    h.add_argument("--include_path", default=None, help="directory of extra task YAMLs")
    h.add_argument("--num_fewshot", type=int, default=None)
    h.add_argument("--limit", type=float, default=None)
    h.add_argument("--batch_size", default="auto", help="int, or auto")
    h.add_argument("--max_length", type=int, default=None)
    h.add_argument("--output", default="harness_results.json")
    return ap


def _perplexity(args, loaded, mesh, writer: bool) -> None:
    from mpt_jax.eval import perplexity
    from mpt_jax.eval.scoring import DEFAULT_BATCH_TOKENS, Scorer

    try:
        seq_lens = [int(x) for x in args.seq_lens.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seq_lens {args.seq_lens!r}: expected integers like "
                         "2048,8192") from None
    stream = perplexity.load_stream(args.data, loaded.tokenizer, text_field=args.text_field,
                                    max_tokens=args.max_tokens)
    _log(f"{args.data}: {stream.size} tokens")
    scorer = Scorer(loaded.model, mesh=mesh, batch_tokens=args.batch_tokens or
                    DEFAULT_BATCH_TOKENS, min_bucket=args.min_bucket,
                    progress=not args.no_progress)
    t0 = time.perf_counter()
    result = perplexity.evaluate(scorer, stream, seq_lens, stride=args.stride,
                                 final_tokens=args.final_tokens)
    result = {"checkpoint": args.checkpoint, "data": args.data,
              "seconds": time.perf_counter() - t0, **result}
    if writer:
        _write(args.output, _json(result))
        png = _beside(args.output, ".png")
        perplexity.plot(result, png, title=f"{args.checkpoint} on {args.data}")
        print(perplexity.markdown(result))
        _log(f"wrote {args.output} and {png}")


def _icl(args, loaded, mesh, writer: bool) -> None:
    from mpt_jax.eval import gauntlet as gauntlet_lib
    from mpt_jax.eval import icl, tasks
    from mpt_jax.eval.scoring import DEFAULT_BATCH_TOKENS

    limit = args.max_seq_len or loaded.model.config.max_seq_len
    if loaded.model.config.use_wpe and limit > loaded.model.config.max_seq_len:
        raise ValueError(f"--max_seq_len {limit} > {loaded.model.config.max_seq_len}: this model "
                         "has learned positions (no ALiBi) and cannot extrapolate")
    gauntlet = gauntlet_lib.Gauntlet.from_file(args.gauntlet) if args.gauntlet else None
    prepared = tasks.prepare_tasks(args.tasks, loaded.tokenizer, eos_id=loaded.eos_id,
                                   max_seq_len=limit)
    for t in prepared:  # a task's own max_seq_len is its limit
        if loaded.model.config.use_wpe and (t.config.max_seq_len or 0) > limit:
            raise ValueError(f"{t.config.source}: task {t.name!r}: max_seq_len "
                             f"{t.config.max_seq_len} > {limit}: this model has learned "
                             "positions (no ALiBi) and cannot extrapolate")
    n = sum(len(t.examples) for t in prepared)
    _log(f"{len(prepared)} task datasets, {n} examples")
    t0 = time.perf_counter()
    results = icl.run_tasks(loaded.model, prepared, loaded.tokenizer, eos_id=loaded.eos_id,
                            mesh=mesh, batch_tokens=args.batch_tokens or DEFAULT_BATCH_TOKENS,
                            generation_batch_size=args.generation_batch_size, max_seq_len=limit,
                            min_bucket=args.min_bucket, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    out = {"checkpoint": args.checkpoint, "seconds": seconds, "examples": n,
           "examples_per_s": n / seconds, "tasks": icl.results_json(results)}
    name = os.path.basename(os.path.normpath(args.checkpoint))
    table = icl.markdown_table(results, name, gauntlet.taxonomy() if gauntlet else None)
    if gauntlet is not None:
        out["gauntlet"] = icl.gauntlet_scores(results, gauntlet)
        table += "\n\n" + icl.gauntlet_table(out["gauntlet"], name)
    if writer:
        _write(args.output, _json(out))
        _write(_beside(args.output, ".md"), table + "\n")
        if args.samples:
            _write(args.samples, "".join(
                json.dumps({"task": r.name, **s}) + "\n" for r in results for s in r.samples))
        print(table)
        _log(f"{n} examples in {seconds:.1f}s ({n / seconds:.1f}/s); wrote {args.output}")


def _harness(args, mesh, writer: bool) -> None:
    from mpt_jax.eval import harness

    lm = harness.MPTJaxLM(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype,
                          batch_size=args.batch_size, max_length=args.max_length,
                          batch_tokens=args.batch_tokens, mesh=mesh,
                          min_bucket=args.min_bucket, progress=not args.no_progress)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    t0 = time.perf_counter()
    results = harness.evaluate(lm, names, include_path=args.include_path,
                               num_fewshot=args.num_fewshot, limit=args.limit)
    seconds = time.perf_counter() - t0
    if writer and results is not None:
        import lm_eval.utils

        results.pop("samples", None)
        results["mpt_jax"] = {"checkpoint": args.checkpoint, "seconds": seconds}
        _write(args.output, json.dumps(results, indent=1,
                                       default=lm_eval.utils.handle_non_serializable) + "\n")
        print(lm_eval.utils.make_table(results))
        _log(f"{seconds:.1f}s; wrote {args.output}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    prog = f"eval.py {args.cmd}"
    try:
        _check_args(args)
        from mpt_jax.train.trainer import initialize_distributed

        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        import jax

        from mpt_jax.eval.loading import load
        from mpt_jax.eval.scoring import parse_mesh

        mesh = parse_mesh(args.mesh)
        writer = jax.process_index() == 0
        if args.cmd == "harness":
            _harness(args, mesh, writer)
            return 0
        t0 = time.perf_counter()
        loaded = load(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype)
        _log(f"loaded {args.checkpoint} ({args.dtype}) in {time.perf_counter() - t0:.1f}s")
        {"perplexity": _perplexity, "icl": _icl}[args.cmd](args, loaded, mesh, writer)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "lm_eval":
            print(f"{prog}: error: lm-eval is not installed (pip install -e '.[eval]')",
                  file=sys.stderr)
            return 1
        raise
    except (ValueError, OSError) as e:
        msg = str(e) if not isinstance(e, OSError) or not e.filename else (
            f"{e.filename}: {e.strerror or e}")
        print(f"{prog}: error: {msg}".splitlines()[0], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a task's Jinja template (lm-eval renders them): the user's input
        if not type(e).__module__.startswith("jinja2"):
            raise
        print(f"{prog}: error: a task template failed: {type(e).__name__}: {e}".splitlines()[0],
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train an MPT model: python train.py --config configs/X.py --workdir DIR [--config.a.b=v ...]

Re-running the same command resumes from DIR's last checkpoint. Multi-host: start one process
per host with --coordinator_address/--num_processes/--process_id (or let TPU pods and SLURM
be detected); see README.md.
"""
import ast
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, logs).")
_COORD = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host).")
_NPROC = flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host).")
_PID = flags.DEFINE_integer("process_id", -1, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config = _CONFIG.value
        config.max_steps  # noqa: B018  (a config file that failed to load raises on access)
    except OSError as e:
        detail = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("[Errno")]
        print(f"train.py: error: cannot load --config: {detail[-1] if detail else e}",
              file=sys.stderr)
        sys.exit(2)
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / jax chatter
    logging.getLogger("mpt_jax").setLevel(logging.INFO)
    from mpt_jax.train import trainer

    trainer.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    try:
        summary = trainer.train(config, _WORKDIR.value)
    except (ValueError, trainer.NonFiniteError, trainer.LossSpikeError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    logging.getLogger("mpt_jax").info("done: %s", summary)


def parse_flags(argv):
    """absl flag parsing with one clear line (no traceback) for a bad flag or config key."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        # (a KeyError's str() is a repr: quotes, and a literal \n before "Did you mean"; the
        # config override code may pass that on inside another exception)
        msg = str(e.args[0]) if e.args else str(e)
        if len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":
            try:
                msg = str(ast.literal_eval(msg))
            except (ValueError, SyntaxError):
                pass
        msg = " ".join(msg.split()) or type(e).__name__
        if isinstance(e, (AttributeError, KeyError)):
            msg = f"unknown config key {msg} (see configs/base.py for the keys)"
        print(f"train.py: error: {msg}".splitlines()[0], file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

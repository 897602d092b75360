"""Train an MPT model: python train.py --config configs/X.py --workdir DIR [--config.a.b=v ...]

Re-running the same command resumes from DIR's last checkpoint. Multi-host: start one process
per host with --coordinator_address/--num_processes/--process_id (or let TPU pods and SLURM
be detected); see README.md.
"""
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
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / jax chatter
    logging.getLogger("mpt_jax").setLevel(logging.INFO)
    from mpt_jax import trainer

    trainer.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    try:
        summary = trainer.train(_CONFIG.value, _WORKDIR.value)
    except (ValueError, trainer.NonFiniteError, trainer.LossSpikeError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    logging.getLogger("mpt_jax").info("done: %s", summary)


if __name__ == "__main__":
    app.run(main)

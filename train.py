"""Train an MPT model:

    python train.py --config configs/X.py[:ARG] --workdir DIR [--config.a.b=v ...]

Re-running the same command resumes from DIR's last checkpoint (a finished run says so and
exits). Multi-host: start one process per host with --coordinator_address/--num_processes/
--process_id (or let TPU pods and SLURM be detected); see README.md.
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

_HELP = ("-h", "--help", "-help", "-?", "--helpshort", "--helpfull")


def _fail(msg: str) -> None:
    """One line on stderr, exit status 1 (no traceback)."""
    print(f"train.py: error: {' '.join(msg.split())}", file=sys.stderr)
    sys.exit(1)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {argv[1:]}")
    try:
        config = _CONFIG.value
        config.max_steps  # noqa: B018  (a config file that failed to load raises on access)
    except OSError as e:
        detail = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("[Errno")]
        _fail(f"cannot load --config: {detail[-1] if detail else e}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / jax chatter
    logger = logging.getLogger("mpt_jax")
    logger.setLevel(logging.INFO)
    from mpt_jax.train import trainer

    try:
        trainer.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
        summary = trainer.train(config, _WORKDIR.value)
    except (ValueError, trainer.NonFiniteError, trainer.LossSpikeError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if summary["stopped"] != "already complete":  # (the trainer said so itself)
        logger.info("done: %s", summary)


def _config_arg(argv) -> str:
    """The --config value as given on the command line (for messages)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg[len("--config="):]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return "?"


def _root_cause(e: BaseException) -> BaseException:
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return e


def _unquoted(msg: str) -> str:
    # a KeyError's str() is a repr: quotes, and a literal \n before "Did you mean"; the config
    # override code may pass that on inside another exception
    if len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":
        try:
            return str(ast.literal_eval(msg))
        except (ValueError, SyntaxError):
            pass
    return msg


def flag_error(e: Exception, argv) -> str:
    """One line naming what is wrong with the command line: a --config file that does not load
    (syntax error, no get_config, a bad :ARG), an unknown config key, a bad flag value."""
    config = _config_arg(argv)
    root = _root_cause(e)
    if isinstance(root, SyntaxError):
        return f"--config {config}: line {root.lineno}: {root.msg}"
    if isinstance(root, AttributeError) and "get_config" in str(root):
        return f"--config {config}: the file defines no get_config()"
    if isinstance(e, flags.IllegalFlagValueError) and str(e).startswith("flag --config="):
        # the config file raised (a bad :ARG, a bad value in it): its own message
        return f"--config {config}: {_unquoted(str(root.args[0]) if root.args else str(root))}"
    msg = _unquoted(str(e.args[0]) if e.args else str(e)) or type(e).__name__
    if isinstance(e, (AttributeError, KeyError)):
        return f"unknown config key {msg} (see configs/base.py for the keys)"
    if not isinstance(e, (flags.Error, TypeError, ValueError)):  # raised while loading the file
        return f"--config {config}: {type(root).__name__}: {root}"
    return msg


def parse_flags(argv):
    """absl flag parsing; --help prints the usage and exits 0; a bad flag, config file or
    config key is one `train.py: error:` line and exit status 1 (no traceback)."""
    if any(arg in _HELP for arg in argv[1:]):
        app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True)
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001  (a config file can raise anything)
        _fail(flag_error(e, argv))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

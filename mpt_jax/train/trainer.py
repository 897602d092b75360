"""train(config, workdir): the training loop, read top to bottom in the order things are built.

    0. processes     jax.distributed.initialize (explicit coordinator, or auto on TPU / SLURM)
    1. config        the model config (vocabulary from the tokenizer when model.vocab_size = 0)
    2. mesh          ('data', 'fsdp', 'tensor') from config.mesh
    3. data          this process's train iterator and held-out batches
    4. optimizer     clipping + decoupled LION / AdamW with the schedule
    5. state         restored from the last checkpoint, or created directly sharded
    6. steps         train_step / eval_step jitted once with explicit shardings
    7. loop          step, log, eval, checkpoint, stop on non-finite / spike / SIGTERM
    8. finish        wait for the last save, write loss.png
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections import deque

import jax
import numpy as np

from mpt_jax.train import checkpoint as ckpt_lib
from mpt_jax.train import metrics as metrics_lib
from mpt_jax.train import optim as optim_lib
from mpt_jax import sharding
from mpt_jax.train import step as step_lib
from mpt_jax.model.config import MPTConfig

log = logging.getLogger("mpt_jax.trainer")


class NonFiniteError(RuntimeError):
    """Raised when a step's loss or gradient norm is not finite (train.nonfinite='stop')."""


class LossSpikeError(RuntimeError):
    """Raised by the loss-spike guard when loss_spike.action='stop'."""


# ---------------------------------------------------------------------------------------------
# 0. processes
# ---------------------------------------------------------------------------------------------
def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
    """Joins the processes of a multi-host run into one JAX runtime (before any device use).

    Explicit: coordinator 'host:port', num_processes, process_id (CPU processes use gloo
    collectives). Automatic: on a TPU pod (TPU_WORKER_HOSTNAMES / MEGASCALE) or under SLURM
    with more than one task, `jax.distributed.initialize()` reads the environment. Otherwise a
    single process; nothing is done.
    """
    if coordinator_address:
        if num_processes <= 0 or not 0 <= process_id < num_processes:
            raise ValueError(f"--coordinator_address needs --num_processes > 0 and 0 <= "
                             f"--process_id < num_processes; got {num_processes}, {process_id}")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1
          or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")):
        jax.distributed.initialize()


# ---------------------------------------------------------------------------------------------
# 1. config
# ---------------------------------------------------------------------------------------------
def model_config(config, tokenizer_vocab: int | None) -> MPTConfig:
    """MPTConfig from config.model; vocab_size 0 -> the tokenizer's, padded to 128."""
    d = config.model.to_dict()
    vocab = d["vocab_size"]
    if vocab == 0:
        if tokenizer_vocab is None:
            raise ValueError("model.vocab_size is 0 (derive from the tokenizer), but the data "
                             "config names no tokenizer")
        d["vocab_size"] = -(-tokenizer_vocab // 128) * 128
    elif tokenizer_vocab is not None and tokenizer_vocab > vocab:
        raise ValueError(f"the tokenizer has {tokenizer_vocab} tokens, more than "
                         f"model.vocab_size {vocab}")
    cfg = MPTConfig.from_dict(d)
    seq = config.train.seq_len
    if seq > cfg.max_seq_len:
        raise ValueError(f"train.seq_len {seq} exceeds model.max_seq_len {cfg.max_seq_len}")
    if config.train.nonfinite not in step_lib.NONFINITE_ACTIONS:
        raise ValueError(f"train.nonfinite must be one of {step_lib.NONFINITE_ACTIONS}, got "
                         f"{config.train.nonfinite!r}")
    if config.loss_spike.action not in ("warn", "stop"):
        raise ValueError(f"loss_spike.action must be 'warn' or 'stop', got "
                         f"{config.loss_spike.action!r}")
    for key in ("max_steps", "log_every", "eval_every", "checkpoint_every"):
        if config[key] <= 0:
            raise ValueError(f"{key} must be positive, got {config[key]}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Reliability helpers
# ---------------------------------------------------------------------------------------------
class LossSpikeGuard:
    """llm-foundry's kill_loss_spike: over a window of recent losses, a loss above
    `multiplier` x the window mean (or above `loss_cap`) for `patience` consecutive steps is a
    spike; `check` returns a message then (the trainer warns or stops, by config)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.window: deque[float] = deque(maxlen=cfg.window)
        self.bad = 0

    def check(self, loss: float) -> str | None:
        c = self.cfg
        if not c.enabled:
            return None
        full = len(self.window) == c.window
        mean = float(np.mean(self.window)) if self.window else math.inf
        outlier = full and loss > c.multiplier * mean
        capped = full and loss > c.loss_cap
        self.bad = self.bad + 1 if (outlier or capped) else 0
        if not (outlier or capped):
            self.window.append(loss)
        if self.bad >= c.patience:
            self.bad = 0
            return (f"loss spike: {loss:.4f} vs window mean {mean:.4f} (multiplier "
                    f"{c.multiplier}, cap {c.loss_cap}) for {c.patience} consecutive steps")
        return None

    def state(self) -> dict:
        """JSON-serialisable, for checkpoints: a resumed run judges spikes as an
        uninterrupted one would."""
        return {"window": list(self.window), "bad": self.bad}

    def set_state(self, state: dict) -> None:
        self.window.clear()
        self.window.extend(float(x) for x in state["window"])
        self.bad = int(state["bad"])


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop finishes the step, saves and returns."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def any_process(self) -> bool:
        flag = self.received is not None
        if jax.process_count() == 1:
            return flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _host(x) -> float:
    """A replicated scalar's local value (works for multi-process global arrays)."""
    return float(np.asarray(x.addressable_data(0)))


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def train(config, workdir: str) -> dict:
    """Trains per `config` in `workdir`, resuming from its last checkpoint. Returns a summary
    (last step, last loss, last eval loss, why it stopped)."""
    from mpt_jax.data import pipeline as data_lib  # heavy import (grain), only for training

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    pid, nproc = jax.process_index(), jax.process_count()
    writer_process = pid == 0

    # 1. config ---------------------------------------------------------------------------
    resolved = data_lib.resolve_data(config.data, workdir)
    cfg = model_config(config, resolved.vocab_size)
    seq_len, global_batch = config.train.seq_len, config.train.global_batch_size

    # 2. mesh -----------------------------------------------------------------------------
    rules = sharding.rules_from_config(config.mesh.rules)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(global_batch, mesh, rules, what="train.global_batch_size")
    sharding.check_batch(config.eval.batch_size, mesh, rules, what="eval.batch_size")

    # 3. data -----------------------------------------------------------------------------
    train_iter = data_lib.make_train_iterator(
        config.data, seq_len=seq_len, batch_size=global_batch // nproc, seed=config.seed,
        process_index=pid, process_count=nproc, workdir=workdir)
    # data.eval_fraction 0: everything is training data, and there is no evaluation
    eval_batches = None if config.data.eval_fraction == 0 else data_lib.make_eval_batches(
        config.data, seq_len=seq_len, batch_size=config.eval.batch_size // nproc,
        num_batches=config.eval.num_batches, process_index=pid, process_count=nproc,
        workdir=workdir)
    batch_keys = ("input_ids", "segment_ids") if config.data.packing else ("input_ids",)

    # 4. optimizer ------------------------------------------------------------------------
    tx = optim_lib.make_optimizer(config.optim, config.max_steps, clip=False)  # the step clips
    lr_fn = lambda step: config.optim.lr * optim_lib.make_schedule(  # noqa: E731
        config.optim, config.max_steps)(step)
    settings = step_lib.make_settings(cfg, config.train, tx, lr_fn, mesh=mesh, rules=rules,
                                      seed=config.seed, global_batch=global_batch,
                                      clip_norm=config.optim.clip_norm)

    # 5. state ----------------------------------------------------------------------------
    abstract_state, state_shardings = step_lib.state_shardings(cfg, config.train, tx, mesh, rules)
    if config.checkpoint.keep < 1:
        raise ValueError(f"checkpoint.keep={config.checkpoint.keep}: keep at least 1 checkpoint "
                         "(0 would delete each one as it is written)")
    manager = ckpt_lib.make_manager(workdir, keep=config.checkpoint.keep,
                                    async_save=config.checkpoint.async_save)
    latest = manager.latest_step()
    if latest is not None:
        # the model config first: arrays of another model would fail inside orbax, unclearly
        saved_cfg = ckpt_lib.restore_model_config(manager, latest)
        want_cfg = cfg.to_dict("foundry")
        if saved_cfg != want_cfg:
            diff = sorted(k for k in set(saved_cfg) | set(want_cfg)
                          if saved_cfg.get(k) != want_cfg.get(k))
            raise ValueError(f"checkpoint {latest} in {workdir} has a different model config "
                             f"(keys {diff}); use another workdir")
        with sharding.use_mesh(mesh):
            state, train_state = ckpt_lib.restore(manager, latest, abstract_state,
                                                  state_shardings)
        if len(train_state["data_states"]) != nproc:
            raise ValueError(f"checkpoint {latest} was written by "
                             f"{len(train_state['data_states'])} processes, this run has {nproc}")
        train_iter.set_state(train_state["data_states"][pid])
        resumed = train_state
        start_step = int(train_state["step"])
        log.info("resumed from checkpoint %d", start_step)
    else:
        state = step_lib.init_state(cfg, config.train, tx, mesh, rules, config.seed)
        start_step, resumed = 0, {}

    # 6. steps ----------------------------------------------------------------------------
    p_train_step = step_lib.compile_train_step(settings, state_shardings, mesh, batch_keys,
                                               xla_options=config.train.xla_options)
    p_eval_step = step_lib.compile_eval_step(settings, state_shardings["params"], mesh,
                                             batch_keys)

    # 7. loop -----------------------------------------------------------------------------
    writer = metrics_lib.MetricWriter(workdir, enabled=writer_process)
    bar = metrics_lib.progress_bar(start=start_step, total=config.max_steps,
                                   enabled=writer_process)
    guard = LossSpikeGuard(config.loss_spike)
    if "loss_spike" in resumed:  # (checkpoints of older versions have neither key)
        guard.set_state(resumed["loss_spike"])
    flops_token = metrics_lib.flops_per_token(cfg, seq_len)
    n_devices = jax.device_count()
    tokens_per_step = global_batch * seq_len
    if writer_process:
        log.info("model %s: %.2fM params, %.3g GFLOP/token; mesh %s; %d micro-steps of %d",
                 cfg.d_model, cfg.num_params() / 1e6, flops_token / 1e9, dict(mesh.shape),
                 settings.n_micro, global_batch // settings.n_micro)

    def evaluate(params):
        nll = count = 0.0
        for local in eval_batches:
            s, c = p_eval_step(params, sharding.make_global_batch(local, mesh, rules))
            nll, count = nll + _host(s), count + _host(c)
        return nll / max(count, 1.0)

    def save(step):
        ckpt_lib.save(manager, step, state, model_config=cfg.to_dict("foundry"), train_state={
            "step": step, "seed": config.seed, "skipped_steps": skipped,
            "loss_spike": guard.state(),
            "data_states": ckpt_lib.gather_process_states(train_iter.get_state())})

    step, last_saved = start_step, start_step if latest is not None else None
    last_loss = last_eval = None
    stop_reason = "max_steps"
    skipped = int(resumed.get("skipped_steps", 0))
    t_log, steps_since_log, compile_s = time.time(), 0, None
    profiling = False
    with sharding.use_mesh(mesh), sharding.use_rules(rules), StopSignal() as stop:
        try:
            while step < config.max_steps:
                if config.profile.start_step == step and writer_process:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                    profiling = True
                t0 = time.time()
                batch = sharding.make_global_batch(next(train_iter), mesh, rules)
                state, m = p_train_step(state, batch)
                m = {k: _host(v) for k, v in m.items()}
                step += 1
                if compile_s is None:
                    compile_s = time.time() - t0
                    t_log, steps_since_log = time.time(), 0
                else:
                    steps_since_log += 1
                if profiling and step >= config.profile.start_step + config.profile.num_steps:
                    jax.profiler.stop_trace()
                    profiling = False
                bar.update(1)

                if m["finite"] == 0.0:
                    msg = (f"step {step}: non-finite loss {m['loss']} or grad_norm "
                           f"{m['grad_norm']}; the update was not applied")
                    if config.train.nonfinite == "stop":
                        raise NonFiniteError(msg + f"; stopping (last good checkpoint: "
                                             f"{manager.latest_step()})")
                    skipped += 1
                    log.warning(msg + " (skipped)")
                else:
                    last_loss = m["loss"]
                    spike = guard.check(m["loss"])
                    if spike:
                        if config.loss_spike.action == "stop":
                            raise LossSpikeError(f"step {step}: {spike}")
                        log.warning("step %d: %s", step, spike)

                if step % config.log_every == 0 or step == config.max_steps:
                    now = time.time()
                    dt = (now - t_log) / steps_since_log if steps_since_log else None
                    tps = tokens_per_step / dt if dt else None
                    row = {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                           "tokens_per_s": tps,
                           "tokens_per_s_per_device": tps / n_devices if tps else None,
                           "mfu": (metrics_lib.mfu(tps, cfg, seq_len, n_devices)
                                   if tps else None),
                           "step_time_s": dt, "compile_s": compile_s,
                           "tokens": step * tokens_per_step, "skipped_steps": skipped,
                           "data_epochs": train_iter.epochs(),  # this process's, per source
                           **metrics_lib.device_memory_gb()}
                    writer.write(step, row)
                    bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)
                    t_log, steps_since_log = now, 0

                if eval_batches is not None and (step % config.eval_every == 0
                                                 or step == config.max_steps):
                    last_eval = evaluate(state["params"])
                    writer.write(step, {"eval_loss": last_eval})
                    if writer_process:
                        bar.write(f"step {step}: eval loss {last_eval:.4f}")
                    t_log = time.time()  # eval time is not train time

                if step % config.checkpoint_every == 0 or step == config.max_steps:
                    save(step)
                    last_saved = step

                if stop.any_process():
                    stop_reason = f"signal {stop.received or 'on another process'}"
                    break
        finally:
            if profiling:
                jax.profiler.stop_trace()
            bar.close()
            manager.wait_until_finished()  # saves already started hold good states: finish them

        # 8. finish -------------------------------------------------------------------------
        if last_saved != step:
            save(step)
        manager.wait_until_finished()
    manager.close()
    writer.close()
    train_iter.close()
    if writer_process:
        metrics_lib.plot_losses(workdir)
    return {"step": step, "loss": last_loss, "eval_loss": last_eval, "stopped": stop_reason}

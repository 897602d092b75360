"""train(config, workdir): the training loop, read top to bottom in the order things are built.

    0. processes     jax.distributed.initialize (explicit coordinator, or auto on TPU / SLURM)
    1. config        every section checked before any data is read or prepared
    2. mesh          ('data', 'fsdp', 'tensor') from config.mesh; the batches divide over it
    3. data          the shards (the built-in corpus prepared on first use); the model config
                     (vocabulary from the tokenizer when model.vocab_size = 0; a finetune's is
                     train.init_from's, and so is its tokenizer, which the data's must equal);
                     the tokenizer written beside the checkpoints; ICL tasks tokenized
    4. optimizer     clipping + decoupled LION / AdamW with the schedule
    5. state         restored from the last checkpoint (a run already at max_steps stops
                     here; a finetune resumes from its own checkpoints, never init_from), or
                     created directly sharded: random, or train.init_from's weights read
                     straight into their shards with a fresh optimizer; the data iterators
    6. steps         train_step / eval_step jitted once with explicit shardings
    7. loop          (eval.first: evaluate at step 0) step; metrics read one step late
                     (monitor.StepMetrics), so dispatch runs ahead of the devices; at log /
                     eval (held-out loss, ICL accuracies) / checkpoint boundaries: log, eval,
                     save, stop on SIGTERM; every step checked for non-finite values and
                     loss spikes before a checkpoint that includes it
    8. finish        wait for the last save, write loss.png
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import tokenizers
from flax import nnx

from mpt_jax import sharding, storage
from mpt_jax.model import REMAT_POLICIES, attention
from mpt_jax.model.config import MPTConfig
from mpt_jax.train import checkpoint as ckpt_lib
from mpt_jax.train import init_from as init_lib
from mpt_jax.train import metrics as metrics_lib
from mpt_jax.train import monitor
from mpt_jax.train import optim as optim_lib
from mpt_jax.train import step as step_lib

log = logging.getLogger(__name__)
TOKENIZER_FILE = init_lib.TOKENIZER_FILE


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
def check_config(config, workdir: str | None = None) -> MPTConfig:
    """Checks every section that needs no data, so a bad value fails before any data is read
    or prepared. Returns the model config: with train.init_from the checkpoint's merged with
    config.model (`pretrained_model_config`); otherwise config.model's, with a placeholder
    vocabulary of 128 when model.vocab_size is 0 (the real one comes from the tokenizer:
    `model_config`). The mesh and batch sizes are checked with the mesh (`check_batches`)."""
    for key in ("max_steps", "log_every", "eval_every", "checkpoint_every"):
        if config[key] <= 0:
            raise ValueError(f"{key} must be positive, got {config[key]}")
    for key in ("train.global_batch_size", "eval.batch_size"):
        section, name = key.split(".")
        if config[section][name] <= 0:
            raise ValueError(f"{key} must be positive, got {config[section][name]}")
    if config.checkpoint.keep < 1:
        raise ValueError(f"checkpoint.keep={config.checkpoint.keep}: keep at least 1 checkpoint "
                         "(0 would delete each one as it is written)")
    if config.train.nonfinite not in step_lib.NONFINITE_ACTIONS:
        raise ValueError(f"train.nonfinite must be one of {step_lib.NONFINITE_ACTIONS}, got "
                         f"{config.train.nonfinite!r}")
    if config.loss_spike.action not in ("warn", "stop"):
        raise ValueError(f"loss_spike.action must be 'warn' or 'stop', got "
                         f"{config.loss_spike.action!r}")
    if config.train.init_from:
        cfg = pretrained_model_config(config, workdir)
    else:
        d = config.model.to_dict()
        cfg = MPTConfig.from_dict({**d, "vocab_size": d["vocab_size"] or 128})
    if cfg.attn_config.attn_pdrop > 0:
        raise ValueError(
            f"model.attn_config.attn_pdrop={cfg.attn_config.attn_pdrop}: attention-probability "
            "dropout is not supported in training (the flash kernels never form the attention "
            "probabilities to drop); use 0, as MPT-7B did (resid_pdrop / emb_pdrop work)")
    seq = config.train.seq_len
    if not 0 < seq <= cfg.max_seq_len:
        raise ValueError(f"train.seq_len {seq} must be in [1, model.max_seq_len "
                         f"{cfg.max_seq_len}]")
    chunk = config.train.loss_chunk_size
    if chunk > 0 and seq % min(chunk, seq):
        raise ValueError(f"train.loss_chunk_size {chunk} must divide train.seq_len {seq}")
    lora = step_lib.model_kwargs(config.train)["lora"]  # (the dtypes, train.lora)
    if lora is not None:
        if not config.train.init_from:
            raise ValueError(f"train.lora.rank={lora.rank}: LoRA adapts a pretrained model; "
                             "set train.init_from to the base")
        lora.check_model(cfg)
        if config.train.lora.adapter:  # (read now: a misfit fails before anything is written)
            init_lib.read_adapter(config.train.lora.adapter, lora, cfg)
    if config.train.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"train.remat_policy={config.train.remat_policy!r}: expected one of "
                         f"{tuple(REMAT_POLICIES)}")
    if config.train.attn_impl not in attention.IMPLS:
        raise ValueError(f"train.attn_impl={config.train.attn_impl!r}: expected one of "
                         f"{attention.IMPLS}")
    step_lib.parse_xla_options(config.train.xla_options)
    optim_lib.make_optimizer(config.optim, config.max_steps)  # name, schedule, warmup, mask
    if config.eval.num_batches <= 0 and config.data.eval_fraction > 0:
        raise ValueError(f"eval.num_batches must be positive, got {config.eval.num_batches} "
                         "(data.eval_fraction 0 turns evaluation off)")
    if config.eval.icl_batch_tokens < 1:
        raise ValueError(f"eval.icl_batch_tokens must be positive, got "
                         f"{config.eval.icl_batch_tokens}")
    if config.eval.icl_tasks:
        from mpt_jax.eval import tasks as tasks_lib

        for path in config.eval.icl_tasks:  # (tokenized once the tokenizer is known)
            tasks_lib.load_task_file(path)
    from mpt_jax.data import pipeline as data_lib
    from mpt_jax.data import sft_corpus

    data_lib.check_data_config(config.data)
    if config.data.builtin in sft_corpus.BUILTIN_NAMES:
        check_packing(cfg, "examples", config.data.packing)
    return cfg


def check_packing(cfg: MPTConfig, mode: str, packing: bool) -> None:
    """Packed finetuning examples need segment-aware attention. Without it the examples of a
    row would attend to each other (their loss stays apart, but each response would be
    conditioned on unrelated examples before it), so such a run is refused rather than the
    model config changed behind the user's back."""
    if mode == "examples" and packing and not cfg.attn_config.attn_uses_sequence_id:
        raise ValueError(
            "data.packing=True packs several finetuning examples into a row, but "
            "model.attn_config.attn_uses_sequence_id is False, so they would attend to each "
            "other: set --config.model.attn_config.attn_uses_sequence_id=True (a change a "
            "finetune may make) or data.packing=False")


def pretrained_model_config(config, workdir: str | None) -> MPTConfig:
    """The model of a finetune: train.init_from's config with config.model's overrides
    (convert.pretrained.merge_finetune_config: only safe keys may differ). A workdir that
    already holds a checkpoint resumes from it: its own saved config is the base then, and
    train.init_from is not read (it may be gone)."""
    from mpt_jax.convert import pretrained
    from mpt_jax.convert.io import ConversionError

    init_from = config.train.init_from
    saved = ckpt_lib.latest_model_config(workdir) if workdir else None
    try:
        base = MPTConfig.from_dict(saved) if saved is not None else \
            pretrained.read_model_config(init_from)
    except ConversionError as e:
        raise ValueError(f"train.init_from={init_from!r}: {e}") from None
    return pretrained.merge_finetune_config(base, config.model.to_dict())


def check_batches(config, mesh, rules) -> None:
    """The train and eval batches divide over the mesh (and the micro-batches over the rows)."""
    step_lib.micro_steps(config.train.global_batch_size, config.train.micro_batch_size, mesh,
                         rules)
    sharding.check_batch(config.eval.batch_size, mesh, rules, what="eval.batch_size")


def model_config(config, tokenizer_vocab: int | None, base: MPTConfig | None = None
                 ) -> MPTConfig:
    """MPTConfig from config.model; vocab_size 0 -> the tokenizer's, padded to 128. `base`:
    a finetune's model (pretrained_model_config), checked against the tokenizer."""
    if base is not None:
        if tokenizer_vocab is not None and tokenizer_vocab > base.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer_vocab} tokens, more than "
                             f"train.init_from's vocab_size {base.vocab_size}")
        return base
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
    return MPTConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def train(config, workdir: str) -> dict:
    """Trains per `config` in `workdir`, resuming from its last checkpoint. Returns a summary
    (last step, last loss, last eval loss, why it stopped: 'max_steps', 'signal ...' or
    'already complete' when the last checkpoint is at max_steps and nothing was trained)."""
    from mpt_jax.data import pipeline as data_lib  # heavy import (grain), only for training

    workdir = storage.abspath(workdir)
    ckpt_lib.check_location(workdir)
    if storage.isfile(workdir):
        raise ValueError(f"--workdir {workdir}: a file, not a directory")
    pid, nproc = jax.process_index(), jax.process_count()
    writer_process = pid == 0

    # 1. config: every section that needs no data (a finetune's model: init_from's) --------
    init_from = config.train.init_from
    resuming = bool(ckpt_lib.finished_steps(workdir))
    checked = check_config(config, workdir)
    base_cfg = checked if init_from else None
    seq_len, global_batch = config.train.seq_len, config.train.global_batch_size

    # 2. mesh -----------------------------------------------------------------------------
    rules = sharding.rules_from_config(config.mesh.rules)
    mesh = sharding.make_mesh(config.mesh)
    check_batches(config, mesh, rules)

    # 3. data: the shards (the built-in corpus is prepared on first use), the model config
    # with the tokenizer's vocabulary, the tokenizer beside the checkpoints ----------------
    # (the workdir only now, and before the data only when the data goes into it: a run
    # refused so far leaves no workdir behind)
    data_cfg = config.data
    # A finetune's tokenizer: the checkpoint's (the data's must be the same); a resumed one
    # has it beside its own checkpoints.
    ckpt_tokenizer = None
    if init_from:
        ckpt_tokenizer = (init_lib.checkpoint_tokenizer(init_from) if not resuming else
                          init_lib.checkpoint_tokenizer(workdir))
        if ckpt_tokenizer is not None and data_cfg.builtin and not data_cfg.tokenizer:
            data_cfg = data_cfg.copy_and_resolve_references()  # (the built-in set tokenizes
            with data_cfg.unlocked():                           # with the checkpoint's)
                data_cfg.tokenizer = ckpt_tokenizer
    if data_cfg.builtin:
        _make_workdir(workdir)
    resolved = data_lib.resolve_data(data_cfg, workdir)
    if ckpt_tokenizer is not None:
        init_lib.check_same_tokenizer(init_from, ckpt_tokenizer, resolved)
    cfg = model_config(config, resolved.vocab_size, base_cfg)
    check_packing(cfg, resolved.mode, data_cfg.packing)
    tokenizer_json = storage.read_text(resolved.tokenizer_path)
    tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    icl_tasks, eos_id = [], None
    if config.eval.icl_tasks:  # tokenized now: a bad task or example fails before step 1
        from mpt_jax.eval import loading, tasks as tasks_lib

        eos_id, _ = loading.special_ids(
            tokenizer, None if ckpt_tokenizer is None else storage.dirname(ckpt_tokenizer), cfg)
        icl_tasks = tasks_lib.prepare_tasks(list(config.eval.icl_tasks), tokenizer,
                                            eos_id=eos_id, max_seq_len=seq_len)
    _make_workdir(workdir)
    if writer_process:
        _write_if_changed(storage.join(workdir, TOKENIZER_FILE), tokenizer_json)
        if ckpt_tokenizer is not None and not resuming:  # its special tokens, chat template
            _copy_tokenizer_files(storage.dirname(ckpt_tokenizer), workdir)

    lora = step_lib.model_kwargs(config.train)["lora"]  # LoRA: adapters trained, base frozen
    base_fingerprint = None

    # 4. optimizer ------------------------------------------------------------------------
    tx = optim_lib.make_optimizer(config.optim, config.max_steps, clip=False)  # the step clips
    lr_fn = lambda step: config.optim.lr * optim_lib.make_schedule(  # noqa: E731
        config.optim, config.max_steps)(step)
    settings = step_lib.make_settings(cfg, config.train, tx, lr_fn, mesh=mesh, rules=rules,
                                      seed=config.seed, global_batch=global_batch,
                                      clip_norm=config.optim.clip_norm)

    # 5. state: restored from the last checkpoint, or created directly sharded; the data
    # iterators (after the model-config and complete checks: a run stopped there builds none)
    abstract_state, state_shardings = step_lib.state_shardings(cfg, config.train, tx, mesh, rules)
    manager = ckpt_lib.make_manager(workdir, keep=config.checkpoint.keep,
                                    async_save=config.checkpoint.async_save)
    try:  # (an open manager's threads would fail loudly at interpreter exit)
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
            if latest >= config.max_steps:
                manager.close()
                log.info("%s: already complete at step %d (max_steps %d); nothing to train",
                         workdir, latest, config.max_steps)
                return {"step": latest, "loss": None, "eval_loss": None,
                        "stopped": "already complete"}
        train_iter = data_lib.make_train_iterator(
            data_cfg, seq_len=seq_len, batch_size=global_batch // nproc, seed=config.seed,
            process_index=pid, process_count=nproc, workdir=workdir)
        # data.eval_fraction 0: everything is training data, and there is no evaluation
        eval_batches = None if data_cfg.eval_fraction == 0 else data_lib.make_eval_batches(
            data_cfg, seq_len=seq_len, batch_size=config.eval.batch_size // nproc,
            num_batches=config.eval.num_batches, process_index=pid, process_count=nproc,
            workdir=workdir)
        batch_keys = data_lib.batch_keys(resolved, data_cfg.packing)
        if latest is not None:
            trained_abstract = {**abstract_state, "params": step_lib.trainable(
                abstract_state["params"], lora is not None)[0]}
            trained_shardings = {**state_shardings, "params": step_lib.trainable(
                state_shardings["params"], lora is not None)[0]}
            with sharding.use_mesh(mesh):
                state, train_state = ckpt_lib.restore(manager, latest, trained_abstract,
                                                      trained_shardings)
            if lora is not None:  # the frozen base: train.init_from again, checked to be the same
                state["params"], base_fingerprint = init_lib.resumed_lora_params(
                    workdir, latest, init_from, lora, state["params"], abstract_state,
                    state_shardings)
            if len(train_state["data_states"]) != nproc:
                raise ValueError(f"checkpoint {latest} was written by "
                                 f"{len(train_state['data_states'])} processes, this run has "
                                 f"{nproc}")
            train_iter.set_state(train_state["data_states"][pid])
            resumed = train_state
            start_step = int(train_state["step"])
            log.info("resumed from checkpoint %d%s", start_step,
                     f" (the finetune's own; train.init_from {init_from} not read)"
                     if init_from else "")
        elif init_from:
            adapters = None
            if lora is not None:
                adapters = (init_lib.adapters_from(config.train.lora.adapter, lora, cfg,
                                                   state_shardings)
                            if config.train.lora.adapter else
                            step_lib.init_adapters(cfg, config.train, mesh, rules, config.seed))
            state = init_lib.init_finetune_state(init_from, abstract_state, state_shardings, tx,
                                                 mesh, rules, adapters=adapters)
            if lora is not None:
                from mpt_jax.model import lora as lora_lib

                base_fingerprint = lora_lib.fingerprint(lora_lib.split(state["params"])[1])
            start_step, resumed = 0, {}
            log.info("finetuning from %s: its weights%s, a fresh optimizer and schedule at step 0",
                     init_from, "" if lora is None else
                     f" frozen, LoRA rank {lora.rank} on {', '.join(lora.targets)}")
        else:
            state = step_lib.init_state(cfg, config.train, tx, mesh, rules, config.seed)
            start_step, resumed = 0, {}

        # 6. steps ----------------------------------------------------------------------------
        p_train_step = step_lib.compile_train_step(settings, state_shardings, mesh, batch_keys,
                                                   xla_options=config.train.xla_options)
        p_eval_step = step_lib.compile_eval_step(settings, state_shardings["params"], mesh,
                                                 batch_keys)
    except BaseException:
        manager.close()
        raise

    # 7. loop -----------------------------------------------------------------------------
    writer = metrics_lib.MetricWriter(workdir, enabled=writer_process)
    bar = metrics_lib.progress_bar(start=start_step, total=config.max_steps,
                                   enabled=writer_process)
    guard = monitor.LossSpikeGuard(config.loss_spike)
    if "loss_spike" in resumed:  # (checkpoints of older versions have neither key)
        guard.set_state(resumed["loss_spike"])
    flops_token = metrics_lib.flops_per_token(cfg, seq_len)
    n_devices = jax.device_count()
    tokens_per_step = global_batch * seq_len
    tokenizer_tree = json.loads(tokenizer_json)
    if writer_process:
        log.info("model %s: %.2fM params, %.3g GFLOP/token; mesh %s; %d micro-steps of %d",
                 cfg.d_model, cfg.num_params() / 1e6, flops_token / 1e9, dict(mesh.shape),
                 settings.n_micro, global_batch // settings.n_micro)

    def evaluate(params):
        """Held-out loss (of finetuning examples: their response tokens), and the ICL
        tasks' accuracies."""
        out = {}
        if eval_batches is not None:
            nll = count = 0.0
            for local in eval_batches:
                s, c = p_eval_step(params, sharding.make_global_batch(local, mesh, rules))
                values = monitor.host_metrics({"nll": s, "count": c})
                nll, count = nll + values["nll"], count + values["count"]
            out["eval_loss"], out["eval_tokens"] = nll / max(count, 1.0), count
        if icl_tasks:
            from mpt_jax.eval import icl

            scores = icl.evaluate_tasks(
                nnx.merge(settings.graphdef, params), icl_tasks, tokenizer, eos_id=eos_id,
                mesh=mesh, rules=rules, max_seq_len=seq_len,
                batch_tokens=config.eval.icl_batch_tokens)
            out.update({f"icl/{name}": value for name, value in scores.items()})
        return out

    def eval_and_log(step):
        nonlocal last_eval
        values = evaluate(state["params"])
        writer.write(step, values)
        last_eval = values.get("eval_loss", last_eval)
        if writer_process:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k != "eval_tokens")
            bar.write(f"step {step}: {shown}")

    def save(step):
        trained = step_lib.trainable(state["params"], lora is not None)[0]
        ckpt_lib.save(manager, step, {**state, "params": trained},
                      model_config=cfg.to_dict("foundry"), train_state={
            "step": step, "seed": config.seed, "skipped_steps": skipped,
            "loss_spike": guard.state(),
            "data_states": ckpt_lib.gather_process_states(train_iter.get_state())},
            tokenizer=tokenizer_tree,
            lora=None if lora is None else {**lora.to_dict(),
                                            "base": storage.abspath(init_from),
                                            "base_fingerprint": base_fingerprint})

    skipped = int(resumed.get("skipped_steps", 0))
    last_loss = last_eval = None
    # train time between log rows: from when a step's metrics arrive, eval time taken out
    clock = {"compile_s": None, "t_log": None, "steps": 0}

    def on_step(step, m):  # every step's metrics, in order, one step late
        nonlocal skipped, last_loss
        now = time.time()
        if clock["compile_s"] is None:
            clock["compile_s"], clock["t_log"] = now - t_first, now
        else:
            clock["steps"] += 1
        if m["finite"] == 0.0:
            msg = (f"step {step}: non-finite loss {m['loss']} or grad_norm {m['grad_norm']}; "
                   "the update was not applied")
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

    def log_row(step, m):
        now = time.time()
        dt = (now - clock["t_log"]) / clock["steps"] if clock["steps"] else None
        tps = tokens_per_step / dt if dt else None
        writer.write(step, {
            "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"], "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / n_devices if tps else None,
            "mfu": metrics_lib.mfu(tps, cfg, seq_len, n_devices) if tps else None,
            "step_time_s": dt, "compile_s": clock["compile_s"],
            "tokens": step * tokens_per_step, "skipped_steps": skipped,
            "data_epochs": train_iter.epochs(),  # this process's, per source
            **({"packing_efficiency": train_iter.packing_efficiency(),  # this process's rows
                "loss_tokens": m["tokens"]} if "segment_ids" in batch_keys else {}),
            **metrics_lib.device_memory_gb()})
        bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)
        clock["t_log"], clock["steps"] = now, 0

    step, last_saved = start_step, start_step if latest is not None else None
    stop_reason = "max_steps"
    reader = monitor.StepMetrics(on_step)
    profiling = False
    evaluating = eval_batches is not None or bool(icl_tasks)
    with sharding.use_mesh(mesh), sharding.use_rules(rules), monitor.StopSignal() as stop:
        if evaluating and config.eval.first and start_step == 0:
            eval_and_log(0)  # the starting point (a finetune: the pretrained model's)
        t_first = time.time()
        try:
            while step < config.max_steps:
                if config.profile.start_step == step and writer_process:
                    storage.require_local(workdir, "profile.start_step: --workdir",
                                          "jax.profiler writes traces to local files")
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                    profiling = True
                batch = sharding.make_global_batch(next(train_iter), mesh, rules)
                state, metrics = p_train_step(state, batch)
                step += 1
                reader.push(step, metrics)  # checks step - 1: no wait on this step
                bar.update(1)
                if profiling and step >= config.profile.start_step + config.profile.num_steps:
                    jax.profiler.stop_trace()
                    profiling = False

                last = step == config.max_steps
                log_now = step % config.log_every == 0 or last
                eval_now = evaluating and (step % config.eval_every == 0 or last)
                save_now = step % config.checkpoint_every == 0 or last
                if not (log_now or eval_now or save_now):
                    continue
                # A boundary: this step's metrics (checked) before anything is logged or saved.
                m = reader.flush()
                if log_now:
                    log_row(step, m)
                if eval_now:
                    t0 = time.time()
                    eval_and_log(step)
                    clock["t_log"] += time.time() - t0  # eval time is not train time
                if save_now:
                    save(step)
                    last_saved = step
                if stop.any_process():  # at boundaries only: a collective across processes
                    stop_reason = f"signal {stop.received or 'on another process'}"
                    break
        finally:
            if profiling:
                jax.profiler.stop_trace()
            bar.close()
            manager.wait_until_finished()  # saves already started hold good states: finish them

        # 8. finish -------------------------------------------------------------------------
        if last_saved != step:
            reader.flush()
            save(step)
        manager.wait_until_finished()
    manager.close()
    writer.close()
    train_iter.close()
    if writer_process:
        metrics_lib.plot_losses(workdir)
    return {"step": step, "loss": last_loss, "eval_loss": last_eval, "stopped": stop_reason}


def _copy_tokenizer_files(src_dir: str, workdir: str) -> None:
    """tokenizer_config.json and friends beside the run's tokenizer.json (EOS / BOS, chat
    template: what evaluation and export read)."""
    from mpt_jax.convert.convert import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if name != TOKENIZER_FILE and storage.isfile(storage.join(src_dir, name)):
            storage.write_atomic(storage.join(workdir, name),
                                 storage.read_bytes(storage.join(src_dir, name)))


def _make_workdir(workdir: str) -> None:
    if storage.is_remote(workdir):
        return  # object stores have no directories to create
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--workdir {workdir}: cannot create it ({e.strerror})") from None


def _write_if_changed(path: str, text: str) -> None:
    """Writes `text` to `path` atomically, unless the file already holds exactly that."""
    if storage.isfile(path) and storage.read_text(path) == text:
        return
    storage.write_atomic(path, text)

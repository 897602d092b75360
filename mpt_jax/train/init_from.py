"""Step 0 of a finetune (train.init_from): the pretrained weights read straight into their
shards with a fresh optimizer state, a LoRA run's adapters (fresh, train.lora.adapter's, or its
own on resume, over the base whose fingerprint it recorded), and the checkpoint's tokenizer,
which the data's must equal."""
from __future__ import annotations

import jax

from mpt_jax import sharding, storage
from mpt_jax.train import checkpoint as ckpt_lib
from mpt_jax.train import step as step_lib

# The run's tokenizer, beside the checkpoints (each step directory holds a copy too), so
# generate.py, load_pretrained's callers and export find it with no flag.
TOKENIZER_FILE = "tokenizer.json"


def init_finetune_state(init_from: str, abstract_state, state_shardings, tx, mesh, rules, *,
                        adapters=None):
    """Step 0 of a finetune: train.init_from's parameters read tensor by tensor straight into
    their shards (convert.pretrained.load_params_sharded: no process or device ever holds the
    whole model), and a fresh optimizer state made directly sharded. adapters: a LoRA run's
    starting adapters (already placed); the checkpoint then gives the frozen base, and the
    optimizer state covers the adapters."""
    import jax.numpy as jnp

    frozen_base = adapters is not None
    _, base_abstract = step_lib.trainable(abstract_state["params"], frozen_base)
    _, base_shardings = step_lib.trainable(state_shardings["params"], frozen_base)
    params = load_base(init_from, base_abstract if frozen_base else abstract_state["params"],
                        base_shardings if frozen_base else state_shardings["params"])
    trained = adapters if frozen_base else params
    with sharding.use_mesh(mesh), sharding.use_rules(rules):
        opt_state = jax.jit(tx.init, out_shardings=state_shardings["opt_state"])(trained)
        step = jax.device_put(jnp.zeros([], jnp.int32), state_shardings["step"])
    return {"step": step, "params": step_lib.with_frozen(trained, params if frozen_base else
                                                         None), "opt_state": opt_state}


def load_base(init_from, abstract, shardings):
    from mpt_jax.convert import pretrained
    from mpt_jax.convert.io import ConversionError

    try:
        return pretrained.load_params_sharded(init_from, abstract, shardings)
    except ConversionError as e:
        raise ValueError(f"train.init_from={init_from!r}: {e}") from None


def resumed_lora_params(workdir, step, init_from, lora, adapters, abstract_state,
                         state_shardings):
    """A resumed LoRA run's params: its adapters joined with the base read from
    train.init_from again, whose fingerprint must be the one the run started from."""
    from mpt_jax.model import lora as lora_lib

    saved = ckpt_lib.read_lora(storage.join(ckpt_lib.checkpoint_dir(workdir), str(step)))
    if saved is None:
        raise ValueError(f"checkpoint {step} in {workdir} holds no LoRA adapters (a full "
                         "finetune's or a pretraining run's): use another workdir for LoRA")
    if lora_lib.LoraConfig.from_dict(saved).targets != lora.targets or (
            saved["rank"], saved["alpha"]) != (lora.rank, lora.alpha):
        raise ValueError(f"checkpoint {step} in {workdir} holds LoRA rank {saved['rank']} alpha "
                         f"{saved['alpha']} on {saved['targets']}; train.lora asks rank "
                         f"{lora.rank} alpha {lora.alpha} on {list(lora.targets)}")
    if not storage.isdir(init_from):
        raise ValueError(f"train.init_from={init_from!r}: not a directory, and this LoRA run "
                         "needs its base to resume (its checkpoints hold the adapters only)")
    _, base_abstract = step_lib.trainable(abstract_state["params"], True)
    _, base_shardings = step_lib.trainable(state_shardings["params"], True)
    base = load_base(init_from, base_abstract, base_shardings)
    fp = lora_lib.fingerprint(base)
    if saved.get("base_fingerprint") not in (None, fp):
        raise ValueError(f"train.init_from={init_from!r} is not the base this LoRA run started "
                         f"from (fingerprint {fp}, the run's {saved['base_fingerprint']}, from "
                         f"{saved.get('base')!r})")
    return lora_lib.join(adapters, base), fp


def adapters_from(path, lora, cfg, state_shardings):
    """train.lora.adapter's adapters (a PEFT directory or a LoRA run of ours), placed."""
    adapters = read_adapter(path, lora, cfg)
    shardings, _ = step_lib.trainable(state_shardings["params"], True)
    return jax.tree.map(lambda a, s: jax.device_put(a, s), adapters, shardings)


def read_adapter(path, lora, cfg):
    """train.lora.adapter's adapters (numpy); their rank, alpha and targets must be
    train.lora's, their shapes the model's."""
    from mpt_jax.convert import lora as lora_io
    from mpt_jax.convert.io import ConversionError

    if not storage.isdir(path):
        raise ValueError(f"train.lora.adapter={path!r}: not a directory (a PEFT adapter "
                         "directory or a LoRA run of ours)")
    try:
        have, adapters = lora_io.read_adapters(path, cfg)
    except ConversionError as e:
        raise ValueError(f"train.lora.adapter={path!r}: {e}") from None
    if (have.rank, have.alpha, have.targets) != (lora.rank, lora.alpha, lora.targets):
        raise ValueError(f"train.lora.adapter={path!r} has rank {have.rank} alpha {have.alpha} "
                         f"on {list(have.targets)}; train.lora asks rank {lora.rank} alpha "
                         f"{lora.alpha} on {list(lora.targets)}")
    return adapters


def checkpoint_tokenizer(init_from: str) -> str | None:
    """The tokenizer.json of checkpoint `init_from` (where load_pretrained's callers find it),
    or None when it carries none (an HF directory of weights only)."""
    from mpt_jax.convert.convert import tokenizer_dir

    path = storage.join(str(tokenizer_dir(init_from)), TOKENIZER_FILE)
    return path if storage.isfile(path) else None


def check_same_tokenizer(init_from: str, ckpt_tokenizer: str, resolved) -> None:
    from mpt_jax.data import tokenizer as tokenizer_lib

    want = tokenizer_lib.tokenizer_sha256(tokenizer_lib.load_tokenizer(ckpt_tokenizer))
    source = resolved.sources[0]
    have = source.manifest["tokenizer"]["sha256"]
    if want != have:
        raise ValueError(
            f"data source {source.name!r} at {source.path!r} was tokenized with "
            f"{source.manifest['tokenizer']['name']!r} (sha256 {have[:12]}), not with "
            f"train.init_from's tokenizer {ckpt_tokenizer} (sha256 {want[:12]}): prepare the "
            "data with the pretrained model's tokenizer")

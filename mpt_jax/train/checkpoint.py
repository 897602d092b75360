"""Orbax checkpoints: WORKDIR/checkpoints/<step>/ with items

    params        ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    model_config  ocp.args.JsonSave(MPTConfig.to_dict('foundry'))
    opt_state     ocp.args.StandardSave(optax state)
    train_state   ocp.args.JsonSave({"step", "seed", "data_states": [one per process], ...})
    tokenizer     the run's tokenizer, as `tokenizer/tokenizer.json` (a step directory is
                  self-contained: generate.py, export and load_tokenizer find it there)
    lora          a LoRA run's `lora/lora.json`: rank, alpha, dropout, targets, the base
                  (train.init_from) and its fingerprint; `params` then holds the adapters only

Saves are asynchronous (the device-to-host copy happens in `save`, the writes in the
background); `keep` checkpoints are kept. Orbax writes each step into a temporary directory and
renames it when every item is complete, so a save interrupted midway (crash, SIGKILL) leaves no
`<step>/` directory and the previous checkpoint untouched; stale temporaries are cleaned up on
the next start. On gs:// and s3:// (no rename there) orbax writes `<step>/` in place and commits
it last with `<step>/commit_success.txt`: a step without that marker is unfinished and never
resumed from. orbax-checkpoint knows s3:// only in part (see `_orbax_on_s3`).
`restore` places every array onto the mesh with the given shardings.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mpt_jax import storage

ITEMS = ("params", "model_config", "opt_state", "train_state", "tokenizer", "lora")
TOKENIZER_ITEM = "tokenizer"  # checkpoints/<step>/tokenizer/tokenizer.json
LORA_ITEM, LORA_FILE = "lora", "lora.json"  # checkpoints/<step>/lora/lora.json
COMMIT_MARKER = storage.ORBAX_COMMIT_MARKER  # orbax's last write of a step on gs://


def checkpoint_dir(workdir: str) -> str:
    return storage.join(storage.abspath(workdir), "checkpoints")


def check_location(workdir: str) -> None:
    """Readies orbax for the workdir's store (s3:// needs `_orbax_on_s3`); refuses a workdir
    whose checkpoints orbax cannot write (one line)."""
    if str(workdir).startswith("s3://"):
        _orbax_on_s3()


@functools.cache
def _orbax_on_s3() -> None:
    """Makes orbax-checkpoint write and read s3:// checkpoints. It saves arrays through
    tensorstore, which has an s3 driver, and its remote-storage checks list s3, but it builds
    kvstore specs only for local paths and gs:// (an s3:// directory fails 'Checkpoint path
    should be absolute') and commits with a rename, which s3 lacks, everywhere but gs://. So
    s3:// takes orbax's gs:// branch in those two places, with tensorstore's s3 spec
    (storage.tensorstore_kvstore: the endpoint and region the AWS way) and orbax's commit file
    (as on gs://); the rest orbax does through etils.epath, i.e. fsspec's s3fs."""
    try:
        from orbax.checkpoint._src.path import atomicity, atomicity_defaults, gcs_utils
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

        use_gcs, normalize = ts_utils._use_gcs_driver, ts_utils._normalize_path
        gcs_kvstore = gcs_utils.get_kvstore_for_gcs
        defaults = {name: getattr(atomicity_defaults, name) for name in (
            "get_default_temporary_path_class", "get_item_default_temporary_path_class")}
        commit_file = atomicity.CommitFileTemporaryPath
    except (ImportError, AttributeError) as e:
        raise storage.StorageError(
            f"checkpoints on s3:// need orbax-checkpoint's 0.12 internals, which "
            f"orbax-checkpoint {ocp.__version__} lacks ({e}); use gs:// or a local (or "
            "FUSE-mounted) directory") from None

    def is_s3(path) -> bool:
        return str(path).startswith(("s3://", "s3:/"))

    ts_utils._use_gcs_driver = lambda d: is_s3(d) or use_gcs(d)
    ts_utils._normalize_path = lambda p: (
        "s3://" + os.path.normpath(str(p)).split(":/", 1)[1].lstrip("/") if is_s3(p)
        else normalize(p))
    gcs_utils.get_kvstore_for_gcs = lambda p: (
        storage.tensorstore_kvstore(p) if is_s3(p) else gcs_kvstore(p))
    for name, default in defaults.items():
        setattr(atomicity_defaults, name,
                lambda path, *a, _default=default, **k: commit_file if is_s3(path)
                else _default(path, *a, **k))


def make_manager(workdir: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    check_location(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    handlers = {"params": ocp.StandardCheckpointHandler(),
                "model_config": ocp.JsonCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                "train_state": ocp.JsonCheckpointHandler(),
                TOKENIZER_ITEM: ocp.JsonCheckpointHandler(filename="tokenizer.json"),
                LORA_ITEM: ocp.JsonCheckpointHandler(filename=LORA_FILE)}
    assert tuple(handlers) == ITEMS
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                    item_handlers=handlers)
    # The manager removes unfinished steps' temporary directories in a background thread that
    # its close() does not join: a run that fails early (bad data, say) would exit while it
    # runs and print that thread's traceback after the one-line error. Wait for it here.
    cleanup = getattr(manager, "_cleanup_tmp_directory_future", None)
    if cleanup is not None:
        cleanup.result()
    return manager


def gather_process_states(local_state: Any) -> list:
    """Every process's JSON-serialisable state, in process order (on every process)."""
    if jax.process_count() == 1:
        return [local_state]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: data.size] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(gathered[i][: int(lengths[i][0])]).decode())
            for i in range(jax.process_count())]


def save(manager: ocp.CheckpointManager, step: int, state: dict, *, model_config: dict,
         train_state: dict, tokenizer: dict | None = None, lora: dict | None = None) -> None:
    """Starts an (async) save of the sharded state; returns once the arrays are copied off the
    devices, so the state may be donated to the next step. `tokenizer`: the parsed
    tokenizer.json of the run, saved beside the weights; `lora`: a LoRA run's lora.json (the
    state's params are then its adapters)."""
    items = dict(
        params=ocp.args.StandardSave(state["params"]),
        model_config=ocp.args.JsonSave(model_config),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        train_state=ocp.args.JsonSave(train_state))
    if tokenizer is not None:
        items[TOKENIZER_ITEM] = ocp.args.JsonSave(tokenizer)
    if lora is not None:
        items[LORA_ITEM] = ocp.args.JsonSave(lora)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def read_lora(step_dir) -> dict | None:
    """A step directory's lora.json (None: not a LoRA run's)."""
    path = storage.join(str(step_dir), LORA_ITEM, LORA_FILE)
    if not storage.isfile(path):
        return None
    return json.loads(storage.read_text(path))


def finished_steps(workdir: str) -> list[int]:
    """The steps of WORKDIR's complete checkpoints, ascending (orbax renames a step directory
    into place only once every item is written), read without a manager: nothing created."""
    root = checkpoint_dir(workdir)
    names = [n for n in storage.listdir(root) if n.isdigit()]
    if storage.is_remote(root):
        return sorted(int(n) for n in names
                      if storage.exists(storage.join(root, n, COMMIT_MARKER)))
    return sorted(int(n) for n in names if os.path.isdir(os.path.join(root, n, "model_config")))


def latest_model_config(workdir: str) -> dict | None:
    """The model_config JSON of WORKDIR's latest checkpoint, or None when it has none."""
    steps = finished_steps(workdir)
    if not steps:
        return None
    item = storage.join(checkpoint_dir(workdir), str(steps[-1]), "model_config")
    files = [storage.join(item, name) for name in storage.listdir(item)
             if not name.startswith((".", "_")) and name != COMMIT_MARKER]
    if not files:
        raise ValueError(f"{item}: no model config file inside")
    return json.loads(storage.read_text(files[0]))


def _abstract(tree_abstract, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree_abstract, shardings)


def restore_model_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The model_config JSON of checkpoint `step` alone (no arrays read)."""
    return manager.restore(step, args=ocp.args.Composite(
        model_config=ocp.args.JsonRestore()))["model_config"]


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: dict, shardings: dict
            ) -> tuple[dict, dict]:
    """-> (state on the mesh, train_state JSON) of checkpoint `step`; its model_config is
    `restore_model_config`'s, to be compared before any array is read."""
    out = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(abstract_state["params"],
                                                  shardings["params"])),
        opt_state=ocp.args.StandardRestore(_abstract(abstract_state["opt_state"],
                                                     shardings["opt_state"])),
        train_state=ocp.args.JsonRestore(),
    ))
    train_state = out["train_state"]
    step_array = jax.device_put(np.asarray(train_state["step"], np.int32), shardings["step"])
    state = {"step": step_array, "params": out["params"], "opt_state": out["opt_state"]}
    return state, train_state

"""Checkpoints: the item layout load_pretrained reads, restore onto shardings, and a save killed
midway (SIGKILL while the async write runs) leaves the previous checkpoint intact."""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import ROOT, toy_train_state
from mpt_jax.train import checkpoint as ckpt_lib


def _shardings(state):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    return jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                        state)


def test_layout_and_restore_onto_shardings(tmp_path):
    manager = ckpt_lib.make_manager(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        ckpt_lib.save(manager, step, toy_train_state(float(step)), model_config={"d_model": 8},
                      train_state={"step": step, "seed": 0, "data_states": [{"i": step}]})
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3]  # keep-N
    d = os.path.join(str(tmp_path), "checkpoints", "3")
    assert {"model_config", "opt_state", "params", "train_state"} <= set(os.listdir(d))
    abstract = jax.eval_shape(lambda: toy_train_state(0.0))
    state, train_state = ckpt_lib.restore(manager, 3, abstract, _shardings(abstract))
    model_config = ckpt_lib.restore_model_config(manager, 3)
    assert train_state["data_states"] == [{"i": 3}] and model_config == {"d_model": 8}
    assert int(state["step"]) == 3
    np.testing.assert_array_equal(state["params"]["wte"], 3.0)
    assert isinstance(state["opt_state"], tuple) and int(state["opt_state"][1]) == 3
    assert state["params"]["wte"].sharding == _shardings(abstract)["params"]["wte"]


KILLED_SAVE = textwrap.dedent(r'''
    import os, signal, sys, time
    import jax, jax.numpy as jnp
    sys.path.insert(0, "tests")
    from conftest import toy_train_state
    from mpt_jax.train import checkpoint as ckpt_lib
    manager = ckpt_lib.make_manager(sys.argv[1], keep=3)
    ckpt_lib.save(manager, 1, toy_train_state(1.0), model_config={}, train_state={"step": 1,
                  "data_states": [{}]})
    manager.wait_until_finished()
    # a large second save: killed while orbax writes it in the background
    ckpt_lib.save(manager, 2, toy_train_state(2.0, n=4_000_000), model_config={},
                  train_state={"step": 2, "data_states": [{}]})
    os.kill(os.getpid(), signal.SIGKILL)
''')


@pytest.mark.slow
def test_save_killed_midway_keeps_previous_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path)], cwd=ROOT,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                         text=True, timeout=200)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    manager = ckpt_lib.make_manager(str(tmp_path), keep=3)
    assert manager.latest_step() == 1, os.listdir(os.path.join(str(tmp_path), "checkpoints"))
    abstract = jax.eval_shape(lambda: toy_train_state(0.0))
    state, train_state = ckpt_lib.restore(manager, 1, abstract, _shardings(abstract))
    np.testing.assert_array_equal(state["params"]["wte"], 1.0)
    assert train_state["step"] == 1

"""Mesh from config, parameter shardings from the rules table, batches, on 8 fake CPU devices.

The 8-device checks run in a subprocess: XLA_FLAGS must be set before jax is imported, and other
test files in this pytest process import jax first."""
import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from conftest import subprocess_env
from mpt_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_shape_fills_minus_one_and_names_numbers():
    assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 2}, 8) == (1, 4, 2)
    assert sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="data=3, fsdp=-1, tensor=1 cannot fill 8 devices"):
        sharding.mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="uses 4 devices, but there are 8"):
        sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_use_rules_sets_the_rules_in_force():
    """Functions that default to the rules in force read the innermost use_rules (lists become
    tuples), and DEFAULT_RULES again outside it."""
    data_only = [("batch", ["data"]), ("seq", None)]
    assert sharding.current_rules() == sharding.DEFAULT_RULES
    assert sharding.batch_spec() == P(("data", "fsdp"), None)
    with sharding.use_rules(data_only):
        assert sharding.current_rules() == (("batch", ("data",)), ("seq", None))
        assert sharding.batch_spec() == P("data", None)
        with sharding.use_rules([("batch", "fsdp"), ("seq", "tensor")]):
            assert sharding.logical_to_spec(("batch", "seq")) == P("fsdp", "tensor")
        assert sharding.logical_to_spec(("batch", "seq")) == P("data", None)
        with pytest.raises(ValueError, match="'embed' has no rule"):
            sharding.logical_to_spec(("embed",))
    assert sharding.batch_spec() == P(("data", "fsdp"), None)


def test_logical_to_spec_uses_each_mesh_axis_once():
    assert sharding.logical_to_spec(("layers", "embed", "qkv")) == P(None, "fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "seq")) == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="'nope' has no rule"):
        sharding.logical_to_spec(("nope",))
    with pytest.raises(ValueError, match="unknown mesh axis 'pipeline'"):
        sharding.rules_from_config([("embed", "pipeline")])


SCRIPT = textwrap.dedent(r'''
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, ml_collections
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from mpt_jax import sharding
    from mpt_jax.train import optim
    from mpt_jax.train import step as step_lib
    from mpt_jax.model.config import MPTConfig
    from mpt_jax.model import abstract_model
    assert jax.device_count() == 8
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=16)
    train = ml_collections.ConfigDict(dict(
        seq_len=16, global_batch_size=8, micro_batch_size=1, compute_dtype="float32",
        param_dtype="float32", remat_policy="dots_no_batch", scan_layers=True,
        attn_impl="reference", loss_chunk_size=8, nonfinite="stop"))
    ocfg = ml_collections.ConfigDict(dict(
        name="decoupled_lion", lr=1e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0,
        weight_decay_mask="all", mu_dtype="bfloat16", clip_norm=1.0, schedule="cosine",
        warmup_steps=1, alpha_f=0.1))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    tx = optim.make_optimizer(ocfg, 10)
    state = step_lib.init_state(cfg, train, tx, mesh, rules, seed=0)

    # every parameter (and its LION moment) is placed as the rules table says
    abstract = nnx.state(abstract_model(cfg), nnx.Param)
    axes = nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()["logical_axes"], abstract,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable)))
    flat_axes = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)))
    mu = state["opt_state"][1].mu
    checked = 0
    for path, arr in jax.tree_util.tree_leaves_with_path(state["params"]):
        want = sharding.logical_to_spec(flat_axes[path], rules)
        if arr.size >= 4096:  # large: must be sharded exactly as the rules say
            got = tuple(arr.sharding.spec) + (None,) * (arr.ndim - len(arr.sharding.spec))
            assert got == tuple(want) + (None,) * (arr.ndim - len(want)), (path, got, want)
            shard = arr.addressable_shards[0].data.shape
            assert np.prod(shard) < arr.size, (path, shard)  # no full copy per device
            checked += 1
        m = dict(jax.tree_util.tree_leaves_with_path(mu))[path]
        assert m.sharding.spec == arr.sharding.spec and m.dtype == jnp.bfloat16, path
    assert checked >= 5, checked

    # the step: 2 micro-batches (8 rows / 4 batch shards / micro 1), compiled once
    settings = step_lib.make_settings(cfg, train, tx, lambda s: 1e-3 * s, mesh=mesh, rules=rules,
                                      seed=0, global_batch=8)
    assert settings.n_micro == 2, settings.n_micro
    _, shardings = step_lib.state_shardings(cfg, train, tx, mesh, rules)
    step = step_lib.compile_train_step(settings, shardings, mesh, ("input_ids",))
    rng = np.random.default_rng(0)
    losses = []
    with sharding.use_mesh(mesh):
        for i in range(3):
            batch = sharding.make_global_batch(
                {"input_ids": rng.integers(0, 256, (8, 16)).astype(np.int32)}, mesh, rules)
            assert batch["input_ids"].sharding.spec == P(("data", "fsdp"), None)
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
    assert step._cache_size() == 1, step._cache_size()
    # train.xla_options reach this computation's compiler (an unknown option is refused)
    bad = step_lib.compile_train_step(settings, shardings, mesh, ("input_ids",),
                                      xla_options="xla_no_such_option=1")
    try:
        with sharding.use_mesh(mesh):
            bad.lower(state, batch).compile()
    except Exception as e:  # noqa: BLE001
        assert "xla_no_such_option" in str(e), e
    else:
        raise AssertionError("unknown XLA option accepted")
    assert step_lib.parse_xla_options(" xla_a=false, xla_b=12,xla_c=x ") == {
        "xla_a": False, "xla_b": 12, "xla_c": "x"}
    try:
        step_lib.parse_xla_options("triton=false")
    except ValueError as e:
        assert "'triton=false'" in str(e), e
    else:
        raise AssertionError("bad option accepted")
    assert all(np.isfinite(losses)), losses
    wq = state["params"]["blocks"]["attn"]["Wqkv"]
    assert wq.sharding.spec == P(None, "fsdp", "tensor"), wq.sharding.spec

    # a batch that does not divide the mesh is refused with the numbers
    try:
        sharding.make_global_batch({"input_ids": np.zeros((6, 16), np.int32)}, mesh, rules)
    except ValueError as e:
        assert "of 6 rows does not divide over the 4 batch shards" in str(e), e
    else:
        raise AssertionError("indivisible batch accepted")
    train.micro_batch_size = 2
    try:
        step_lib.make_settings(cfg, train, tx, None, mesh=mesh, rules=rules, seed=0,
                               global_batch=12)
    except ValueError as e:
        assert "12 over 4 batch shards is 3 rows per shard, not a multiple of " \
               "train.micro_batch_size 2" in str(e), e
    else:
        raise AssertionError("indivisible micro-batch accepted")
    print("OK", checked, losses)
''')


@pytest.mark.slow
def test_eight_devices_params_sharded_by_rules_and_step_compiles_once():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8"
               " --xla_backend_optimization_level=0")
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


RULES_SCRIPT = textwrap.dedent(r'''
    import functools
    import sys
    import jax, jax.numpy as jnp, ml_collections
    from mpt_jax import sharding
    from mpt_jax.train import optim
    from mpt_jax.train import step as step_lib
    from mpt_jax.model.config import MPTConfig
    sys.path.insert(0, "tests")
    from conftest import all_eqns
    assert jax.device_count() == 8
    # head dim 16, T 16: the packed Triton flash kernel (traced only) under shard_map
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=16)
    train = ml_collections.ConfigDict(dict(
        seq_len=16, global_batch_size=8, micro_batch_size=1, compute_dtype="float32",
        param_dtype="float32", remat_policy="dots_no_batch", scan_layers=True,
        attn_impl="pallas_triton", loss_chunk_size=8, nonfinite="stop"))
    ocfg = ml_collections.ConfigDict(dict(
        name="decoupled_lion", lr=1e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0,
        weight_decay_mask="all", mu_dtype="", clip_norm=1.0, schedule="constant",
        warmup_steps=0, alpha_f=0.1))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    data_only = tuple((n, "data" if n == "batch" else t) for n, t in sharding.DEFAULT_RULES)

    def specs(jaxpr):
        out = {"constraints": [], "kernels": []}
        for e in all_eqns(jaxpr):
            if e.primitive.name == "sharding_constraint":
                out["constraints"].append(tuple(e.params["sharding"].spec))
            if e.primitive.name == "shard_map":
                out["kernels"].append(tuple(tuple(s) for s in e.params["in_specs"]))
        return out

    def traced(rules):
        """The train step's activation constraints and kernel shard_map specs, traced with
        `rules` in the settings and none in force around it."""
        tx = optim.make_optimizer(ocfg, 10)
        settings = step_lib.make_settings(cfg, train, tx, lambda s: 1e-3, mesh=mesh,
                                          rules=rules, seed=0, global_batch=8)
        abstract, _ = step_lib.state_shardings(cfg, train, tx, mesh, rules)
        batch = {"input_ids": jax.ShapeDtypeStruct((8, 16), jnp.int32)}
        with sharding.use_mesh(mesh):
            jaxpr = jax.make_jaxpr(functools.partial(step_lib.train_step, settings=settings))(
                abstract, batch)
        return settings.n_micro, specs(jaxpr.jaxpr)

    both = ("data", "fsdp")
    n_micro, got = traced(data_only)
    assert n_micro == 4, n_micro  # 8 rows over 2 batch shards, micro-batches of 1
    entries = {e for spec in got["constraints"] + [s for k in got["kernels"] for s in k]
               for e in spec}
    assert both not in entries, entries
    assert (None, "data", None) in got["constraints"]  # the micro-batches
    assert ("data", None, None) in got["constraints"]  # block boundaries
    # the flash kernel's shard_map takes the fused projection's rows per 'data' shard (the
    # other specs there are jax's own, for the residuals it keeps per device)
    assert any(("data", None, None) in k for k in got["kernels"]), got["kernels"]
    # the default rules put the batch over data x fsdp in the same places (the check can fail)
    n_micro, got = traced(sharding.DEFAULT_RULES)
    assert n_micro == 1, n_micro
    assert (both, None, None) in got["constraints"]
    assert any((both, None, None) in k for k in got["kernels"]), got["kernels"]
    print("RULES OK")
''')


@pytest.mark.slow
def test_configured_rules_reach_activations_and_kernels():
    """mesh.rules with batch -> data only on a data=2 x fsdp=4 mesh: the traced train step
    constrains its micro-batches and block outputs to ('data', ...) and runs the attention
    kernel per shard of 'data' alone, never ('data', 'fsdp') as DEFAULT_RULES would."""
    env = subprocess_env(n_devices=8)
    out = subprocess.run([sys.executable, "-c", RULES_SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RULES OK" in out.stdout

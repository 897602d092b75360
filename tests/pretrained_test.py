"""mpt_jax.convert.pretrained: the finetune config merge, the checkpoint's model config, and
parameters loaded shard by shard onto a fake 4-device mesh (in a subprocess: XLA_FLAGS must
be set before jax starts) from an HF directory, our converted one and a training workdir."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import hf_model, hf_state, tiny
from mpt_jax.convert import pretrained
from mpt_jax.convert.convert import import_checkpoint
from mpt_jax.convert.table import pure_dict_from_torch
from mpt_jax.model.config import AttnConfig, MPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_merge_finetune_config_allows_only_safe_changes():
    from configs.base import model_section

    ckpt = MPTConfig.mpt_7b()
    # a recipe's model section (the 7b preset, as configs/base.py writes it) over MPT-7B
    section = model_section(MPTConfig.preset("7b")).to_dict()
    assert pretrained.merge_finetune_config(ckpt, section) == ckpt
    section.update(max_seq_len=65536, resid_pdrop=0.1, emb_pdrop=0.05)
    section["attn_config"].update(attn_uses_sequence_id=True, attn_pdrop=0.1, attn_impl="torch")
    section["init_config"]["init_std"] = 0.02  # how to initialise: moot for loaded weights
    merged = pretrained.merge_finetune_config(ckpt, section)
    assert merged == ckpt.replace(
        max_seq_len=65536, resid_pdrop=0.1, emb_pdrop=0.05,
        attn_config=AttnConfig(attn_uses_sequence_id=True, attn_pdrop=0.1))
    # partial overrides; vocab_size 0 (from the tokenizer) is the checkpoint's
    assert pretrained.merge_finetune_config(ckpt, {"vocab_size": 0, "max_seq_len": 4096}) == \
        ckpt.replace(max_seq_len=4096)
    assert pretrained.merge_finetune_config(ckpt, None) == ckpt
    for overrides, needle in [
        ({"d_model": 2048}, "model.d_model=2048 differs from the checkpoint's 4096"),
        ({"attn_config": {"alibi_bias_max": 16}},
         "model.attn_config.alibi_bias_max=16 differs from the checkpoint's 8"),
        ({"vocab_size": 50368}, "model.vocab_size=50368 differs"),
        ({"norm_eps": 1e-6}, "model.layer_norm_epsilon=1e-06 differs"),
        ({"max_seq_length": 4096}, "model.max_seq_length: not an MPT config key"),
        ({"n_heads": 5}, "d_model \\(4096\\) must be divisible by n_heads \\(5\\)"),
    ]:
        with pytest.raises(ValueError, match=needle):
            pretrained.merge_finetune_config(ckpt, overrides)
    learned = tiny(attn_config=AttnConfig(alibi=False))
    with pytest.raises(ValueError, match="learns position embeddings"):
        pretrained.merge_finetune_config(learned, {"max_seq_len": 64})


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One tiny MPT (vocab 104, d 40, 4 heads: divisible by the test mesh) as an HF directory
    in 20 KB safetensors shards, our converted directory, and a training workdir (orbax OCDBT
    params, as the trainer writes them); plus its parameters as numpy."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    root = tmp_path_factory.mktemp("pretrained")
    cfg = tiny(d_model=40, n_heads=4, vocab_size=104)
    hf = hf_model(cfg, seed=3)
    hf.save_pretrained(root / "hf", max_shard_size="20KB")
    assert (root / "hf" / "model.safetensors.index.json").exists()
    import_checkpoint(root / "hf", root / "ours")
    pure = pure_dict_from_torch(cfg, hf_state(hf))
    manager = ocp.CheckpointManager(root / "workdir" / "checkpoints")  # the trainer's layout
    manager.save(7, args=ocp.args.Composite(
        params=ocp.args.StandardSave(jax.tree.map(jnp.asarray, pure)),
        model_config=ocp.args.JsonSave(cfg.to_dict("foundry"))))
    manager.wait_until_finished()
    flat = {".".join(k): v for k, v in _flat(pure)}
    np.savez(root / "want.npz", **flat)
    return root, cfg


def _flat(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def test_read_model_config_of_every_form(sources):
    root, cfg = sources
    for name in ("hf", "ours", "workdir", "workdir/checkpoints/7"):
        got = pretrained.read_model_config(root / name)
        assert got.replace(attn_config=cfg.attn_config) == cfg, name
    with pytest.raises(ValueError, match="not a directory"):
        pretrained.read_model_config(root / "missing")
    with pytest.raises(ValueError, match="config.json: file not found"):
        pretrained.read_model_config(root / "workdir" / "checkpoints")


SCRIPT = textwrap.dedent(r'''
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from mpt_jax import sharding
    from mpt_jax.convert import pretrained
    from mpt_jax.model import abstract_model
    assert jax.device_count() == 4
    root = sys.argv[1]
    want = dict(np.load(os.path.join(root, "want.npz")))
    cfg = pretrained.read_model_config(os.path.join(root, "hf"))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
    pieces = []
    real = pretrained._host_shard
    def recording(source, row, index, dtype):
        out = real(source, row, index, dtype)
        pieces.append((row.path, out.shape, row.shape))
        return out
    pretrained._host_shard = recording
    for dtype in (jnp.float32, jnp.bfloat16):
        model = abstract_model(cfg, param_dtype=dtype)
        state = nnx.state(model, nnx.Param)
        specs = sharding.param_specs(state, mesh)
        abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                                nnx.to_pure_dict(state))
        shardings = sharding.named(mesh, specs)
        flat_specs = {".".join(str(k.key) for k in p): s for p, s in
                      jax.tree_util.tree_leaves_with_path(
                          specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}
        for name in (("hf", "ours", "workdir", "workdir/checkpoints/7") if dtype == jnp.float32
                     else ("hf", "workdir")):
            pieces.clear()
            params = pretrained.load_params_sharded(os.path.join(root, name), abstract,
                                                    shardings)
            flat = {".".join(str(k.key) for k in p): a
                    for p, a in jax.tree_util.tree_leaves_with_path(params)}
            assert set(flat) == set(want), (name, set(flat) ^ set(want))
            sharded = 0
            for key, arr in flat.items():
                assert arr.dtype == dtype, (name, key, arr.dtype)
                assert arr.sharding.spec == flat_specs[key], (name, key, arr.sharding.spec)
                np.testing.assert_array_equal(np.asarray(arr.astype(jnp.float32)),
                                              want[key].astype(dtype).astype(np.float32))
                if any(s is not None for s in flat_specs[key]):
                    sharded += 1
                    assert all(np.prod(sh.data.shape) < arr.size for sh in arr.addressable_shards)
            assert sharded >= 5, sharded
            # every host piece read was one device's shard: never a whole sharded parameter
            for path, shape, full in pieces:
                key = ".".join(path)
                if any(s is not None for s in flat_specs[key]):
                    assert np.prod(shape) < np.prod(full), (name, key, shape, full)
            n_unique = sum(len({tuple((s.start, s.stop) for s in pretrained._normalise(i, a.shape))
                                for i in a.sharding.addressable_devices_indices_map(
                                    a.shape).values()}) for a in flat.values())
            assert len(pieces) == n_unique, (len(pieces), n_unique)  # each piece read once
    # a model of another shape is refused, naming the parameter
    other = abstract_model(cfg.replace(d_model=44))
    other_abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                                  nnx.to_pure_dict(nnx.state(other, nnx.Param)))
    try:
        pretrained.load_params_sharded(os.path.join(root, "hf"), other_abstract,
                                       sharding.named(mesh, sharding.param_specs(
                                           nnx.state(other, nnx.Param), mesh)))
    except ValueError as e:
        assert "has shape" in str(e) and "the model wants" in str(e), e
    else:
        raise AssertionError("a model of another shape loaded")
    # the trainer's path (train.init_from): parameters and a fresh optimizer state, each
    # placed as the rules say
    import ml_collections
    from mpt_jax.train import init_from, optim, step as step_lib
    ocfg = ml_collections.ConfigDict(dict(
        name="decoupled_lion", lr=1e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0,
        weight_decay_mask="all", mu_dtype="", clip_norm=0.0, schedule="constant",
        warmup_steps=0, alpha_f=0.0))
    tx = optim.make_optimizer(ocfg, 10)
    train = ml_collections.ConfigDict(dict(compute_dtype="float32", param_dtype="float32",
                                           attn_impl="reference", remat_policy="none",
                                           scan_layers=True))
    rules = sharding.DEFAULT_RULES
    abstract_state, shardings = step_lib.state_shardings(cfg, train, tx, mesh, rules)
    pieces.clear()
    state = init_from.init_finetune_state(os.path.join(root, "hf"), abstract_state, shardings,
                                          tx, mesh, rules)
    placed = jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, state, shardings))
    assert placed and all(placed), "a parameter or moment is not where the rules put it"
    assert int(state["step"]) == 0 and int(state["opt_state"].count) == 0
    for p, a in jax.tree_util.tree_leaves_with_path(state["params"]):
        np.testing.assert_array_equal(np.asarray(a), want[".".join(str(k.key) for k in p)])
    assert all(np.prod(shape) < np.prod(full) for path, shape, full in pieces
               if any(s is not None for s in flat_specs[".".join(path)]))
    print("OK")
''')


@pytest.mark.slow
def test_sharded_load_on_four_fake_devices(sources):
    root, _ = sources
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                         "--xla_backend_optimization_level=0")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(root)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout

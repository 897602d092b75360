"""The TPU path lowered for platform "tpu" from this CPU host (no TPU needed): the jitted train
step (remat, with and without scan), the generator's prefill and decode step, and the kernels
alone over their features. Lowering runs the Pallas -> Mosaic lowering and serialises each
kernel into a tpu_custom_call, so a Mosaic lowering error fails here; what only libtpu's
Mosaic compiler checks (layouts, VMEM limits) needs a TPU host and is not covered.

Each test counts the Mosaic custom calls by kernel name and makes the jnp attention paths
(reference_attention, decode_attention) raise while tracing: no silent fallback.
"""
import collections
import functools
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from configs.base import get_base_config
from mpt_jax import MPTConfig, sharding
from mpt_jax.infer import generate
from mpt_jax.kernels import decode_tpu, flash_tpu
from mpt_jax.model import abstract_model, attention
from mpt_jax.model.alibi import alibi_slopes
from mpt_jax.model.config import AttnConfig
from mpt_jax.train import optim
from mpt_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FWD, DQ, DKV, DECODE = ("alibi_flash_fwd_tpu", "alibi_flash_bwd_dq_tpu",
                        "alibi_flash_bwd_dkv_tpu", "alibi_decode_tpu")


@pytest.fixture(autouse=True)
def no_jnp_attention(monkeypatch):
    """The jnp attention paths raise: a call planned onto them fails the test."""
    def fail(*args, **kwargs):
        raise AssertionError("the TPU path fell back to the jnp attention")

    monkeypatch.setattr(attention, "reference_attention", fail)
    monkeypatch.setattr(attention, "decode_attention", fail)


def _tpu_text(traced) -> str:
    return traced.lower(lowering_platforms=("tpu",)).as_text()


def _kernels(txt: str) -> dict:
    """{kernel name: launches} of the Mosaic TPU custom calls in lowered text, following the
    calls from main (a jitted kernel wrapper is one function called once per layer; a loop
    body counts once). Only live calls count, those whose results are used: a remat'd backward
    also holds dead copies of forward kernels whose residuals were saved, which XLA drops.
    (One level of use: a result feeding only dead ops would still count.)"""
    funcs = {}
    for func in re.split(r"\n(?=  func\.func )", txt):
        name = re.match(r"\s*func\.func \w+ @([\w.$-]+)\(", func)
        if name:
            funcs[name.group(1)] = func

    @functools.cache
    def launches(name):
        lines, found = funcs[name].splitlines(), collections.Counter()
        for i, ln in enumerate(lines):
            result = re.match(r"(\s*)(%\w+)(:\d+)? = ", ln)
            if not result:
                continue
            # a use: the name again further on in this op's region (a shard_map body numbers
            # its values apart: the same name outside it is another value)
            indent, rest = len(result.group(1)), []
            for later in lines[i + 1:]:
                if len(later) - len(later.lstrip()) < indent:
                    break
                rest.append(later)
            if not re.search(re.escape(result.group(2)) + r"(?!\w)", "\n".join(rest)):
                continue
            if "stablehlo.custom_call @tpu_custom_call" in ln:
                assert "custom_call_config" in ln and "body" in ln, ln[:200]
                found[re.search(r'kernel_name = "(\w+)"', ln).group(1)] += 1
            callee = re.search(r"\bcall @([\w.$-]+)\(", ln)
            if callee:
                found += launches(callee.group(1))
        return found

    return dict(launches("main"))


def _operands(txt: str, name: str) -> list[str]:
    """The operand types of the first `name` kernel in lowered text."""
    line = next(ln for ln in txt.splitlines() if f'kernel_name = "{name}"' in ln)
    return re.findall(r"tensor<[0-9a-z]+>", line.rsplit("} : (", 1)[1].split(") ->")[0])


def _model_cfg(n_heads: int, kv_heads: int, **attn) -> MPTConfig:
    """Two layers of head dim 64 (MPT-7B's 128 is in the kernel tests below)."""
    return MPTConfig(d_model=64 * n_heads, n_heads=n_heads, n_layers=2, vocab_size=131,
                     max_seq_len=64,
                     attn_config=AttnConfig(attn_type="grouped_query_attention",
                                            kv_n_heads=kv_heads, **attn))


@pytest.mark.parametrize("scan,remat,want", [
    # the scan body holds one layer: forward, dq and dk/dv once; the named out/logsumexp
    # residuals are saved, so the backward does not rerun the forward kernel (dead copy)
    pytest.param(True, "dots_no_batch", {FWD: 1, DQ: 1, DKV: 1}, id="scan_dots_no_batch"),
    # two unrolled layers under full remat: each forward kernel again in the backward pass
    pytest.param(False, "full", {FWD: 4, DQ: 2, DKV: 2}, id="unrolled_full_remat"),
])
def test_train_step_lowers_with_the_tpu_kernels(scan, remat, want):
    """The trainer's jitted step (bf16 compute, packed documents: segment ids) lowered for TPU."""
    cfg = _model_cfg(2, 1, attn_uses_sequence_id=True)  # MQA
    run = get_base_config()
    train = ml_collections.ConfigDict(run.train.to_dict())
    train.update(seq_len=64, global_batch_size=2, scan_layers=scan, remat_policy=remat,
                 attn_impl="pallas_tpu", loss_chunk_size=32)
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:1])
    rules = sharding.DEFAULT_RULES
    tx = optim.make_optimizer(run.optim, run.max_steps, clip=False)
    settings = step_lib.make_settings(cfg, train, tx, lambda s: 1e-4, mesh=mesh, rules=rules,
                                      seed=0, global_batch=2, clip_norm=1.0)
    abstract, shardings = step_lib.state_shardings(cfg, train, tx, mesh, rules)
    step = step_lib.compile_train_step(settings, shardings, mesh, ("input_ids", "segment_ids"))
    batch = {k: jax.ShapeDtypeStruct((2, 64), jnp.int32) for k in ("input_ids", "segment_ids")}
    with sharding.use_mesh(mesh):
        txt = _tpu_text(step.trace(abstract, batch))
    assert _kernels(txt) == want


@pytest.mark.slow
def test_prefill_and_decode_step_lower_with_the_tpu_kernels():
    """The generator's two jits as generate() calls them (a bf16 model, GQA, left-padded
    prompts, a cache of 64 slots): prefill runs the flash forward once per layer, the decode
    loop's step the decode kernel once per layer (which writes the new row itself)."""
    cfg = _model_cfg(4, 2)
    # zero weights (their values do not matter here; random initialisation costs ~10 s on CPU)
    graphdef, state = nnx.split(abstract_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                               attn_impl="pallas_tpu"))
    gen = generate.Generator(nnx.merge(graphdef, jax.tree.map(
        lambda a: jnp.zeros(a.shape, a.dtype), state)))
    b, t, n_new, alloc = 2, 9, 4, 64
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    params = generate.SamplingParams(0.0, 0, 1.0)
    key, pad = jax.random.key(0), jnp.int32(0)
    prefill_args = (gen._spec, gen.weights, ids, ids, key, pad, alloc, n_new, params, False)
    assert _kernels(_tpu_text(generate._prefill_jit.trace(*prefill_args))) == {FWD: 2}
    state = jax.eval_shape(lambda w, i, m: generate._prefill_jit(
        gen._spec, w, i, m, key, pad, alloc, n_new, params, False), gen.weights, ids, ids)
    assert state.cache[0][0].shape == (b, 2, alloc, 64)
    traced = generate._decode_jit.trace(gen._spec, gen.weights, state, t, n_new, params,
                                        jnp.int32(-1), pad)
    assert _kernels(_tpu_text(traced)) == {DECODE: 2}


def _flash_loss(q, k, v, kw):
    return attention.flash_attention(q, k, v, **kw).astype(jnp.float32).sum()


@pytest.mark.parametrize("d,dtype", [(128, jnp.bfloat16), (64, jnp.float32)])
@pytest.mark.slow
def test_kernels_lower_over_their_features(d, dtype):
    """The flash kernels (forward and every gradient) and the decode kernel (appending or not,
    with and without kv_mask and ALiBi) for each feature that changes the Mosaic program:
    GQA/MQA groups, segment ids, causal or not, odd lengths, keys longer than queries, slot
    blocks of one or several tiles."""
    slopes = lambda h: jnp.asarray(alibi_slopes(h))  # noqa: E731
    for b, t, s, h, kvh, causal, alibi, seg, blocks in [
        # the interpret-mode cases of kernels_tpu_test.py, on its blocks of 16
        (1, 37, 37, 4, 1, True, True, True, 16),  # MQA, odd length, segments
        (2, 24, 24, 4, 2, False, False, True, 16),  # groups of 2, not causal
        (1, 21, 45, 2, 2, True, True, False, 16),  # one head a group, keys longer
        (1, 200, 200, 4, 2, True, True, True, 128),  # the default blocks, two of them, padded
    ]:
        q = jax.ShapeDtypeStruct((b, t, h, d), dtype)
        k = jax.ShapeDtypeStruct((b, s, kvh, d), dtype)
        kw = dict(alibi_slopes=slopes(h) if alibi else None, causal=causal,
                  segment_ids=jnp.zeros((b, t), jnp.int32) if seg else None,
                  block_sizes=flash_tpu.BlockSizes(blocks, blocks), impl="pallas_tpu")
        loss = functools.partial(_flash_loss, kw=kw)
        got = _kernels(_tpu_text(jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k)))
        assert got == {FWD: 1, DQ: 1, DKV: 1}, (b, t, s, h, kvh)

    for b, h, kvh, s, append, mask, alibi in [
        (3, 4, 2, 64, True, True, True),  # several slot blocks (BLOCK_S 16 below)
        (2, 4, 1, 40, True, False, True),  # MQA, one block not a whole tile
        (1, 2, 2, 2112, False, True, False),  # the generator's allocation, blocks of 352
    ]:
        q = jax.ShapeDtypeStruct((b, h, d), dtype)
        cache = jax.ShapeDtypeStruct((b, kvh, s, d), dtype)
        row = jax.ShapeDtypeStruct((b, kvh, d), dtype) if append else None
        lens = jax.ShapeDtypeStruct((b,), jnp.int32)
        kv_mask = jax.ShapeDtypeStruct((b, s), jnp.bool_) if mask else None
        f = functools.partial(decode_tpu.decode_attention_tpu,
                              slopes=slopes(h) if alibi else None, scale=d ** -0.5,
                              block_s=16 if s == 64 else None)
        got = _kernels(_tpu_text(jax.jit(f).trace(q, cache, cache, lens, kv_mask, k_new=row,
                                                  v_new=row)))
        assert got == {DECODE: 1}, (b, h, kvh, s)


MESH_LOWERING = textwrap.dedent(r'''
    import sys
    import jax, jax.numpy as jnp, ml_collections
    from flax import nnx
    from configs.base import get_base_config
    from mpt_jax import MPTConfig, sharding
    from mpt_jax.infer import generate
    from mpt_jax.model import abstract_model
    from mpt_jax.model.config import AttnConfig
    from mpt_jax.train import optim, step as step_lib

    out = sys.argv[1]
    def lowered(traced, name):
        with open(f"{out}/{name}.txt", "w") as f:
            f.write(traced.lower(lowering_platforms=("tpu",)).as_text())

    cfg = MPTConfig(d_model=256, n_heads=4, n_layers=2, vocab_size=131, max_seq_len=64,
                    attn_config=AttnConfig(attn_type="grouped_query_attention", kv_n_heads=2))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    run = get_base_config()
    train = ml_collections.ConfigDict(run.train.to_dict())
    train.update(seq_len=64, global_batch_size=4, scan_layers=True, attn_impl="pallas_tpu",
                 loss_chunk_size=32)
    tx = optim.make_optimizer(run.optim, run.max_steps, clip=False)
    settings = step_lib.make_settings(cfg, train, tx, lambda s: 1e-4, mesh=mesh, rules=rules,
                                      seed=0, global_batch=4, clip_norm=1.0)
    abstract, shardings = step_lib.state_shardings(cfg, train, tx, mesh, rules)
    step = step_lib.compile_train_step(settings, shardings, mesh, ("input_ids",))
    with sharding.use_mesh(mesh):
        lowered(step.trace(abstract, {"input_ids": jax.ShapeDtypeStruct((4, 64), jnp.int32)}),
                "train")

    graphdef, state = nnx.split(abstract_model(cfg, dtype=jnp.bfloat16,
                                               param_dtype=jnp.bfloat16, attn_impl="pallas_tpu"))
    gen = generate.Generator(nnx.merge(graphdef, jax.tree.map(
        lambda a: jnp.zeros(a.shape, a.dtype), state)), mesh=mesh)
    ids = jax.ShapeDtypeStruct((4, 9), jnp.int32)
    params, key, pad = generate.SamplingParams(0.0, 0, 1.0), jax.random.key(0), jnp.int32(0)
    with sharding.use_mesh(mesh):
        args = (gen._spec, gen.weights, ids, ids, key, pad, 64, 4, params, False)
        lowered(generate._prefill_jit.trace(*args), "prefill")
        state = jax.eval_shape(lambda w: generate._prefill_jit(*args[:1], w, *args[2:]),
                               gen.weights)
        lowered(generate._decode_jit.trace(gen._spec, gen.weights, state, 9, 4, params,
                                           jnp.int32(-1), pad), "decode")
''')


@pytest.mark.slow
def test_sharded_steps_lower_with_the_tpu_kernels_per_shard(tmp_path):
    """Under a 2 x 2 mesh (4 fake devices; batch over fsdp, heads over tensor, GQA groups kept
    whole) the train step, prefill and decode step lower for TPU with each kernel once per
    layer on one shard's rows and heads: [B / 2, H / 2, T, D] queries, [B / 2, KV / 2, S, D]
    caches."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, "-c", MESH_LOWERING, str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    train, prefill, decode = ((tmp_path / f"{n}.txt").read_text()
                              for n in ("train", "prefill", "decode"))
    assert _kernels(train) == {FWD: 1, DQ: 1, DKV: 1}
    assert _operands(train, FWD)[:3] == ["tensor<2xf32>", "tensor<2x2x64x64xbf16>",
                                         "tensor<2x1x64x64xbf16>"]
    assert _kernels(prefill) == {FWD: 2}
    assert _operands(prefill, FWD)[1] == "tensor<2x2x16x64xbf16>"  # 9 tokens, one 16-row block
    assert _kernels(decode) == {DECODE: 2}
    # row lengths, q as [B, KV, G, D], the caches
    assert _operands(decode, DECODE)[:4] == ["tensor<2xi32>", "tensor<2x1x2x64xbf16>",
                                             "tensor<2x1x64x64xbf16>", "tensor<2x1x64x64xbf16>"]

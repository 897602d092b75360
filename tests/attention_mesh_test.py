"""The Pallas kernels (flash attention, decode attention, chunk attention, add+norm) under a
multi-device mesh run once per shard (shard_map), not on the gathered global batch. On 8 fake
CPU devices in a subprocess (XLA_FLAGS must be set before jax is imported)."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(r'''
    import functools
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mpt_jax import sharding
    from mpt_jax.model import attention
    from mpt_jax.model.alibi import alibi_slopes

    def kernel_operand_shapes(fn, *args):
        """Shapes of the first operand of every Triton kernel in the CUDA lowering."""
        txt = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        calls = [ln for ln in txt.splitlines() if "xla.gpu.triton" in ln]
        assert calls, "no kernel in the lowering"
        return {re.search(r"\(tensor<([0-9x]+)x(?:bf16|f32)>", ln).group(1) for ln in calls}

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rng = np.random.default_rng(0)
    b, t, h, d = 8, 64, 4, 32

    def flash(q, k, v, seg, impl="pallas_gpu", interpret=False):
        return attention.flash_attention(q, k, v, alibi_slopes=alibi_slopes(h), segment_ids=seg,
                                         impl=impl, interpret=interpret)

    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(3))
    seg = jnp.asarray(np.repeat(np.arange(2), t // 2)[None].repeat(b, 0), jnp.int32)
    act = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(x, act) for x in (q, k, v))
    data_only = tuple((n, "data" if n == "batch" else r) for n, r in sharding.DEFAULT_RULES)
    with sharding.use_mesh(mesh):
        # The plan names the mesh axes; split heads keep the packed layout from the kernel.
        p = attention.plan("pallas_gpu", (b, t, h, d), h, t, jnp.float32, packed=True)
        assert (p.batch_axes, p.head_axes, p.packed) == (("data", "fsdp"), "tensor", False), p
        p = attention.plan("pallas_gpu", (b, t, h, d), 1, t, jnp.float32, packed=True)
        assert (p.batch_axes, p.head_axes, p.packed) == (("data", "fsdp"), None, True), p
        p = attention.plan("pallas_gpu", (2, 1, h, d), 2, 64, jnp.float32, cache=True)
        assert (p.kernel, p.batch_axes, p.head_axes) == ("decode_gpu", None, "tensor"), p
        with sharding.use_rules(data_only):  # the rules in force split the kernels
            p = attention.plan("pallas_gpu", (b, t, h, d), h, t, jnp.float32)
            assert (p.batch_axes, p.head_axes) == ("data", "tensor"), p
            shapes = kernel_operand_shapes(lambda q, k, v: flash(q, k, v, seg), q, k, v)
            assert shapes == {"4x64x2x32"}, shapes
        # Batch over data x fsdp (8 / 4), heads over tensor (4 / 2); forward and gradient.
        shapes = kernel_operand_shapes(lambda q, k, v: flash(q, k, v, seg), q, k, v)
        assert shapes == {"2x64x2x32"}, shapes
        grad = lambda q, k, v: jax.grad(lambda *a: jnp.sum(flash(*a, seg) ** 2), (0, 1, 2))(
            q, k, v)
        shapes = kernel_operand_shapes(grad, q, k, v)
        assert shapes and all(s.startswith("2x64x2x") for s in shapes), shapes
        # MQA: one kv head cannot split over tensor=2, so heads stay whole; batch still splits.
        k1, v1 = k[:, :, :1], v[:, :, :1]
        assert kernel_operand_shapes(lambda q, k, v: flash(q, k, v, None), q, k1, v1) == {
            "2x64x4x32"}
        # The kernel (interpret mode) per shard equals the jnp reference on the global arrays.
        run = jax.jit(lambda q, k, v: flash(q, k, v, seg, interpret=True))
        got = run(q, k, v)
        want = flash(q, k, v, seg, impl="reference")
        assert float(jnp.max(jnp.abs(got - want))) < 1e-4
        g_got = jax.jit(lambda q, k, v: jax.grad(
            lambda *a: jnp.sum(flash(*a, seg, interpret=True) ** 2), (0, 1, 2))(q, k, v))(q, k, v)
        g_want = jax.grad(lambda *a: jnp.sum(flash(*a, seg, impl="reference") ** 2), (0, 1, 2))(
            q, k, v)
        for a, w in zip(g_got, g_want):
            assert float(jnp.max(jnp.abs(a - w))) < 1e-3 * float(jnp.max(jnp.abs(w))), "grad"
        # The kernel's named residuals still reach the remat policy through shard_map: the
        # backward pass does not rerun the forward kernel (XLA drops unused custom calls).
        from mpt_jax.model import REMAT_POLICIES

        def layer(q):
            return jnp.tanh(flash(q * 2, q, q, seg).astype(jnp.float32))

        for policy, want in ((REMAT_POLICIES["dots_no_batch"], 1),
                             (jax.checkpoint_policies.dots_with_no_batch_dims_saveable, 2)):
            loss = lambda q: jnp.sum(jax.checkpoint(layer, policy=policy)(q) ** 2)
            txt = jax.jit(jax.grad(loss)).trace(q).lower(lowering_platforms=("cuda",)).as_text()
            ids = [re.match(r"\s*(%\w+)", ln).group(1) for ln in txt.splitlines()
                   if "xla.gpu.triton" in ln and "alibi_flash_fwd" in ln]
            live = sum(1 for i in ids if re.search(re.escape(i) + r"#", txt))
            assert live == want, (policy, live)
        # Decode: the attention kernel (which appends the new row to the caches in place) and
        # the add+norm kernel run per shard too.
        bd, hd, sd = 4, 4, 64

        def decode(q, kc, vc, qkv, impl="pallas_gpu", interpret=False):
            return attention.append_and_attend(
                q, q[:, :, :kc.shape[1]], q[:, :, :kc.shape[1]], kc, vc, jnp.int32(5),
                alibi_slopes=alibi_slopes(hd), kv_mask=jnp.ones((bd, sd), bool), impl=impl,
                interpret=interpret, qkv=qkv)

        def decode_cache_shapes(q, kc, vc, qkv):
            txt = jax.jit(decode).trace(q, kc, vc, qkv).lower(
                lowering_platforms=("cuda",)).as_text()
            lines = [ln for ln in txt.splitlines() if "xla.gpu.triton" in ln
                     and "alibi_decode" in ln and "combine" not in ln]
            assert lines, "no decode kernel"
            return {m for ln in lines for m in re.findall(r"tensor<(\d+x\d+x64x\d+)xf32>", ln)}

        for kvh, want in ((2, "1x1x64x32"), (1, "1x1x64x32")):
            qd = jax.device_put(jnp.asarray(rng.normal(size=(bd, 1, hd, d)), jnp.float32),
                                NamedSharding(mesh, P(("data", "fsdp"))))
            kc = jnp.asarray(rng.normal(size=(bd, kvh, sd, d)), jnp.float32)
            vc = jnp.asarray(rng.normal(size=(bd, kvh, sd, d)), jnp.float32)
            qkv = jnp.concatenate([qd.reshape(bd, 1, -1)] + [qd[:, :, :kvh].reshape(bd, 1, -1)] * 2,
                                  axis=-1)
            for fused in (None, qkv):  # the fused projection, or separate q/k/v rows
                shapes = decode_cache_shapes(qd, kc, vc, fused)
                assert shapes == {want}, (kvh, fused is None, shapes)
                got = jax.jit(functools.partial(decode, interpret=True))(qd, kc, vc, fused)
                ref = decode(qd, kc, vc, fused, impl="reference")
                for a, w in zip(got, ref):
                    assert float(jnp.max(jnp.abs(a - w))) < 1e-4, "decode values"
        # A chunk of new tokens (each row at its own position): the chunk flash kernel per
        # shard, on the cache in place ([B / 4, KV / 2 where it divides, S, D]).
        def chunk(q, kc, vc, impl="pallas_gpu", interpret=False):
            kv = q[:, :, :kc.shape[1]]
            return attention.append_and_attend(
                q, kv, kv * 0.5, kc, vc, jnp.arange(bd, dtype=jnp.int32) * 7,
                alibi_slopes=alibi_slopes(hd), impl=impl, interpret=interpret)

        for kvh, want in ((2, ("1x16x2x32", "1x1x64x32")), (1, ("1x16x4x32", "1x1x64x32"))):
            qc = jax.device_put(jnp.asarray(rng.normal(size=(bd, 16, hd, d)), jnp.float32),
                                NamedSharding(mesh, P(("data", "fsdp"))))
            kc = jnp.asarray(rng.normal(size=(bd, kvh, sd, d)), jnp.float32)
            vc = jnp.asarray(rng.normal(size=(bd, kvh, sd, d)), jnp.float32)
            txt = jax.jit(chunk).trace(qc, kc, vc).lower(lowering_platforms=("cuda",)).as_text()
            lines = [ln for ln in txt.splitlines() if "xla.gpu.triton" in ln
                     and "alibi_chunk_fwd" in ln]
            assert lines, "no chunk kernel"
            ops = re.findall(r"tensor<([0-9x]+)xf32>", lines[0])
            assert tuple(ops[:2]) == want, (kvh, ops)
            got = jax.jit(functools.partial(chunk, interpret=True))(qc, kc, vc)
            ref = chunk(qc, kc, vc, impl="reference")
            for a, w in zip(got, ref):
                assert float(jnp.max(jnp.abs(a - w))) < 1e-4, "chunk values"
        from mpt_jax.model.config import MPTConfig
        from mpt_jax.model.layers import Norm

        norm = Norm(32, MPTConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=64),
                    param_dtype=jnp.float32, use_bias=False)
        x = jnp.ones((bd, 1, 32), jnp.float32)
        txt = jax.jit(lambda x: norm.fused(x, x, jnp.float32)).trace(x).lower(
            lowering_platforms=("cuda",)).as_text()
        shapes = {m for ln in txt.splitlines() if "add_norm" in ln and "xla.gpu.triton" in ln
                  for m in re.findall(r"tensor<([0-9x]+)xf32>", ln)}
        assert shapes == {"1x32", "32"}, shapes  # rows per shard, and the norm weight
    # The packed entry (q/k/v read from the fused projection): with heads split over tensor=2
    # it falls back to the sliced per-shard path; with tensor=1 the packed kernels run per
    # batch shard on [B / 8, T, H + 2 KV, D] views.
    qkv = jnp.concatenate([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], -1)
    packed = lambda x: attention.flash_attention_packed(x, h, h, alibi_slopes=alibi_slopes(h),
                                                        segment_ids=seg, impl="pallas_gpu")
    with sharding.use_mesh(mesh):
        assert kernel_operand_shapes(packed, qkv) == {"2x64x2x32"}
    ref_out = np.asarray(flash(q, k, v, seg, impl="reference"))
    mesh8 = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    with sharding.use_mesh(mesh8):
        sh = kernel_operand_shapes(packed, qkv)
        assert sh == {"1x64x12x32"}, sh
        shapes = kernel_operand_shapes(jax.grad(lambda x: jnp.sum(packed(x) ** 2)), qkv)
        assert all(s.startswith("1x64x") for s in shapes), shapes
        interp = lambda x: attention.flash_attention_packed(
            x, h, h, alibi_slopes=alibi_slopes(h), segment_ids=seg, impl="pallas_gpu",
            interpret=True)
        got = jax.jit(interp)(qkv)
        assert float(np.max(np.abs(np.asarray(got) - ref_out))) < 1e-4
    # No mesh: the global shapes go straight to the kernel.
    assert kernel_operand_shapes(lambda q, k, v: flash(q, k, v, seg), q, k, v) == {"8x64x4x32"}
    print("OK")
''')


@pytest.mark.slow
def test_flash_kernel_runs_per_shard_under_a_mesh():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout

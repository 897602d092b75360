"""Pallas attention kernels (GPU: Triton lowering; TPU: Mosaic)."""
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# checkpoint_name tags on each kernel's forward residuals (output, per-row logsumexp): a remat
# policy that saves these names keeps the backward pass from rerunning the forward kernel.
ATTN_OUT_NAME = "attn_out"
ATTN_LSE_NAME = "attn_lse"


def name_residuals(out, lse):
    """Tags a forward kernel's output and logsumexp with the names above. Without them,
    jax.checkpoint reruns the forward kernel in the backward pass to rebuild the residuals."""
    return checkpoint_name(out, ATTN_OUT_NAME), checkpoint_name(lse, ATTN_LSE_NAME)


def packed_head_dim(qkv_shape, n_heads: int, kv_heads: int) -> int:
    """D of a fused projection `[B, T, (H + 2 KV) * D]`; ValueError naming the numbers if the
    width does not split so."""
    width = qkv_shape[-1]
    if n_heads % kv_heads or width % (n_heads + 2 * kv_heads):
        raise ValueError(f"qkv width {width} is not (H + 2 KV) * D for H={n_heads}, "
                         f"KV={kv_heads}")
    return width // (n_heads + 2 * kv_heads)


def unpack_qkv(qkv, n_heads: int, kv_heads: int):
    """The fused projection `[B, T, (H + 2 KV) * D]` -> q `[B, T, H, D]`, k, v `[B, T, KV, D]`
    (slices: copies, where the packed kernels read it in place)."""
    b, t, _ = qkv.shape
    d = packed_head_dim(qkv.shape, n_heads, kv_heads)
    q, k, v = jnp.split(qkv, [n_heads * d, (n_heads + kv_heads) * d], axis=-1)
    return (q.reshape(b, t, n_heads, d), k.reshape(b, t, kv_heads, d),
            v.reshape(b, t, kv_heads, d))

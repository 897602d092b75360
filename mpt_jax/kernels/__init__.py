"""Pallas attention kernels (GPU: Triton lowering; TPU: Mosaic)."""
from jax.ad_checkpoint import checkpoint_name

# checkpoint_name tags on each kernel's forward residuals (output, per-row logsumexp): a remat
# policy that saves these names keeps the backward pass from rerunning the forward kernel.
ATTN_OUT_NAME = "attn_out"
ATTN_LSE_NAME = "attn_lse"


def name_residuals(out, lse):
    """Tags a forward kernel's output and logsumexp with the names above. Without them,
    jax.checkpoint reruns the forward kernel in the backward pass to rebuild the residuals."""
    return checkpoint_name(out, ATTN_OUT_NAME), checkpoint_name(lse, ATTN_LSE_NAME)

"""Pallas attention kernels (GPU: Triton lowering; TPU: Mosaic)."""

# checkpoint_name tags on each kernel's forward residuals (output, per-row logsumexp): a remat
# policy that saves these names keeps the backward pass from rerunning the forward kernel.
ATTN_OUT_NAME = "attn_out"
ATTN_LSE_NAME = "attn_lse"

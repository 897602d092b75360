"""Pallas kernels: flash attention (GPU: Triton lowering in flash_gpu, Mosaic GPU for Hopper in
flash_mgpu; TPU: Mosaic in flash_tpu), decode attention and add+norm for GPUs; their shared
helpers in common. Nothing here imports from the rest of the package."""

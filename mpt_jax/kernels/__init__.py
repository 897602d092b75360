"""Pallas attention kernels. They import nothing from mpt_jax: slopes come in as arrays."""

"""Quantized checkpoints in the converter (model/quant.py has the format): float tensors
quantized as they stream in (import, load_pretrained), int8 parameters dequantized as they
stream out (export), and the check that a checkpoint's parameters are what its config says.

Tensors arrive one at a time in torch's layout (`[out, in]` matrices, `[V, D]` embeddings),
which is the int8 layout, so each is quantized row by row as it is read: the host holds the
int8 model being built plus one float tensor, never the float model. Quantizing runs as one
jitted XLA computation per tensor shape on the default device (a GPU where there is one).
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import numpy as np

from mpt_jax.convert.io import ConversionError, ParamsReader
from mpt_jax.convert.table import Row, model_shapes, quantized_paths
from mpt_jax.model.config import QUANT_MODES, MPTConfig


def check_mode(quantize: str | None) -> str | None:
    """`quantize` (None or one of QUANT_MODES), or a ConversionError naming what is
    supported."""
    if quantize is not None and quantize not in QUANT_MODES:
        raise ConversionError(f"quantize={quantize!r} is unsupported; supported: "
                              f"{', '.join(QUANT_MODES)} (weight-only, per output channel)")
    return quantize


def quantize_tensor(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float tensor in torch's layout -> (int8 rows, float32 scales), on the host."""
    q, s = _quantize_fn()(arr)
    return np.asarray(q), np.asarray(s)


@functools.lru_cache(maxsize=1)
def _quantize_fn():
    import jax  # (the converter imports jax only to quantize)

    from mpt_jax.model import quant

    return jax.jit(quant.quantize_rows)


def stream(cfg: MPTConfig, tensors: Iterable[tuple[Row, int | None, np.ndarray]],
           dtype=None) -> Iterator[tuple[tuple[str, ...], int | None, np.ndarray, bool]]:
    """(float row, layer, torch-layout tensor) -> (our path, layer, torch-layout array, whether
    our layout is its transpose) for the model of `cfg` (quantized or not): a quantized matrix
    becomes its int8 array and its scales (both in our layout already), other tensors are cast
    to `dtype` (None: as they are)."""
    quantized = quantized_paths(cfg)
    for row, i, arr in tensors:
        if row.path in quantized:
            q, s = quantize_tensor(arr)
            yield row.path, i, q, False
            yield quantized[row.path], i, s, False
            continue
        if dtype is not None and arr.dtype != dtype:
            arr = arr.astype(dtype)
        yield row.path, i, arr, row.transpose


def leaf_dtypes(cfg: MPTConfig, float_dtype_of) -> dict[tuple[str, ...], np.dtype]:
    """Every parameter's stored dtype for the model of `cfg`: int8 and float32 scales for the
    quantized ones, `float_dtype_of(float path)` for the rest."""
    quantized = quantized_paths(cfg)
    scales = set(quantized.values())
    return {p: (np.dtype(np.int8) if p in quantized else
                np.dtype(np.float32) if p in scales else np.dtype(float_dtype_of(p)))
            for p in model_shapes(cfg)}


def check_params(cfg: MPTConfig, reader: ParamsReader, params_dir) -> None:
    """A checkpoint's parameters hold int8 exactly where its config's quantization says:
    ConversionError naming the parameter otherwise (a quantized checkpoint loaded with a float
    config, or the reverse)."""
    int8 = sorted(p for p in reader.paths if reader.shape_dtype(p)[1] == np.int8)
    if cfg.quantization is None and int8:
        raise ConversionError(
            f"{params_dir}: {'.'.join(int8[0])} is int8 (a quantized checkpoint), but the "
            "checkpoint's config records no quantization; its config.json needs "
            '"quantization": "int8"')
    expected = quantized_paths(cfg)
    for path in sorted(expected):
        if path in reader.paths and reader.shape_dtype(path)[1] != np.int8:
            raise ConversionError(
                f"{params_dir}: {'.'.join(path)} is {reader.shape_dtype(path)[1]}, but the "
                f"checkpoint's config records quantization {cfg.quantization!r} (int8 weights "
                "with scales); a floating-point checkpoint's config.json has no quantization")


def dequantized(reader: ParamsReader, row: Row, scale_row: Row, index, dtype) -> np.ndarray:
    """An int8 row (its layer `index`, or the whole unstacked leaf) dequantized to `dtype`, in
    torch's layout."""
    q = reader.read(row.path, index)
    s = reader.read(scale_row.path, index)
    return (q.astype(np.float32) * s[..., None]).astype(dtype)

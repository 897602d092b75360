"""PyTorch (HF / llm-foundry safetensors) <-> our checkpoints: the name table (table), streaming
file formats (io), import / export and `load_pretrained` (convert)."""
from mpt_jax.convert.convert import (export_checkpoint, import_checkpoint, load_pretrained,
                                     main)
from mpt_jax.convert.io import ConversionError

__all__ = ["ConversionError", "export_checkpoint", "import_checkpoint", "load_pretrained", "main"]

"""mpt_jax: MosaicML's MPT models and llm-foundry's training system in pure JAX.

`mpt_jax.attention` (the attention entry point, `mpt_jax.model.attention`) and `mpt_jax.optim`
(`mpt_jax.train.optim`) are importable under those short names too, as the public contract
names them.
"""
import sys

from mpt_jax.model import MPTConfig, MPTForCausalLM
from mpt_jax.model import attention
from mpt_jax.train import optim

sys.modules[__name__ + ".attention"] = attention
sys.modules[__name__ + ".optim"] = optim


def load_pretrained(path, dtype=None, **kwargs):
    """Loads an HF-layout directory (config.json + *.safetensors) or one of our checkpoints."""
    from mpt_jax.convert import load_pretrained as _load

    return _load(path, dtype=dtype, **kwargs)


__all__ = ["MPTConfig", "MPTForCausalLM", "attention", "load_pretrained", "optim"]

"""mpt_jax: MosaicML's MPT models and llm-foundry's training system in pure JAX."""
from mpt_jax.config import MPTConfig
from mpt_jax.model import MPTForCausalLM


def load_pretrained(path, dtype=None, **kwargs):
    """Loads an HF-layout directory (config.json + *.safetensors) or one of our checkpoints."""
    from mpt_jax.convert import load_pretrained as _load

    return _load(path, dtype=dtype, **kwargs)


__all__ = ["MPTConfig", "MPTForCausalLM", "load_pretrained"]

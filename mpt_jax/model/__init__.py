"""The MPT model: config, ALiBi, the attention entry point, layers and the NNX modules."""
from mpt_jax.model.config import MPTConfig
from mpt_jax.model.model import (MODES, REMAT_POLICIES, KVCache, LayerContext, MPTForCausalLM,
                                 abstract_model, quantize_model)

__all__ = ["MODES", "REMAT_POLICIES", "KVCache", "LayerContext", "MPTConfig", "MPTForCausalLM",
           "abstract_model", "quantize_model"]

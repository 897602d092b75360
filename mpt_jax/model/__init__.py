"""The MPT model: config, ALiBi, the attention entry point, layers and the NNX modules."""
from mpt_jax.model.config import MPTConfig
from mpt_jax.model.model import (REMAT_POLICIES, AttnContext, KVCache, MPTForCausalLM,
                                 abstract_model)

__all__ = ["REMAT_POLICIES", "AttnContext", "KVCache", "MPTConfig", "MPTForCausalLM",
           "abstract_model"]

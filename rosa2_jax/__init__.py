"""rosa2_jax: ROSA2 test-time co-adaptation (Words & Weights) in JAX."""

from rosa2_jax.model.config import ModelConfig
from rosa2_jax.model.decoder import decoder_hidden, forward, lm_logits
from rosa2_jax.model.generation import Generation, SamplingConfig, generate

__all__ = ["ModelConfig", "SamplingConfig", "Generation", "generate", "forward", "decoder_hidden", "lm_logits"]

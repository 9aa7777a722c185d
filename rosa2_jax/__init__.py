"""rosa2_jax: ROSA2 test-time co-adaptation (Words & Weights) in JAX.

The names below load the model code on first use, so that importing a light part of the package (the data
layer, the verifiers, a study's records) does not import JAX.
"""

import importlib

_EXPORTS = {"ModelConfig": "rosa2_jax.model.config", "SamplingConfig": "rosa2_jax.model.generation",
            "Generation": "rosa2_jax.model.generation", "generate": "rosa2_jax.model.generation",
            "forward": "rosa2_jax.model.decoder", "decoder_hidden": "rosa2_jax.model.decoder",
            "lm_logits": "rosa2_jax.model.decoder"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rosa2_jax' has no attribute {name!r}")

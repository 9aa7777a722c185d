"""The policy pi(x, theta): model config and parameter table, the decoder, LoRA adapters, generation,
the sampler, sharding rules and tokenizers."""

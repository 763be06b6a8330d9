"""dsv3-jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX/Flax Linen."""

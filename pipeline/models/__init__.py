"""The networks: the causal Wan transformer, its attention and KV caches, and the frozen real-scale parts (VAE, text encoder)."""

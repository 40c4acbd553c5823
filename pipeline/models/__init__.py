"""The networks: the causal Wan transformer, its attention and KV caches, the frozen real-scale parts (VAE,
text encoder), and models in and out of folders (loading, the `sampling.json` record, dtypes and devices)."""

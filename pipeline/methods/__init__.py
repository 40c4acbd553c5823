"""Training methods: one class per method, each owning its models, optimisers and training step."""

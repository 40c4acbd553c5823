"""Data: the sprites world, training sources, ODE pairs, prompts."""

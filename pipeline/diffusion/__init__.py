"""The diffusion core: flow matching, noise levels, trajectory distributions, losses and samplers."""

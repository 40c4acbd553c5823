"""The training machinery: the trainer, accelerate plumbing, checkpoints, memory, fault points."""

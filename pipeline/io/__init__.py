"""Input and output: guarded writes, stage folders, media, checkpoint conversion."""

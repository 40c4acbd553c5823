"""Evaluation: the sprites checker, metrics, speed, the report and VBench output."""

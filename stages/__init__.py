"""Stages of the pipeline: thin scripts that parse a config, build parts from `pipeline/`, loop, save."""

"""Checkpoint conversion (`./launch.sh convert`): any source read into one `Weights` record, written as a
diffusers folder, one safetensors file in diffusers naming, or one in the original Wan naming.

The jobs live apart: `pipeline/io/readers.py` (every source kind), `pipeline/io/keys.py` (Wan /
diffusers / wrapper-prefixed names), `pipeline/io/weights.py` (the record and its model config: read,
inferred, checked), `pipeline/io/writers.py` (the targets), `pipeline/models/sampling_meta.py` (the
sampling record beside the weights). This module runs one conversion under the output guards.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.io.guard import Lock, check_output, replacing
from pipeline.io.readers import read_source
from pipeline.io.weights import ConvertError, Weights
from pipeline.io.writers import write_diffusers, write_file
from pipeline.models.device import DTYPES

TARGETS = ("diffusers", "safetensors", "wan", "pipeline")


def convert(source: str | Path, dest: str | Path, to: str, ema: bool = False, dtype: str | None = None,
            part: str = "generator", force: bool = False, model_config: str | Path | None = None,
            command: str | None = None, *, allow_nonfinite: bool = False, components: str | Path | None = None,
            link: bool = False) -> Weights:
    """Read `source`, write it to `dest` as `to` ("diffusers", "safetensors", "wan" or "pipeline": a whole
    `CausalWanPipeline` folder, `pipeline/io/pipeline_folder.py`).

    Args:
        dtype: "fp32", "bf16" or "fp16" to cast floating tensors (None: keep).
        model_config: a diffusers `config.json` for sources that carry no config.
        allow_nonfinite: write weights holding NaN / inf (refused by default, naming the first such key; a
            cast that overflows to inf is refused too).
        components: `--to pipeline`, text models: a Wan pipeline folder with `vae/`, `text_encoder/`,
            `tokenizer/` (default: a stage's `components.*`); `link`: link them instead of copying.
    Returns:
        the `Weights` written.
    """
    if to not in TARGETS:
        raise ConvertError(f"--to must be one of {', '.join(TARGETS)}, got '{to}'")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    dest = Path(dest)
    if to not in ("diffusers", "pipeline") and dest.suffix != ".safetensors":
        raise ConvertError(f"--to {to} writes one file: DEST must end in .safetensors, got {dest}")
    if to != "pipeline" and (components is not None or link):
        raise ConvertError("--components and --link apply to --to pipeline")
    if to == "pipeline" and part != "generator":
        raise ConvertError(f"--part {part}: the critic is a score model, not a student; --to pipeline takes the "
                           "generator")
    inputs = {"SOURCE": source, "--model-config": model_config, "--components": components}
    check_output(dest, inputs, force, "DEST")  # before reading anything large
    with Lock(dest, command or f"convert {source} {dest} --to {to}"):  # one command at a time per DEST
        check_output(dest, inputs, force, "DEST")  # again, now that no other command can be writing it
        weights = read_source(source, ema, part).with_config_file(model_config)
        if not allow_nonfinite:  # a broken training run's NaNs would otherwise travel on silently
            weights.check_finite()
        weights = weights.cast(DTYPES.get(dtype))
        if not allow_nonfinite and dtype is not None:
            weights.check_finite(after=f"--dtype {dtype} (values beyond its range)")
        parts = None
        if to == "pipeline":
            from pipeline.io.pipeline_folder import pipeline_parts

            parts = pipeline_parts(source, weights, components)
            for name, folder in parts.components.items():  # DEST must not be, hold or lie in a component either
                check_output(dest, {f"the {name} ({parts.where})": folder}, force, "DEST")
        with replacing(dest, force, "DEST") as tmp:
            if to == "pipeline":
                from pipeline.io.pipeline_folder import write_pipeline

                write_pipeline(weights, tmp, parts, link=link)
            elif to == "diffusers":
                write_diffusers(weights, tmp)
            else:
                write_file(weights, tmp, "wan" if to == "wan" else "diffusers")
    return weights

"""`convert --to pipeline`: a student written as a complete `CausalWanPipeline` folder
(`pipeline/pipelines/causal_wan.py`), which `CausalWanPipeline.from_pretrained(DEST)` loads offline:

    model_index.json       the pipeline class, its components and settings (diffusers' layout)
    transformer/           config.json, weights, sampling.json (`write_diffusers`)
    scheduler/             scheduler_config.json (`CausalFewStepScheduler`: the student's schedule, window, chunk)
    class_prompts/         sprites models: the class-embedding table (`ClassPrompts`)
    vae/ text_encoder/ tokenizer/   text models: the run's components, copied (default) or linked (`link=True`:
                           symbolic links to the absolute component folders, nothing copied)

The components of a text model come from the run (a stage folder's `components.*`) or `components` (a Wan
pipeline folder holding `vae/`, `text_encoder/`, `tokenizer/`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from pipeline.io.jsonfile import read_json
from pipeline.io.weights import ConvertError, Weights
from pipeline.io.writers import write_diffusers

TEXT_PARTS = ("vae", "text_encoder", "tokenizer")


@dataclasses.dataclass
class PipelineParts:
    """What a pipeline folder needs beyond the transformer's weights.

    Attributes:
        cfg: our `Config` of the student (its sampler, chunk, data kind, components settings).
        table: sprites: the class-embedding table `[K + 1, L, D]`; None for text models.
        components: text models: `{"vae": folder, "text_encoder": folder, "tokenizer": folder}`.
        where: where the components came from, for messages (`the run's components.*`, `--components F`).
    """

    cfg: object
    table: torch.Tensor | None
    components: dict
    where: str = ""


def pipeline_parts(source: str | Path, weights: Weights, components: str | Path | None) -> PipelineParts:
    """The parts of a pipeline folder for the student `weights` read from `source`.

    Raises:
        ConvertError: one line: not a student, a text model without components, components for a sprites model.
    """
    from pipeline.config import load_config
    from pipeline.data.sources import class_table
    from pipeline.io.run_dir import is_stage_folder
    from pipeline.models.loading import pipeline_class_table, sampling_config
    from pipeline.models.text_encoder import resolve_component, resolve_tokenizer
    from pipeline.training.checkpoint import read_safetensors

    role = (weights.sampling or {}).get("role")
    if role != "student":
        said = f"is a {role}" if role else "records no role (a stock model?)"
        raise ConvertError(f"{weights.origin} {said}: --to pipeline needs a few-step student (an init_student or "
                           "distill stage, or a folder converted from one)")
    stage = is_stage_folder(source)
    # a stage's whole run config (its components too); any other source: the defaults under its sampling record
    cfg = load_config(Path(source) / "config.yaml") if stage else sampling_config(weights, weights.model_config()["text_dim"])
    if cfg.data.kind == "sprites":
        if components is not None:
            raise ConvertError(f"--components: {weights.origin} is a sprites model (class-conditioned), which takes no "
                               "VAE or text encoder")
        table = None
        if stage and (Path(source) / "conditioning.safetensors").is_file():
            table = read_safetensors(Path(source) / "conditioning.safetensors").get("class_table")
        if table is None:  # a pipeline folder converted again
            table = pipeline_class_table(Path(source))
        return PipelineParts(cfg, class_table(cfg) if table is None else table, {})
    c = cfg.components
    if components is not None:
        where, vae, enc, tok = f"--components {components}", components, components, None
    elif stage and c.vae and c.text_encoder:
        where, vae, enc, tok = f"the run's components ({Path(source) / 'config.yaml'})", c.vae, c.text_encoder, c.tokenizer
    else:
        raise ConvertError(f"{weights.origin} is a text model and its source records no components: pass "
                           "--components FOLDER (a Wan pipeline folder with vae/, text_encoder/, tokenizer/)")
    try:
        parts = {"vae": resolve_component(vae, "vae", "components.vae"),
                 "text_encoder": resolve_component(enc, "text_encoder", "components.text_encoder"),
                 "tokenizer": resolve_tokenizer(enc, tok)}
    except FileNotFoundError as e:
        raise ConvertError(f"{where}: {e}") from None
    for name, folder in parts.items():
        if not (folder / ("tokenizer_config.json" if name == "tokenizer" else "config.json")).is_file():
            raise ConvertError(f"{where}: {folder} is not a {name} folder (no "
                               f"{'tokenizer_config.json' if name == 'tokenizer' else 'config.json'})")
    return PipelineParts(cfg, None, parts, where)


def write_pipeline(weights: Weights, dest: Path, parts: PipelineParts, *, link: bool = False) -> None:
    """Write the pipeline folder `dest` (a temporary folder, renamed by the caller): see the module docstring."""
    from diffusers import __version__ as diffusers_version
    from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple

    from pipeline.diffusion.scheduler import CausalFewStepScheduler
    from pipeline.models.causal_wan import CausalWanTransformer
    from pipeline.models.conditioning import ClassPrompts
    from pipeline.pipelines.causal_wan import CausalWanPipeline

    dest.mkdir(parents=True)
    write_diffusers(weights, dest / "transformer")
    scheduler = CausalFewStepScheduler.from_run_config(parts.cfg)
    scheduler.save_pretrained(dest / "scheduler")
    c = parts.cfg.components
    index = {"_class_name": CausalWanPipeline.__name__, "_diffusers_version": diffusers_version,
             "transformer": list(_fetch_class_library_tuple(CausalWanTransformer)),
             "scheduler": list(_fetch_class_library_tuple(CausalFewStepScheduler)),
             **{name: [None, None] for name in (*TEXT_PARTS, "class_prompts")},
             "max_sequence_length": c.max_sequence_length, "text_encoder_dtype": str(c.text_encoder_dtype),
             "vae_dtype": str(c.vae_dtype)}
    if parts.table is not None:
        ClassPrompts.of(parts.table).save_pretrained(dest / "class_prompts")
        index["class_prompts"] = list(_fetch_class_library_tuple(ClassPrompts))
    for name, folder in parts.components.items():
        if link:
            os.symlink(folder.resolve(), dest / name, target_is_directory=True)
        else:
            shutil.copytree(folder, dest / name, symlinks=False)
        index[name] = component_class(name, folder)
    (dest / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def component_class(name: str, folder: Path) -> list[str]:
    """`[library, class]` of a text-model component folder, for `model_index.json`."""
    if name == "vae":
        cls = read_json(folder / "config.json").get("_class_name")
        if cls != "AutoencoderKLWan":
            raise ConvertError(f"{folder}: the VAE must be diffusers' AutoencoderKLWan, its config.json says {cls!r}")
        return ["diffusers", cls]
    if name == "text_encoder":
        arch = (read_json(folder / "config.json").get("architectures") or [None])[0]
        if arch is None:
            raise ConvertError(f"{folder}/config.json: no 'architectures' entry naming the text encoder's class")
        return ["transformers", arch]
    from transformers import AutoTokenizer

    return ["transformers", type(AutoTokenizer.from_pretrained(folder, local_files_only=True)).__name__]

"""`CausalWanPipeline`: a trained causal student as a diffusers pipeline, whole-video (`__call__`) or streamed
chunk by chunk (`stream`), from a folder `./launch.sh convert SOURCE DEST --to pipeline` writes.

Components (diffusers' `DiffusionPipeline`: `model_index.json`, one folder each, `save_pretrained` /
`from_pretrained`):

- `transformer`: our `CausalWanTransformer` (diffusers' Wan transformer with per-frame timesteps and a KV
  cache), its `sampling.json` beside its `config.json` (the role must be `student`);
- `scheduler`: `CausalFewStepScheduler`, the student's few-step schedule, KV window, sinks, context level,
  chunk size and default video size (pipeline/diffusion/scheduler.py);
- text models: `text_encoder` (UMT5) + `tokenizer`, `vae` (`AutoencoderKLWan`); prompts are encoded as
  WanPipeline does (`text_encoder.encode_prompts`) and every finished latent chunk is decoded at once, the VAE's
  causal-convolution cache carried to the next (`vae.StreamingDecoder`);
- sprites models: `class_prompts` (`conditioning.ClassPrompts`, the class-embedding table) and no VAE: the
  model's frames are pixels.

The videos are `sample`'s, bit for bit: the same noise (drawn at once from the CPU `generator`, as `seed` draws
it: `sampling.seeded_noise`), the same sampler (`sampling.few_step_chunks`), the same prompt encoding and the
same decode (one video per decoder call). `sample` samples in batches (64 sprites videos, 8 text videos); a
pipeline call is one batch, so calls of up to that many videos equal `sample` exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.video_processor import VideoProcessor

from pipeline.diffusion.sampling import Denoiser, check_switches, seeded_noise, stream_few_step
from pipeline.io.jsonfile import read_json
from pipeline.models.sampling_meta import attach, read_sampling, sampling_metadata

OUTPUT_TYPES = ("np", "pt", "pil", "latent")
REQUIRED = ("transformer", "scheduler")
TEXT_PARTS = ("text_encoder", "tokenizer", "vae")


class PipelineError(ValueError):
    """A pipeline folder or call that cannot work; the message is one line naming the cause."""


class CausalWanPipeline(DiffusionPipeline):
    """Few-step causal video generation with a rolling KV cache, whole or streamed (module docstring).

    Args:
        transformer: the student (`CausalWanTransformer`).
        scheduler: its schedule (`CausalFewStepScheduler`).
        vae, text_encoder, tokenizer: the text path (all three, or none).
        class_prompts: the class-conditioned path (sprites), instead of the text path.
        max_sequence_length: prompt tokens (Wan: 512; `components.max_sequence_length`).
        text_encoder_dtype, vae_dtype: the dtypes the run used (`components.*_dtype`); `from_pretrained` loads
            those components in them unless it is given a `dtype`.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer", "class_prompts"]

    def __init__(self, transformer, scheduler, vae=None, text_encoder=None, tokenizer=None, class_prompts=None,
                 max_sequence_length: int = 512, text_encoder_dtype: str = "bf16", vae_dtype: str = "fp32"):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, class_prompts=class_prompts)
        self.register_to_config(max_sequence_length=max_sequence_length, text_encoder_dtype=text_encoder_dtype,
                                vae_dtype=vae_dtype)
        text = [p for p in TEXT_PARTS if getattr(self, p) is not None]
        if class_prompts is None and len(text) < len(TEXT_PARTS):
            missing = [p for p in TEXT_PARTS if p not in text]
            raise PipelineError(f"CausalWanPipeline: missing component(s) {', '.join(missing)}: a text model needs "
                                "text_encoder, tokenizer and vae (a sprites model: class_prompts)")
        if class_prompts is not None and text:
            raise PipelineError(f"CausalWanPipeline: class_prompts (sprites) and {', '.join(text)} (text) given: one "
                                "conditioning path")
        from pipeline.models.causal_wan import CausalWanTransformer

        if not isinstance(transformer, CausalWanTransformer):
            raise PipelineError(f"CausalWanPipeline: the transformer must be a CausalWanTransformer (per-frame timesteps, "
                                f"KV cache), got {type(transformer).__name__}")
        check_student(transformer, "transformer")
        transformer.set_attention_backend("auto")  # as our loader does (`loading.load_source`)
        self.video_processor = VideoProcessor(vae_scale_factor=1)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "CausalWanPipeline":
        """Load a pipeline folder (`convert --to pipeline`), offline. Checked first, each a one-line
        `PipelineError`: the folder and its `model_index.json` exist, every component it lists has its
        folder, and the transformer is a student. Without `dtype`, the text encoder and VAE load in
        the dtypes the run used (`text_encoder_dtype`, `vae_dtype`), everything else in float32."""
        folder = Path(pretrained_model_name_or_path)
        index = check_folder(folder)
        if "torch_dtype" not in kwargs and "dtype" not in kwargs:
            from pipeline.models.device import DTYPES

            kwargs["dtype"] = {"default": torch.float32,
                                     "text_encoder": DTYPES[index.get("text_encoder_dtype", "bf16")],
                                     "vae": DTYPES[index.get("vae_dtype", "fp32")]}
        kwargs.setdefault("local_files_only", True)
        pipe = super().from_pretrained(folder, **kwargs)
        attach(pipe.transformer, read_sampling(folder / "transformer"))
        return pipe

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """diffusers' `save_pretrained`, plus the transformer's sampling record (`transformer/sampling.json`), so a
        saved pipeline is again a SOURCE `sample` and `convert` read as a student."""
        from pipeline.models.sampling_meta import write_sampling

        super().save_pretrained(save_directory, **kwargs)
        write_sampling(Path(save_directory) / "transformer", sampling_metadata(self.transformer))

    # ------------------------------------------------------------------ generation

    @property
    def is_text(self) -> bool:
        return self.class_prompts is None

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *, class_labels=None, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, num_videos_per_prompt: int = 1,
                 num_inference_steps: int | None = None, generator: torch.Generator | None = None,
                 output_type: str = "np", recache: bool = False, overlap_decode: bool = False,
                 return_dict: bool = True):
        """Whole videos: `stream` run to the end, its chunks joined along the frame axis (arguments as there).

        Returns:
            `WanPipelineOutput(frames=...)` (or a tuple `(frames,)` with `return_dict=False`): as diffusers'
            `WanPipeline`, "np" `[B, T, H, W, 3]` in [0, 1], "pt" `[B, T, 3, H, W]` in [0, 1], "pil" a list of
            frame lists; "latent": the latents `[B, C, F, h, w]`.
        """
        parts = list(self.stream(prompt, class_labels=class_labels, num_frames=num_frames, height=height,
                                 width=width, num_videos_per_prompt=num_videos_per_prompt,
                                 num_inference_steps=num_inference_steps, generator=generator,
                                 output_type=output_type, recache=recache, overlap_decode=overlap_decode))
        frames = join_chunks(parts, output_type)
        self.maybe_free_model_hooks()
        return WanPipelineOutput(frames=frames) if return_dict else (frames,)

    def stream(self, prompt: str | list[str] | None = None, *, class_labels=None, num_frames: int | None = None,
               height: int | None = None, width: int | None = None, num_videos_per_prompt: int = 1,
               num_inference_steps: int | None = None, generator: torch.Generator | None = None,
               output_type: str = "np", recache: bool = False, overlap_decode: bool = False) -> Iterator:
        """Generate chunk by chunk: returns a generator that yields each chunk's frames as soon as the chunk is
        finished and decoded, before any network call of the next chunk. The arguments are checked, the prompts
        encoded and the noise drawn when `stream` is called (a bad argument raises here, not at the first chunk).

        Args:
            prompt: text models: a prompt or a list; a prompt may switch at latent frame K with the prompt-file
                syntax `"a cat walks || 6: the cat sits"` (every prompt of one call must switch at the same frames).
            class_labels: sprites models: class ids `[N]` (0..5), or a class schedule `[N, frames]` (a switch
                wherever a video's class changes, from the first chunk starting there).
            num_frames: text: pixel frames (1 + 4·(latent frames - 1), WanPipeline's count, default from the
                scheduler's `num_frames`); sprites: frames. Past the scheduler's KV window the cache rolls.
            height, width: pixels (default: the scheduler's `sample_size`, × the VAE's 8 for text models).
            num_videos_per_prompt: videos per prompt (text models; in order p0, p0, ..., p1, ...).
            num_inference_steps: K evenly spaced denoising steps instead of the student's own (`sample --steps K`).
            generator: a CPU `torch.Generator`; `torch.Generator().manual_seed(S)` gives `sample --seed S`'s videos.
            output_type: "np", "pt", "pil" (each chunk's frames as `__call__` returns them) or "latent".
            recache: at a prompt switch, rebuild the KV window under the new prompt (LongLive); else keep it.
            overlap_decode: text models on CUDA: decode each chunk on a CUDA stream of its own while the next chunk
                denoises (`StreamingDecoder.submit`): a chunk's frames are then yielded once the next chunk's
                network calls are queued, the same frames, at a higher rate end to end. Elsewhere no effect.
        Yields:
            per chunk, its frames in `output_type` (text: 1 + 4·(f - 1) pixel frames for the first chunk of f
            latent frames, 4·f after; sprites: f frames).
        """
        if output_type not in OUTPUT_TYPES:
            raise PipelineError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        sch = self.scheduler
        sch.set_timesteps(num_inference_steps)
        cond, switches = (self._text_conditions(prompt, num_videos_per_prompt) if self.is_text
                          else self._class_conditions(prompt, class_labels, num_frames))
        shape = self._latent_shape(num_frames, height, width)
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise PipelineError("generator must be one CPU torch.Generator (noise is drawn on the CPU, so videos do "
                                "not depend on the device)")
        device = self._execution_device
        noise, step_gen = seeded_noise(len(cond), shape, generator, device)
        c = sch.config
        den = Denoiser.of_sampler(self.transformer, "block_causal", c.frames_per_chunk, c.prediction, c)
        # one pool for all of this pipeline's calls: a call's static KV cache takes the last one's buffers, the
        # addresses a compiled step's CUDA graphs were recorded on (`compile_steady_state`)
        if getattr(self, "_kv_pool", None) is None:
            self._kv_pool = den.pool
        den.pool = self._kv_pool
        try:
            switches = [(k, e.to(device)) for k, e in check_switches(switches, shape[1])]
        except ValueError as e:
            raise PipelineError(f"{e} (the video has {shape[1]} latent frames)") from None
        decoder = None
        if self.is_text and output_type != "latent":
            from pipeline.models.vae import WanVAE

            # one video per decoder call, as `sample`
            decoder = WanVAE.wrap(self.vae).stream(batch_size=1, overlap=overlap_decode)
        chunks = stream_few_step(den, noise.to(device), cond.to(device), sch.sigmas.to(device),
                                 context_sigma=c.context_sigma, generator=step_gen,
                                 max_context_frames=c.max_context_frames, sink_frames=c.sink_frames,
                                 switches=switches, recache=recache)
        return self._frames(chunks, decoder, output_type)

    def _frames(self, chunks, decoder, output_type: str) -> Iterator:
        """Each finished latent chunk of `chunks` as `output_type` frames, decoded (text) as it arrives; an overlapping
        decoder (`StreamingDecoder.push`) hands a chunk's frames over after the next chunk is queued."""
        for x0 in chunks:
            if output_type == "latent":
                yield x0.cpu()
                continue
            # [B, 3, T, H, W] in [-1, 1]: decoded pixels (text), or the frames themselves (sprites, as `sample`)
            frames = decoder.push(x0) if decoder is not None else x0.cpu().clamp(-1, 1)
            if frames is not None:
                yield self.video_processor.postprocess_video(frames, output_type=output_type)
        if decoder is not None and (last := decoder.flush()) is not None:
            yield self.video_processor.postprocess_video(last, output_type=output_type)

    def _class_conditions(self, prompt, class_labels, num_frames):
        if prompt is not None or class_labels is None:
            raise PipelineError("a sprites pipeline (class_prompts) is conditioned by class_labels=[N] or a class "
                                "schedule [N, frames], not by a text prompt")
        from pipeline.diffusion.videos import class_switches

        labels = torch.as_tensor(class_labels, dtype=torch.long)
        table = self.class_prompts.table.detach().cpu()
        if labels.ndim not in (1, 2) or not len(labels):
            raise PipelineError(f"class_labels must be [N] or [N, frames], got shape {list(labels.shape)}")
        if labels.min() < 0 or labels.max() >= table.shape[0] - 1:
            raise PipelineError(f"class_labels must lie in 0..{table.shape[0] - 2}, got {labels.min()}..{labels.max()}")
        try:
            labels, switches = class_switches(table, labels, num_frames or self.scheduler.config.num_frames)
        except ValueError as e:
            raise PipelineError(f"class_labels: {e}") from None
        return table[labels], switches

    def _text_conditions(self, prompt, per_prompt: int):
        from pipeline.data.prompts import parse_schedule
        from pipeline.models.text_encoder import encode_prompts

        if prompt is None:
            raise PipelineError("a text pipeline needs prompt= (a string or a list of strings)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts) or per_prompt < 1:
            raise PipelineError("prompt must be a non-empty string or list of strings, num_videos_per_prompt >= 1")
        try:
            lines = [parse_schedule(p) for p in prompts]
        except ValueError as e:
            raise PipelineError(str(e)) from None
        frames = {tuple(k for k, _ in line) for line in lines}
        if len(frames) > 1:
            raise PipelineError(f"the prompts of one call must switch at the same frames, got {sorted(frames)}")
        texts = list(dict.fromkeys(t for line in lines for _, t in line))
        rows = encode_prompts(self.tokenizer, self.text_encoder, texts, self.config.max_sequence_length).float()
        idx = torch.arange(len(prompts)).repeat_interleave(per_prompt)

        def rows_of(j):  # the embeddings of every video at schedule entry j
            return rows[[texts.index(lines[int(i)][j][1]) for i in idx]]

        return rows_of(0), [(k, rows_of(j)) for j, (k, _) in enumerate(lines[0]) if j]

    def _latent_shape(self, num_frames, height, width) -> tuple[int, int, int, int]:
        """`(C, F, h, w)` of one video from the call's pixel sizes (defaults: the scheduler's)."""
        c = self.scheduler.config
        fpc, (h, w) = c.frames_per_chunk, c.sample_size
        if self.is_text:
            t, s = self.vae.config.scale_factor_temporal, self.vae.config.scale_factor_spatial
            frames = c.num_frames if num_frames is None else None
            if num_frames is not None:
                if num_frames < 1 or (num_frames - 1) % t:
                    raise PipelineError(f"num_frames ({num_frames}) must be 1 + a multiple of {t} (the VAE's stride)")
                frames = 1 + (num_frames - 1) // t
            for name, v in (("height", height), ("width", width)):
                if v is not None and (v < s or v % s):
                    raise PipelineError(f"{name} ({v}) must be a positive multiple of {s} (the VAE's stride)")
            h, w = (height // s if height else h), (width // s if width else w)
        else:
            frames = num_frames or c.num_frames
            h, w = height or h, width or w
        patch = self.transformer.config.patch_size
        if frames % fpc:
            raise PipelineError(f"the video's {frames} latent frames must be a multiple of the chunk ({fpc} frames)")
        if h % patch[1] or w % patch[2]:
            raise PipelineError(f"a latent frame of {h}x{w} does not divide into the transformer's {patch[1]}x"
                                f"{patch[2]} patches")
        return self.transformer.config.in_channels, frames, h, w


def join_chunks(parts: list, output_type: str):
    """The chunks `stream` yielded, joined along the frame axis (`__call__`'s frames)."""
    import numpy as np

    if output_type == "latent":
        return torch.cat(parts, dim=2)
    if output_type == "np":
        return np.concatenate(parts, axis=1)
    if output_type == "pt":
        return torch.cat(parts, dim=1)
    return [sum((p[i] for p in parts), []) for i in range(len(parts[0]))]  # pil: per video, its frame lists


def check_student(transformer, where: str) -> None:
    """A pipeline streams a few-step student: refuse a model whose sampling record says teacher."""
    role = (sampling_metadata(transformer) or {}).get("role")
    if role == "teacher":
        raise PipelineError(f"{where} is a teacher (its sampling record's role): CausalWanPipeline streams a few-step "
                            "student; export an init_student or distill stage")


def check_folder(folder: Path) -> dict:
    """The `model_index.json` of a pipeline folder, after checking what `from_pretrained` needs (one line each)."""
    if not folder.is_dir():
        raise PipelineError(f"{folder}: no such folder (CausalWanPipeline loads local folders; nothing is downloaded)")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise PipelineError(f"{folder}: no model_index.json, not a pipeline folder (write one with ./launch.sh "
                            "convert SOURCE DEST --to pipeline)")
    try:
        index = read_json(index_file)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    for name in (*REQUIRED, *CausalWanPipeline._optional_components):
        entry = index.get(name)
        listed = isinstance(entry, list) and len(entry) == 2 and entry[0] is not None
        if name in REQUIRED and not listed:
            raise PipelineError(f"{index_file}: no '{name}' component")
        if listed and not (folder / name).is_dir():
            raise PipelineError(f"{folder}: component '{name}' is listed in model_index.json but {folder / name}/ "
                                "is missing")
    record = read_sampling(folder / "transformer")
    if (record or {}).get("role") == "teacher":
        raise PipelineError(f"{folder / 'transformer'} is a teacher (its sampling.json role): CausalWanPipeline "
                            "streams a few-step student; export an init_student or distill stage")
    return index

"""Generated videos in the layout VBench reads, so text-conditioned models can be scored with VBench
(not installed here), and the sampling of text-conditioned latent models into it: prompt embeddings ->
latents (`sample_text_latents`) -> the VAE, chunk by chunk as the sampler finishes them (`ChunkDecodeSink`;
or whole videos, `decode_videos`) -> MP4s (`write_text_samples`).

VBench's prompt suite asks for `<out>/<prompt>-<index>.mp4`, `index` = 0, 1, ... per prompt (5 samples
per prompt in its standard protocol), one folder per model (and per dimension, if sampling per
dimension). Prompt file names longer than 180 characters are cut to 180, as VBench-2.0 does; a `/`
(which cannot be in a file name) becomes `_`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.io.guard import replacing

MAX_NAME = 180


def vbench_name(prompt: str, index: int) -> str:
    """File name of sample `index` of `prompt`: `<prompt[:180]>-<index>.mp4`."""
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    return f"{prompt.replace('/', '_')[:MAX_NAME]}-{index}.mp4"


def write_vbench_videos(out: str | Path, videos: torch.Tensor, prompts: list[str], indices: list[int],
                        fps: int = 16, force: bool = True) -> list[Path]:
    """Write one MP4 per video: `videos [N, F, 3, H, W]` in [-1, 1], `prompts [N]`, `indices [N]`
    (the sample number of each video within its prompt). Refuses to overwrite a file written earlier in
    the same call (two videos with the same prompt and index), and an existing file unless `force`. Each is
    written under a temporary name, then renamed (`pipeline.io.guard.replacing`). Returns the paths in order."""
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must be [N, F, 3, H, W], got {list(videos.shape)}")
    if not len(videos) == len(prompts) == len(indices):
        raise ValueError(f"need one prompt and index per video, got {len(videos)} videos, {len(prompts)} prompts, "
                         f"{len(indices)} indices")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / vbench_name(p, int(i)) for p, i in zip(prompts, indices)]
    if len(set(paths)) != len(paths):
        raise ValueError("two videos map to the same VBench file name (same prompt and index)")
    import imageio.v2 as iio2

    for v, path in zip(videos, paths):  # frames as they are (any H x W), [F, H, W, 3] uint8
        frames = ((v.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        with replacing(path, force, "--vbench-dir video") as tmp:
            iio2.mimwrite(tmp, list(frames), fps=fps, macro_block_size=2)  # libx264: even sizes (odd ones padded)
    return paths


def sample_text_latents(model, cfg, context: torch.Tensor, null: torch.Tensor, latent_shape: tuple, seed: int, *,
                        denoising_steps=None, steps: int | None = None, guidance: float | None = None,
                        batch_size: int = 8, on_chunk=None, few_step: bool | None = None, switches=(),
                        recache: bool = False) -> torch.Tensor:
    """Latents `[N, C, F, H, W]` of a text-conditioned model for prompt embeddings `context [N, L, D]`.

    A student (`is_student`: the role in its `sampling.json`) samples with the few-step chunk-wise sampler (`cfg.student`,
    `denoising_steps` replacing its list); a teacher with its many-step sampler
    (`cfg.pretrain_teacher.sampler`, `steps` / `guidance` replacing its own), guided against `null [1, L, D]`
    (the empty prompt's embeddings). `latent_shape` is `(C, F, H, W)`; noise is seeded by `seed`.
    `few_step=True` runs a teacher through the student's sampler (the no-distillation baseline). `switches`
    `[(K, cond_K [N, L, D]), ...]`, `recache`: prompt switches (`sampling.few_step_rollout`).
    """
    from dataclasses import replace

    from pipeline.diffusion.videos import sample_latents
    from pipeline.models.sampling_meta import is_student

    if few_step or (few_step is None and is_student(model)):
        few_step = True
    few_step = bool(few_step)
    sp = replace(cfg.pretrain_teacher.sampler, **{k: v for k, v in dict(steps=steps, guidance=guidance).items()
                                                    if v is not None})
    uncond = None if few_step else null.float().expand(len(context), *null.shape[1:])
    return sample_latents(model, context, shape=latent_shape, frames_per_chunk=cfg.data.frames_per_chunk,
                          prediction=cfg.model.prediction, student=cfg.student, sampler=sp,
                          attention=cfg.pretrain_teacher.attention, uncond=uncond, seed=seed, batch_size=batch_size,
                          few_step=few_step, denoising_steps=denoising_steps, on_chunk=on_chunk, switches=switches,
                          recache=recache)


def decode_videos(vae, latents: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Decode normalised latents `[N, C, F, h, w]` with a `pipeline.models.vae.WanVAE` into videos
    `[N, T, 3, H, W]` in [-1, 1] (the samples-file / VBench layout), `batch_size` videos at a time."""
    out = [vae.decode(latents[i:i + batch_size]) for i in range(0, len(latents), batch_size)]
    return torch.cat(out).permute(0, 2, 1, 3, 4).contiguous()


class ChunkDecodeSink:
    """An `on_chunk(index, chunk)` callback for the samplers that VAE-decodes each latent chunk as soon as it is
    finished (`pipeline.models.vae.StreamingDecoder`), instead of decoding the finished videos afterwards.

    The samplers call `on_chunk(index, chunk [B, C, fpc, h, w])` per chunk, `index` restarting at 0 in every
    batch of videos (the synchronous sampler: once per batch, index 0, the whole video); index 0 therefore
    starts a new batch (the decoder is reset). `on_frames(index, frames [B, T, 3, H, W])`, if given, receives
    each chunk's pixel frames in [-1, 1] (float32, CPU) as they are decoded. `batch_size` caps the videos per
    decoder call (1, as `decode_videos`, bounds the VAE's memory). `overlap` (a CUDA VAE): each chunk decodes on
    the VAE's own CUDA stream while the sampler goes on (`StreamingDecoder.submit`); its frames are collected (and
    handed to `on_frames`) when the next chunk arrives, or by `videos()`.

    `videos()` returns everything decoded so far, `[N, T, 3, H, W]` in sampling order; `times` the seconds
    each chunk's decode took (the "VAE decode time per block"; overlapped: on its stream), `latent_frames` the latent
    frames each had.
    """

    def __init__(self, vae, on_frames=None, batch_size: int | None = 1, overlap: bool = False):
        self.decoder = vae.stream(batch_size, overlap=overlap)
        self.on_frames = on_frames
        self.batches: list[list[torch.Tensor]] = []  # per batch: its chunks' frames [B, 3, T, H, W]
        self.latent_frames: list[int] = []
        self.next_index = 0

    @property
    def times(self) -> list[float]:
        return self.decoder.times

    def __call__(self, index: int, chunk: torch.Tensor) -> None:
        if index == 0:
            self._deliver(self.decoder.flush())  # the previous batch's last chunk, before its decoder state goes
            self.decoder.reset()
            self.batches.append([])
        elif index != self.next_index:  # a skipped or repeated chunk would shift every later frame
            raise RuntimeError(f"chunk {index} arrived after chunk {self.next_index - 1}: chunks must come in order")
        self.latent_frames.append(chunk.shape[2])
        self.next_index = index + 1
        self._deliver(self.decoder.push(chunk))

    def _deliver(self, frames: torch.Tensor | None) -> None:
        """The frames of the current batch's next chunk, if due (`StreamingDecoder.push`)."""
        if frames is None:
            return
        index = len(self.batches[-1])  # chunks arrive in order: the chunks delivered so far
        self.batches[-1].append(frames)
        if self.on_frames is not None:
            self.on_frames(index, frames.permute(0, 2, 1, 3, 4))

    def summary(self) -> str:
        """The per-chunk decode times in one line: "N chunks, mean X ms (first Y ms, max Z ms)"."""
        t = self.times
        if not t:
            return "no chunks decoded"
        return (f"{len(t)} chunks, mean {1000 * sum(t) / len(t):.1f} ms (first {1000 * t[0]:.1f} ms, "
                f"max {1000 * max(t):.1f} ms)")

    def videos(self) -> torch.Tensor:
        """The decoded videos `[N, T, 3, H, W]` in [-1, 1] (the samples-file / VBench layout)."""
        if self.batches:
            self._deliver(self.decoder.flush())
        if not self.batches:
            raise RuntimeError("no chunk was decoded (the sampler never called on_chunk)")
        return torch.cat([torch.cat(b, 2) for b in self.batches]).permute(0, 2, 1, 3, 4).contiguous()


def write_text_samples(model, cfg, prompts: list[str], context: torch.Tensor, null: torch.Tensor, vae,
                       out: str | Path, videos_per_prompt: int = 5, latent_shape: tuple | None = None,
                       seed: int = 0, batch_size: int = 8, fps: int = 16, stream_decode: bool = True,
                       sink: ChunkDecodeSink | None = None, force: bool = True, schedules=None,
                       **sampler) -> list[Path]:
    """Sample `videos_per_prompt` videos for each prompt (`context [P, L, D]` its embeddings), decode them
    with the VAE and write `<out>/<prompt>-<i>.mp4` (VBench's layout). `sampler` goes to
    `sample_text_latents` (denoising_steps / steps / guidance / on_chunk / recache). Returns the paths,
    prompt-major. `schedules`: per prompt, its switches `[(K, embeddings [L, D]), ...]` (`prompts.parse_schedule`;
    `prompts[i]` names the whole schedule, `context[i]` is its first prompt); each prompt is then sampled alone, from the same noise (`seed`), so schedules
    that share a beginning share it exactly up to their first switch.

    With `stream_decode` (default) every chunk is decoded as soon as the sampler finishes it, through `sink`
    (a `ChunkDecodeSink`; pass one to get frames per chunk via its `on_frames`, or to read its per-chunk
    decode `times` afterwards) after the caller's own `on_chunk`; the videos equal those of decoding the
    finished latents (`stream_decode=False`, `decode_videos`)."""
    from pipeline.data.sources import latent_shape as config_latent_shape

    if len(prompts) != len(context):
        raise ValueError(f"need one embedding row per prompt, got {len(prompts)} prompts, {len(context)} rows")
    idx = torch.arange(len(prompts)).repeat_interleave(videos_per_prompt)
    if stream_decode:
        sink = sink or ChunkDecodeSink(vae)
        user = sampler.pop("on_chunk", None)

        def on_chunk(index, chunk):
            if user is not None:  # first: the caller's clock times the latents, not the decode
                user(index, chunk)
            sink(index, chunk)

        sampler["on_chunk"] = on_chunk
    shape = latent_shape or config_latent_shape(cfg)
    if schedules and any(schedules):  # one prompt's videos at a time: a batch shares its switch frames
        lat = torch.cat([sample_text_latents(
            model, cfg, context[[i] * videos_per_prompt].float(), null, shape, seed, batch_size=batch_size,
            switches=[(k, emb[None].float().expand(videos_per_prompt, *emb.shape)) for k, emb in schedules[i]],
            **sampler)
            for i in range(len(prompts))])
    else:
        lat = sample_text_latents(model, cfg, context[idx].float(), null, shape, seed, batch_size=batch_size, **sampler)
    if stream_decode:
        videos = sink.videos()
        if len(videos) != len(lat) or sum(sink.latent_frames) != len(sink.batches) * lat.shape[2]:
            raise RuntimeError(f"streamed decode saw {len(videos)} videos of {sum(sink.latent_frames)} latent "
                               f"frames in {len(sink.batches)} batches; sampled {list(lat.shape)}")
    else:
        videos = decode_videos(vae, lat)
    names = [prompts[i] for i in idx.tolist()]
    return write_vbench_videos(out, videos, names, list(range(videos_per_prompt)) * len(prompts), fps=fps, force=force)

"""Streaming VAE decode (`WanVAE.stream()` / `StreamingDecoder`) against the whole-video `WanVAE.decode`, on
TINY randomly initialised diffusers `AutoencoderKLWan`s saved to a folder and loaded the way the pipeline
does (Wan2.1-style, and Wan2.2-style with residual up blocks and output patching); and the text sampling
path (`write_text_samples`) decoding per chunk from the sampler's `on_chunk`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.models.vae import DiffusersInternalsChanged, StreamingDecoder, WanVAE

Z = 4
F = 7  # latent frames -> 1 + 4·6 = 25 pixel frames


def tiny_vae(root: Path, **extra) -> Path:
    """A tiny `AutoencoderKLWan` (3 spatial, 2 temporal up-samplings as Wan's) in `root/vae` + model_index.json."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                     latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0],
                     **extra).save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> WanVAE:
    return WanVAE(tiny_vae(tmp_path_factory.mktemp("wan21")))


@pytest.fixture(scope="module")
def vae22(tmp_path_factory) -> WanVAE:
    """Wan2.2-style: residual up blocks (DupUp3D shortcut, which uses `first_chunk`) and 2x2 output patching."""
    return WanVAE(tiny_vae(tmp_path_factory.mktemp("wan22"), is_residual=True, in_channels=12, out_channels=12,
                           patch_size=2, scale_factor_spatial=16))


def latents(b: int = 2, f: int = F, hw: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, Z, f, hw, hw, generator=torch.Generator().manual_seed(seed))


def stream_decode(dec: StreamingDecoder, z: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    assert sum(sizes) == z.shape[2]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [dec.decode_chunk(z[:, :, s:s + n]) for s, n in zip(starts, sizes)]


@pytest.mark.parametrize("sizes", [[3, 3, 1], [1] * F, [1, 3, 3], [2, 5], [F]], ids=str)
def test_stream_equals_whole_video_decode(vae, sizes):
    z = latents()
    whole = vae.decode(z)
    assert whole.shape == (2, 3, 1 + 4 * (F - 1), 32, 32)
    parts = stream_decode(vae.stream(), z, sizes)
    # first chunk: 1 + 4·(f - 1) pixel frames, later chunks 4·f
    assert [p.shape[2] for p in parts] == [1 + 4 * (sizes[0] - 1)] + [4 * n for n in sizes[1:]]
    got = torch.cat(parts, 2)
    assert got.shape == whole.shape and got.dtype == torch.float32 and got.device.type == "cpu"
    assert (got - whole).abs().max() <= 1e-4


def test_stream_wan22_residual_and_patched(vae22):
    z = latents(b=1, hw=2)
    whole = vae22.decode(z)
    assert whole.shape == (1, 3, 25, 32, 32)
    got = torch.cat(stream_decode(vae22.stream(), z, [3, 3, 1]), 2)
    assert (got - whole).abs().max() <= 1e-4


def test_reset_and_batch_slices(vae):
    z1, z2 = latents(seed=1), latents(seed=2)
    dec = vae.stream()
    stream_decode(dec, z1, [3, 4])
    dec.reset()
    second = torch.cat(stream_decode(dec, z2, [3, 3, 1]), 2)
    fresh = torch.cat(stream_decode(vae.stream(), z2, [3, 3, 1]), 2)
    assert torch.equal(second, fresh)
    assert len(dec.times) == 5 and all(t > 0 for t in dec.times) and dec.last_seconds == dec.times[-1]
    # one video per decoder call (own cache per slice): same frames
    sliced = torch.cat(stream_decode(vae.stream(batch_size=1), z2, [3, 3, 1]), 2)
    assert (sliced - fresh).abs().max() <= 1e-5
    # interleaving the VAE's own decode (which clears diffusers' cache) does not disturb a stream
    dec.reset()
    a = dec.decode_chunk(z2[:, :, :3])
    vae.decode(z1)
    b = dec.decode_chunk(z2[:, :, 3:])
    assert torch.equal(torch.cat([a, b], 2), fresh)
    with pytest.raises(ValueError, match="reset"):
        dec.decode_chunk(z2[:1, :, :1])


def test_submit_equals_decode_chunk(vae):
    """`submit` (the overlapping decoder's entry point) off CUDA decodes at once: its frames are `decode_chunk`'s,
    ready at once, timed as `decode_chunk` times them."""
    z = latents()
    ref = stream_decode(vae.stream(), z, [3, 4])
    dec = vae.stream(overlap=True)  # (no CUDA: no stream of its own)
    assert dec.side is None
    pending = [dec.submit(z[:, :, :3]), dec.submit(z[:, :, 3:])]
    assert all(p.ready() for p in pending)
    assert all(torch.equal(p.result(), r) for p, r in zip(pending, ref)) and len(dec.times) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_overlapped_decode_on_cuda_equals_sequential(tmp_path):
    """On CUDA, `overlap=True` decodes on a stream of its own while the current stream works on (and even overwrites
    the latents it was given): the same frames as the sequential decoder, each chunk's decode timed on its stream."""
    wan = WanVAE(tiny_vae(tmp_path), device="cuda")
    z = latents(hw=8).cuda()
    ref = torch.cat(stream_decode(wan.stream(), z, [3, 3, 1]), 2)
    dec = wan.stream(overlap=True)
    assert dec.side is not None
    work = torch.randn(2048, 2048, device="cuda")
    pending = []
    for s, n in ((0, 3), (3, 3), (6, 1)):
        chunk = z[:, :, s:s + n].clone()
        pending.append(dec.submit(chunk))
        chunk.zero_()  # the caller's tensor, reused at once: the decode must have taken its own copy
        for _ in range(20):  # the next chunk's "denoising", queued on the current stream meanwhile
            work = torch.tanh(work @ work) * 0.5
    frames = [p.result() for p in pending]
    assert all(f.is_pinned() for f in frames)
    got = torch.cat(frames, 2)
    assert (got - ref).abs().max() <= 1e-5
    assert len(dec.times) == 3 and all(t > 0 for t in dec.times)


def test_changed_diffusers_internals_fail_loudly(vae, monkeypatch):
    """Simulated diffusers changes: a decoder walking its cache differently, one giving another number of
    frames per latent frame, one without the cache arguments: clear errors, not wrong frames."""
    real = type(vae.vae.decoder).forward

    def walks_differently(self, x, feat_cache=None, feat_idx=[0], first_chunk=False):
        out = real(self, x, feat_cache=feat_cache, feat_idx=feat_idx, first_chunk=first_chunk)
        feat_idx[0] += 0 if first_chunk else 1
        return out

    def one_frame_each(self, x, feat_cache=None, feat_idx=[0], first_chunk=False):
        return real(self, x, feat_cache=feat_cache, feat_idx=feat_idx, first_chunk=first_chunk)[:, :, :1]

    monkeypatch.setattr(type(vae.vae.decoder), "forward", walks_differently)
    with pytest.raises(DiffusersInternalsChanged, match="cache slots"):
        vae.stream().decode_chunk(latents(f=2))
    monkeypatch.setattr(type(vae.vae.decoder), "forward", one_frame_each)
    with pytest.raises(DiffusersInternalsChanged, match="expected 4 frames"):
        vae.stream().decode_chunk(latents(f=2))
    monkeypatch.setattr(type(vae.vae.decoder), "forward", lambda self, x: x)
    with pytest.raises(DiffusersInternalsChanged, match="feat_cache"):
        vae.stream()


def test_text_samples_decoded_per_chunk_equal_whole_video(vae, tmp_path, monkeypatch):
    """`write_text_samples` decodes each chunk from the sampler's `on_chunk` (several batches, chunk index
    restarting at 0 in each, as the samplers do) and writes the same MP4s as decoding finished videos."""
    import imageio.v3 as iio

    from pipeline.evaluation import vbench

    fpc, n, bs = 2, 3, 2
    lat = latents(b=n, f=6, seed=3)
    seen = []

    def fake_sampler(model, cfg, context, null, shape, seed, batch_size=8, on_chunk=None, **kw):
        assert shape == (Z, 6, 4, 4) and len(context) == n
        for i in range(0, n, batch_size):
            for c in range(6 // fpc if on_chunk else 0):
                on_chunk(c, lat[i:i + batch_size, :, c * fpc:(c + 1) * fpc])
        return lat

    monkeypatch.setattr(vbench, "sample_text_latents", fake_sampler)
    prompts, context = ["a cat", "a dog", "a red square"], torch.zeros(3, 2, 8)
    frames_seen = []
    sink = vbench.ChunkDecodeSink(vae, on_frames=lambda i, fr: frames_seen.append((i, tuple(fr.shape))))
    paths = vbench.write_text_samples(None, None, prompts, context, None, vae, tmp_path / "stream", 1, (Z, 6, 4, 4),
                                      batch_size=bs, sink=sink, on_chunk=lambda i, c: seen.append(i))
    assert seen == [0, 1, 2, 0, 1, 2]  # the caller's own on_chunk still runs
    assert frames_seen == [(0, (2, 5, 3, 32, 32)), (1, (2, 8, 3, 32, 32)), (2, (2, 8, 3, 32, 32)),
                           (0, (1, 5, 3, 32, 32)), (1, (1, 8, 3, 32, 32)), (2, (1, 8, 3, 32, 32))]
    assert len(sink.times) == 6 and all(t > 0 for t in sink.times)
    whole = vbench.decode_videos(vae, lat)
    assert (sink.videos() - whole).abs().max() <= 1e-4
    ref = vbench.write_text_samples(None, None, prompts, context, None, vae, tmp_path / "whole", 1, (Z, 6, 4, 4),
                                    batch_size=bs, stream_decode=False)
    for p, q in zip(paths, ref):
        assert p.name == q.name and (iio.imread(p) == iio.imread(q)).all()


def test_overlapping_sink_hands_each_chunk_over_when_the_next_arrives(vae, tmp_path, monkeypatch):
    """`ChunkDecodeSink(overlap=True)` (`sample --overlap-decode`): each chunk's decode is started as it arrives and its
    frames are delivered when the next chunk arrives (the sampler has queued that one by then), a batch's last chunk
    when the next batch starts or by `videos()`; the videos are the sequential sink's. The order is checked with a
    decoder that starts each decode at once (a CPU has no second CUDA stream)."""
    from pipeline.evaluation import vbench
    from pipeline.models.vae import PendingFrames

    class Overlapping(StreamingDecoder):
        def __init__(self, *a, overlap=False, **kw):
            super().__init__(*a, **kw)
            self.side = "side" if overlap else None

        def submit(self, latents):  # the sequential decode (timed as it times it), started at once
            side, self.side = self.side, None
            try:
                return PendingFrames(self.decode_chunk(latents))
            finally:
                self.side = side

    fpc, n, bs = 2, 3, 2
    lat = latents(b=n, f=6, seed=3)

    def fake_sampler(model, cfg, context, null, shape, seed, batch_size=8, on_chunk=None, **kw):
        for i in range(0, n, batch_size):
            for c in range(6 // fpc):
                on_chunk(c, lat[i:i + batch_size, :, c * fpc:(c + 1) * fpc])
        return lat

    monkeypatch.setattr(vbench, "sample_text_latents", fake_sampler)
    monkeypatch.setattr("pipeline.models.vae.StreamingDecoder", Overlapping)
    prompts, context = ["a cat", "a dog", "a red square"], torch.zeros(3, 2, 8)
    events, sinks = [], {}
    for overlap in (False, True):
        events.clear()
        sinks[overlap] = vbench.ChunkDecodeSink(vae, on_frames=lambda i, fr: events.append(f"frames{i}"),
                                                overlap=overlap)
        vbench.write_text_samples(None, None, prompts, context, None, vae, tmp_path / str(overlap), 1, (Z, 6, 4, 4),
                                  batch_size=bs, sink=sinks[overlap], on_chunk=lambda i, c: events.append(f"chunk{i}"))
    assert events == ["chunk0", "chunk1", "frames0", "chunk2", "frames1",  # batch 1
                      "chunk0", "frames2", "chunk1", "frames0", "chunk2", "frames1", "frames2"]  # batch 2, then videos()
    assert torch.equal(sinks[True].videos(), sinks[False].videos()) and len(sinks[True].times) == 6

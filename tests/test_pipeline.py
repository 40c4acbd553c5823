"""`CausalWanPipeline` and `convert --to pipeline`: a folder diffusers loads offline with every weight in place;
`__call__` gives `sample`'s frames bit for bit (text: tiny random UMT5, VAE and transformer; sprites: a trained
tiny student, same scores); `stream()` hands over each chunk before the next chunk's network calls and its
chunks joined equal `__call__`; bad folders and calls are one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import call, one_error
from pipeline.data.sprites import balanced_labels
from pipeline.pipelines import CausalWanPipeline, PipelineError
from stages import convert, sample
from tests.test_wan_path import wan_cfg, wan_folder  # noqa: F401 (the tiny UMT5 + tokenizer + VAE folder)


def to_unit(videos: torch.Tensor) -> torch.Tensor:
    """`sample`'s videos `[N, T, 3, H, W]` in [-1, 1] as the pipeline's `output_type="pt"` (diffusers' own
    postprocessing: `[N, T, 3, H, W]` in [0, 1])."""
    from diffusers.video_processor import VideoProcessor

    return VideoProcessor(vae_scale_factor=1).postprocess_video(videos.permute(0, 2, 1, 3, 4), output_type="pt")


@pytest.fixture(scope="module")
def text_student(wan_folder, tmp_path_factory) -> Path:  # noqa: F811
    """A tiny random text-conditioned student (latents [4, 6, 4, 4], chunks of 3 frames, 2 denoising steps) as a
    diffusers folder with its sampling record, as `convert --to diffusers` writes one."""
    from conftest import make_tiny_model
    from pipeline.models.loading import save_model
    from pipeline.models.sampling_meta import sampling_settings

    root = tmp_path_factory.mktemp("text_student")
    cfg = wan_cfg(root, wan_folder, "student.denoising_steps=[1000,500]", "student.max_context_frames=3",
                  "model.prediction=x0", "student.clip_x0=2.0", kind="prompts")
    model = make_tiny_model(in_channels=4, out_channels=4, text_dim=16)
    return save_model(model, root / "student", sampling_settings(cfg, "student", "x0"))


@pytest.fixture(scope="module")
def text_pipe(text_student, wan_folder, tmp_path_factory):  # noqa: F811
    dest = tmp_path_factory.mktemp("text_pipe") / "pipe"
    assert convert.main([str(text_student), str(dest), "--to", "pipeline", "--components", str(wan_folder)]) == 0
    return dest


def test_text_pipeline_folder_loads_every_weight(text_pipe, text_student, wan_folder):  # noqa: F811
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    index = json.loads((text_pipe / "model_index.json").read_text())
    assert index["_class_name"] == "CausalWanPipeline" and index["class_prompts"] == [None, None]
    assert index["transformer"] == ["pipeline.models.causal_wan", "CausalWanTransformer"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"] and index["text_encoder"][1] == "UMT5EncoderModel"
    for sub in ("transformer", "scheduler", "vae", "text_encoder", "tokenizer"):
        assert (text_pipe / sub).is_dir() and not (text_pipe / sub).is_symlink(), sub  # copied, not linked
    pipe = CausalWanPipeline.from_pretrained(text_pipe)
    # no missing or unexpected keys: every component's state dict is its source's, key for key, bit for bit
    for got, ref in ((pipe.transformer, load_file(str(text_student / "diffusion_pytorch_model.safetensors"))),
                     (pipe.vae, AutoencoderKLWan.from_pretrained(wan_folder / "vae").state_dict()),
                     (pipe.text_encoder, UMT5EncoderModel.from_pretrained(wan_folder / "text_encoder",  # as sample
                                                                          dtype=torch.bfloat16).state_dict())):
        sd = got.state_dict()
        assert sorted(sd) == sorted(ref)
        assert all(sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]) for k in ref)
    assert pipe.text_encoder.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32  # the run's dtypes (defaults)
    assert pipe.scheduler.config.denoising_steps == [1000, 500] and pipe.scheduler.config.max_context_frames == 3


def test_text_call_equals_sample_and_stream_equals_call(text_pipe, text_student, wan_folder, tmp_path, monkeypatch):  # noqa: F811
    from pipeline.evaluation import vbench

    prompts = ["a red square moves left", "a dog jumps"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    written = []
    orig = vbench.write_vbench_videos
    monkeypatch.setattr(vbench, "write_vbench_videos", lambda out, videos, *a, **kw: written.append(videos)
                        or orig(out, videos, *a, **kw))
    assert sample.main([str(text_student), "--prompts", str(tmp_path / "p.txt"), "--vbench-dir", str(tmp_path / "vb"),
                        "--per-prompt", "2", "--seed", "5", "--vae", str(wan_folder),
                        "--text-encoder", str(wan_folder)]) == 0
    (ref,) = written  # [4, 21, 3, 32, 32]: 6 latent frames -> 21 pixel frames
    pipe = CausalWanPipeline.from_pretrained(text_pipe)
    out = pipe(prompts, num_videos_per_prompt=2, generator=torch.Generator().manual_seed(5), output_type="pt").frames
    assert out.shape == (4, 21, 3, 32, 32)
    assert torch.equal(out, to_unit(ref))

    # stream: each chunk is handed over before the next chunk's first network call
    events = []
    hooks = [pipe.transformer.register_forward_pre_hook(lambda *_: events.append("net")),
             pipe.vae.decoder.register_forward_pre_hook(lambda *_: events.append("vae"))]
    try:
        parts = []
        for part in pipe.stream(prompts, num_videos_per_prompt=2, generator=torch.Generator().manual_seed(5),
                                output_type="pt"):
            events.append("chunk")
            parts.append(part)
    finally:
        for h in hooks:
            h.remove()
    # 2 denoising steps per chunk (the cache write fused into the next chunk's first call), then 4 videos x 3 latent
    # frames through the decoder, then the chunk is ours: all before the next chunk's first network call
    assert events == ["net"] * 2 + ["vae"] * 12 + ["chunk"] + ["net"] * 2 + ["vae"] * 12 + ["chunk"]
    assert [p.shape[1] for p in parts] == [9, 12]  # 1 + 4·2 pixel frames, then 4·3
    assert torch.equal(torch.cat(parts, dim=1), out)

    # overlap_decode: a chunk's decode is started as it is finished, and its frames are handed over once the next
    # chunk's network calls are queued (on CUDA the two then run side by side; here the order of that work, with a
    # decoder that starts each decode at once, as a CPU has no second stream)
    from pipeline.models.vae import PendingFrames, StreamingDecoder

    class Overlapping(StreamingDecoder):
        def __init__(self, *a, overlap=False, **kw):
            super().__init__(*a, **kw)
            self.side = "side" if overlap else None

        def submit(self, latents):
            return PendingFrames(self._decode(latents).float().cpu().clamp(-1, 1))

    monkeypatch.setattr("pipeline.models.vae.StreamingDecoder", Overlapping)
    events.clear()
    hooks = [pipe.transformer.register_forward_pre_hook(lambda *_: events.append("net")),
             pipe.vae.decoder.register_forward_pre_hook(lambda *_: events.append("vae"))]
    try:
        parts = []
        for part in pipe.stream(prompts, num_videos_per_prompt=2, generator=torch.Generator().manual_seed(5),
                                output_type="pt", overlap_decode=True):
            events.append("chunk")
            parts.append(part)
    finally:
        for h in hooks:
            h.remove()
    assert events == ["net"] * 2 + ["vae"] * 12 + ["net"] * 2 + ["vae"] * 12 + ["chunk"] * 2
    assert torch.equal(torch.cat(parts, dim=1), out)
    monkeypatch.setattr("pipeline.models.vae.StreamingDecoder", StreamingDecoder)
    # the pipeline folder is also a SOURCE for `sample`, whose VAE and text encoder then default to its own
    written.clear()
    assert sample.main([str(text_pipe), "--prompts", str(tmp_path / "p.txt"), "--vbench-dir", str(tmp_path / "vb2"),
                        "--per-prompt", "2", "--seed", "5"]) == 0
    assert torch.equal(written[0], ref)
    # --overlap-decode (on a CPU VAE: no second stream, the decode runs as before): the same videos
    written.clear()
    assert sample.main([str(text_pipe), "--prompts", str(tmp_path / "p.txt"), "--vbench-dir", str(tmp_path / "vb4"),
                        "--per-prompt", "2", "--seed", "5", "--overlap-decode"]) == 0
    assert torch.equal(written[0], ref)
    # the static cache with its repeated calls compiled (`--kv-cache static --compile`): the same videos
    written.clear()
    assert sample.main([str(text_pipe), "--prompts", str(tmp_path / "p.txt"), "--vbench-dir", str(tmp_path / "vb3"),
                        "--per-prompt", "2", "--seed", "5", "--kv-cache", "static", "--compile"]) == 0
    torch.testing.assert_close(written[0], ref, atol=1e-4, rtol=0)
    # other output types are the same frames
    np_frames = pipe(prompts, num_videos_per_prompt=2, generator=torch.Generator().manual_seed(5)).frames
    assert np_frames.shape == (4, 21, 32, 32, 3) and torch.equal(torch.from_numpy(np_frames), out.permute(0, 1, 3, 4, 2))


def test_text_prompt_switch_equals_sample(text_pipe, text_student, wan_folder, tmp_path, monkeypatch):  # noqa: F811
    from pipeline.evaluation import vbench

    line = "a red square || 3: a dog jumps left"
    (tmp_path / "p.txt").write_text(line + "\n")
    written = []
    orig = vbench.write_vbench_videos
    monkeypatch.setattr(vbench, "write_vbench_videos", lambda out, videos, *a, **kw: written.append(videos)
                        or orig(out, videos, *a, **kw))
    assert sample.main([str(text_student), "--prompts", str(tmp_path / "p.txt"), "--vbench-dir", str(tmp_path / "vb"),
                        "--per-prompt", "2", "--seed", "1", "--recache", "--vae", str(wan_folder),
                        "--text-encoder", str(wan_folder)]) == 0
    pipe = CausalWanPipeline.from_pretrained(text_pipe)
    out = pipe(line, num_videos_per_prompt=2, generator=torch.Generator().manual_seed(1), output_type="pt",
               recache=True).frames
    assert torch.equal(out, to_unit(written[0]))
    plain = pipe("a red square", num_videos_per_prompt=2, generator=torch.Generator().manual_seed(1),
                 output_type="pt").frames
    assert torch.equal(out[:, :9], plain[:, :9]) and not torch.equal(out[:, 9:], plain[:, 9:])  # switched at chunk 2


def test_link_components(text_student, wan_folder, tmp_path, capsys):  # noqa: F811
    rc, err = call(capsys, convert.main, text_student, tmp_path / "pipe", "--to", "pipeline", "--components",
                   wan_folder, "--link")
    assert rc == 0, err
    for sub in ("vae", "text_encoder", "tokenizer"):
        assert (tmp_path / "pipe" / sub).is_symlink() and (tmp_path / "pipe" / sub).resolve() == (wan_folder / sub)
    CausalWanPipeline.from_pretrained(tmp_path / "pipe")


def test_sprites_student_streams_like_sample_and_scores_the_same(student_stage, tmp_path, capsys):
    from pipeline.evaluation.checker import score

    cfg, stage = student_stage
    rc, err = call(capsys, convert.main, stage, tmp_path / "pipe", "--to", "pipeline", "--ema")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == ["class_prompts", "model_index.json", "scheduler",
                                                                    "transformer"]
    assert sample.main([str(stage), "--out", str(tmp_path / "s.safetensors"), "--n", "12", "--seed", "7",
                        "--frames", "12"]) == 0
    ref = load_file(str(tmp_path / "s.safetensors"))
    pipe = CausalWanPipeline.from_pretrained(tmp_path / "pipe")
    labels = balanced_labels(12)
    parts = list(pipe.stream(class_labels=labels, num_frames=12, generator=torch.Generator().manual_seed(7),
                             output_type="pt"))
    assert len(parts) == 12 // cfg.data.frames_per_chunk  # rolled past the 6-frame training length
    frames = torch.cat(parts, dim=1)
    assert torch.equal(frames, to_unit(ref["videos"]))
    videos = frames * 2 - 1  # back to [-1, 1] for the checker
    got, want = score(videos, labels), score(ref["videos"], ref["labels"])
    assert json.dumps(got, sort_keys=True, default=str) == json.dumps(want, sort_keys=True, default=str)
    # save_pretrained round trip: the same components, the same frames, the record kept
    pipe.save_pretrained(tmp_path / "saved")
    again = CausalWanPipeline.from_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "transformer" / "sampling.json").read_text())["role"] == "student"
    assert torch.equal(again(class_labels=labels, num_frames=12, generator=torch.Generator().manual_seed(7),
                             output_type="pt").frames, frames)
    # the pipeline folder is also a SOURCE for `sample` (its class table read from class_prompts/)
    assert sample.main([str(tmp_path / "pipe"), "--out", str(tmp_path / "p.safetensors"), "--n", "12", "--seed", "7",
                        "--frames", "12"]) == 0
    assert torch.equal(load_file(str(tmp_path / "p.safetensors"))["videos"], ref["videos"])


def test_sprites_class_schedule_equals_sample_switch(student_stage, tmp_path):
    _, stage = student_stage
    assert convert.main([str(stage), str(tmp_path / "pipe"), "--to", "pipeline", "--ema"]) == 0
    assert sample.main([str(stage), "--out", str(tmp_path / "s.safetensors"), "--n", "6", "--seed", "2",
                        "--switch-at", "3", "--recache"]) == 0
    ref = load_file(str(tmp_path / "s.safetensors"))
    pipe = CausalWanPipeline.from_pretrained(tmp_path / "pipe")
    out = pipe(class_labels=ref["schedule"], generator=torch.Generator().manual_seed(2), output_type="pt",
               recache=True).frames
    assert torch.equal(out, to_unit(ref["videos"]))


def test_bad_folders_and_sources_are_one_line_errors(student_stage, trained_stage, text_pipe, text_student,  # noqa: F811
                                                     tmp_path, capsys):
    _, stage = student_stage
    _, teacher = trained_stage
    with pytest.raises(PipelineError, match="no model_index.json"):
        CausalWanPipeline.from_pretrained(text_student)  # a transformer folder, not a pipeline
    with pytest.raises(PipelineError, match="no such folder"):
        CausalWanPipeline.from_pretrained(tmp_path / "nope")
    from diffusers import WanTransformer3DModel
    loaded = CausalWanPipeline.from_pretrained(text_pipe)
    with pytest.raises(PipelineError, match="must be a CausalWanTransformer"):
        CausalWanPipeline(**{**loaded.components, "transformer": WanTransformer3DModel.from_config(loaded.transformer.config)})
    broken = tmp_path / "broken"
    shutil.copytree(text_pipe, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(PipelineError, match=r"component 'vae' is listed in model_index.json but .*vae/ is missing"):
        CausalWanPipeline.from_pretrained(broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "vae": [None, None]}))
    with pytest.raises(PipelineError, match="missing component.*vae"):
        CausalWanPipeline.from_pretrained(broken)  # unlisted: a text model then lacks its VAE
    # a teacher where a student is needed: convert refuses it, and so does loading a folder holding one
    rc, err = call(capsys, convert.main, teacher, tmp_path / "t", "--to", "pipeline")
    one_error(rc, err, "is a teacher", "--to pipeline needs a few-step student")
    assert not (tmp_path / "t").exists()
    teacher_pipe = tmp_path / "teacher_pipe"
    assert convert.main([str(stage), str(teacher_pipe), "--to", "pipeline"]) == 0
    record = json.loads((teacher_pipe / "transformer" / "sampling.json").read_text())
    (teacher_pipe / "transformer" / "sampling.json").write_text(json.dumps({**record, "role": "teacher"}))
    with pytest.raises(PipelineError, match="transformer is a teacher"):
        CausalWanPipeline.from_pretrained(teacher_pipe)
    # ... and the reverse: the critic (a score model) is not a student
    rc, err = call(capsys, convert.main, stage, tmp_path / "c", "--to", "pipeline", "--part", "critic")
    one_error(rc, err, "--part critic", "not a student")
    # a text model whose source records no components; components for a sprites model
    rc, err = call(capsys, convert.main, text_student, tmp_path / "x", "--to", "pipeline")
    one_error(rc, err, "text model", "--components FOLDER")
    rc, err = call(capsys, convert.main, stage, tmp_path / "y", "--to", "pipeline", "--components", text_student)
    one_error(rc, err, "--components", "sprites model")
    rc, err = call(capsys, convert.main, stage, tmp_path / "z.safetensors", "--to", "wan", "--link")
    one_error(rc, err, "--components and --link apply to --to pipeline")


def test_bad_calls_are_one_line_errors(student_stage, text_pipe, tmp_path):
    _, stage = student_stage
    assert convert.main([str(stage), str(tmp_path / "pipe"), "--to", "pipeline", "--ema"]) == 0
    sprites = CausalWanPipeline.from_pretrained(tmp_path / "pipe")
    text = CausalWanPipeline.from_pretrained(text_pipe)
    cases = [(sprites, dict(prompt="a cat"), "class_labels"),
             (sprites, dict(class_labels=[0, 9]), "class_labels must lie in 0..5"),
             (sprites, dict(class_labels=[0, 1], num_frames=4), "multiple of the chunk"),
             (sprites, dict(class_labels=[0], output_type="gif"), "output_type must be one of"),
             (sprites, dict(class_labels=[0], generator=[torch.Generator()]), "one CPU torch.Generator"),
             (text, dict(), "needs prompt="),
             (text, dict(prompt=["a || 3: b", "c"]), "switch at the same frames"),
             (text, dict(prompt="a", num_frames=20), r"1 \+ a multiple of 4"),
             (text, dict(prompt="a", height=30), "multiple of 8"),
             (text, dict(prompt="a || 6: b"), "switches must be at increasing frames in 1..5")]
    for pipe, kw, needle in cases:
        with pytest.raises(PipelineError, match=needle):
            pipe(**kw)
        with pytest.raises(PipelineError, match=needle):
            pipe.stream(**kw)  # when called, before the first chunk is asked for


def test_readme_example_runs(student_stage, tmp_path, capsys):
    """The README's pipeline example, run as written on a converted tiny student (paths moved to tmp_path)."""
    import imageio.v3 as iio

    from conftest import REPO

    _, stage = student_stage
    assert convert.main([str(stage), str(tmp_path / "pipeline"), "--to", "pipeline", "--ema"]) == 0
    readme = (REPO / "README.md").read_text()
    start = readme.index("# README example: stream the default run's student")
    code = readme[start:readme.index("```", start)].replace("runs/tiny/", f"{tmp_path}/")
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "(6, 48, 16, 16, 3)"
    assert iio.imread(tmp_path / "stream.mp4").shape == (48, 16, 16, 3)


def test_pipeline_stream_benchmark(student_stage, tmp_path, capsys):
    """`benchmarks/pipeline_stream.py` on a tiny student: bit-identical, and both files score the same."""
    from benchmarks import pipeline_stream

    _, stage = student_stage
    capsys.readouterr()
    assert pipeline_stream.main([str(stage), "--n", "6", "--frames", "12", "--seed", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bit-identical frames" in out
    rows = {}
    for line in out.splitlines():
        if line.startswith(("sample {", "pipeline {")):
            name, row = line.split(" ", 1)
            rows.setdefault(name, []).append(json.loads(row))
    assert len(rows["sample"]) == 2 and rows["sample"] == rows["pipeline"]
    assert torch.is_grad_enabled()  # the benchmark leaves the process as it found it (it once switched grad off)

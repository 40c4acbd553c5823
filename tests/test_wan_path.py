"""The real-scale (Wan2.1) data path with TINY randomly initialised components of the real classes —
transformers' UMT5EncoderModel + a fast tokenizer, diffusers' AutoencoderKLWan — built here in a folder laid
out like a diffusers Wan pipeline (nothing is downloaded): prompt encoding (WanPipeline's recipe), the
prompt cache, VAE normalisation, prepare_data (videos and prompts, resumable), PromptSource, the Wan
recipe configs, one-line errors for missing local paths, and prepare_data -> pretrain_teacher ->
init_student -> distill (sf_dmd on prompts) -> sample -> VBench files."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError, load_config
from pipeline.data.sources import LatentSource, PromptSource, build_source, latent_shape
from pipeline.models.text_encoder import TextEncoder
from pipeline.models.vae import WanVAE
from stages import prepare_data
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs" / "wan2.1-t2v-1.3b").glob("*.yaml"))
WORDS = "a red blue green square circle moves left right up down fast slow cat dog runs jumps".split()
L = 12  # max_sequence_length of the tiny encoder (Wan: 512)
D = 16  # UMT5 d_model = model.text_dim
Z = 4  # VAE z_dim = model.in_channels


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    """A tiny diffusers-Wan-pipeline-like folder: text_encoder/, tokenizer/, vae/ (+ model_index.json)."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("wan") / "Wan-tiny-Diffusers"
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])  # as T5: EOS
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=D, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                relative_attention_num_buckets=8)).save_pretrained(root / "text_encoder")
    # 3 spatial downsamplings (8x) and 2 temporal (4x) as Wan's, at base_dim 8 (~0.2M parameters).
    AutoencoderKLWan(base_dim=8, z_dim=Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                     latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]).save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root


def write_videos(folder: Path, n: int = 3, frames: int = 22) -> list[str]:
    """`n` small videos (mp4 and gif alternately, 40x48, not the target size) with same-named captions."""
    import imageio.v2 as iio2
    import imageio.v3 as iio

    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    captions = []
    for i in range(n):
        base = np.linspace(0, 255, 48, dtype=np.float32)[None, None, :, None]
        vid = np.clip(base + g.normal(0, 20, (frames, 40, 48, 3)) + 10 * np.arange(frames)[:, None, None, None],
                      0, 255).astype(np.uint8)
        name = f"clip{i}"
        if i % 2:
            iio.imwrite(folder / f"{name}.gif", vid, duration=60, loop=0)
        else:
            iio2.mimwrite(folder / f"{name}.mp4", list(vid), fps=8, macro_block_size=8)
        captions.append(f"a {['red', 'blue', 'green'][i % 3]} square moves {['left', 'right'][i % 2]}")
        (folder / f"{name}.txt").write_text(captions[-1] + "\n")
    return captions


def wan_cfg(tmp_path: Path, wan_folder: Path, *extra, kind: str = "latents"):
    """A tiny config of the Wan path: 32x32 pixels, 21 pixel frames -> latents [4, 6, 4, 4]."""
    return load_config(None, [
        *TINY_OVERRIDES, f"run.dir={tmp_path / 'run'}", "model.patch_size=[1,2,2]", f"model.in_channels={Z}",
        f"model.out_channels={Z}", f"model.text_dim={D}", f"data.kind={kind}", "data.size=4", "data.latent_size=[4,4]",
        f"data.path={tmp_path / kind}", f"data.videos={tmp_path / 'videos'}", "data.pixel_size=[32,32]",
        "data.pixel_frames=21", f"data.prompts={tmp_path / 'prompts.txt'}", f"components.text_encoder={wan_folder}",
        f"components.vae={wan_folder}", "components.text_encoder_dtype=fp32", f"components.max_sequence_length={L}",
        "components.device=cpu", "prepare_data.shard_size=2", "prepare_data.batch_size=2",
        *(["run.stages=[init_student,distill]"] if kind == "prompts" else []), *extra])


def test_encode_prompts_follows_wan_pipeline(wan_folder):
    from diffusers import WanPipeline

    enc = TextEncoder(wan_folder, dtype="fp32", max_sequence_length=L)
    prompts = ["a red square moves left", "cat  dog\n runs fast &amp; jumps", ""]
    emb = enc.encode_prompts(prompts, batch_size=2)
    assert emb.shape == (3, L, D) and emb.dtype == torch.float32
    # diffusers' own function, called on an object holding our tokenizer and encoder
    fake = types.SimpleNamespace(tokenizer=enc.tokenizer, text_encoder=enc.model)
    ref = WanPipeline._get_t5_prompt_embeds(fake, prompts, max_sequence_length=L, device=torch.device("cpu"),
                                            dtype=torch.float32)
    assert torch.equal(emb, ref)
    # by hand: tokens (EOS included), rows past each prompt exactly zero, the rest the encoder's output
    lens = [5 + 1, 6 + 1, 1]  # "&amp;" is unescaped to "&" (unknown word -> <unk>) by prompt_clean
    ids = enc.tokenizer(["a red square moves left", "cat dog runs fast & jumps", ""], padding="max_length",
                        max_length=L, return_tensors="pt")
    assert ids.attention_mask.sum(1).tolist() == lens
    with torch.no_grad():
        hidden = enc.model(ids.input_ids, ids.attention_mask).last_hidden_state
    for i, n in enumerate(lens):
        assert torch.equal(emb[i, :n], hidden[i, :n])
        assert (emb[i, n:] == 0).all() and (hidden[i, n:] != 0).any()  # zeroed, not the pad outputs
    assert torch.equal(enc.null_embeds(), emb[2:3])  # the empty prompt is the null prompt


def test_separate_component_folders_and_offload(wan_folder):
    enc = TextEncoder(wan_folder / "text_encoder", wan_folder / "tokenizer", dtype="fp32", max_sequence_length=L,
                      offload=True)
    same = TextEncoder(wan_folder, dtype="fp32", max_sequence_length=L, offload=False)
    assert torch.equal(enc.encode_prompts(["a cat"]), same.encode_prompts(["a cat"]))
    assert next(enc.model.parameters()).device.type == "cpu"  # offloaded back after encoding
    assert enc.fingerprint == same.fingerprint


def test_prompt_cache_does_not_reencode(wan_folder, tmp_path):
    enc = TextEncoder(wan_folder, dtype="fp32", max_sequence_length=L)
    prompts = ["a red square", "a blue circle moves up"]
    first = enc.encode_cached(prompts, tmp_path)
    assert enc.calls == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
    assert torch.equal(enc.encode_cached(prompts, tmp_path), first) and enc.calls == 1
    again = TextEncoder(wan_folder, dtype="fp32", max_sequence_length=L)  # a new process, same encoder
    assert torch.equal(again.encode_cached(prompts, tmp_path), first) and again.calls == 0
    enc.encode_cached(prompts[:1], tmp_path)  # other prompts: another file
    assert enc.calls == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2
    longer = TextEncoder(wan_folder, dtype="fp32", max_sequence_length=L + 4)  # another encoder setting: no hit
    assert longer.encode_cached(prompts, tmp_path).shape == (2, L + 4, D) and longer.calls == 1


def test_vae_normalisation_is_wan_pipelines_inverse(wan_folder):
    vae = WanVAE(wan_folder)
    assert (vae.z_dim, vae.scale_temporal, vae.scale_spatial) == (Z, 4, 8) and vae.latent_frames(21) == 6
    x = torch.rand(2, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, Z, 3, 4, 4)
    assert torch.equal(vae.encode(x), z)  # the posterior's mode: deterministic
    with torch.no_grad():
        raw = vae.vae.encode(x).latent_dist.mode()
        cfg = vae.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, Z, 1, 1, 1)
        std_inv = 1.0 / torch.tensor(cfg.latents_std).view(1, Z, 1, 1, 1)
        assert torch.allclose(z / std_inv + mean, raw, atol=1e-5)  # WanPipeline's line before vae.decode
        ref = vae.vae.decode(z / std_inv + mean).sample.clamp(-1, 1)
    video = vae.decode(z)
    assert video.shape == (2, 3, 9, 32, 32) and video.min() >= -1 and video.max() <= 1
    assert torch.allclose(video, ref, atol=1e-5)
    with pytest.raises(ValueError, match="data.pixel_frames"):
        vae.latent_frames(20)


def test_prepare_data_videos_to_latent_shards_resumable(wan_folder, tmp_path, monkeypatch):
    captions = write_videos(tmp_path / "videos")
    cfg = wan_cfg(tmp_path, wan_folder)
    out = prepare_data.run(cfg)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["null_embeds.safetensors", "shard_00000.safetensors",
                                                                 "shard_00001.safetensors"]
    src = LatentSource(out, seed=0)
    assert src.latents.shape == (3, *latent_shape(cfg)) == (3, Z, 6, 4, 4) and src.embeds.shape == (3, L, D)
    enc = TextEncoder(wan_folder, dtype="fp32", max_sequence_length=L)
    assert torch.equal(src.embeds, enc.encode_prompts(captions))  # in sorted-name order, captions from .txt
    assert torch.equal(src.null, enc.null_embeds())
    vae = WanVAE(wan_folder)
    clip = prepare_data.load_video(tmp_path / "videos" / "clip1.gif", (32, 32), 21)
    assert clip.shape == (3, 21, 32, 32) and clip.min() >= -1 and clip.max() <= 1
    assert torch.allclose(src.latents[1], vae.encode(clip[None])[0], atol=1e-5)
    batch = build_source(cfg, seed=0).next_batch(2)
    assert batch["x0"].shape == (2, Z, 6, 4, 4) and batch["context"].shape == (2, L, D)

    # resume: a finished shard is kept (not rewritten), a missing one is written again
    first = out / "shard_00000.safetensors"
    stamp = first.stat().st_mtime_ns
    lost = load_file(str(out / "shard_00001.safetensors"))
    (out / "shard_00001.safetensors").unlink()
    prepare_data.run(cfg)
    assert first.stat().st_mtime_ns == stamp
    assert torch.equal(load_file(str(out / "shard_00001.safetensors"))["latents"], lost["latents"])
    # a finished folder loads no encoder at all
    monkeypatch.setattr("pipeline.models.text_encoder.TextEncoder.__init__", lambda *a, **k: pytest.fail("encoder loaded"))
    monkeypatch.setattr("pipeline.models.vae.WanVAE.__init__", lambda *a, **k: pytest.fail("VAE loaded"))
    prepare_data.run(cfg)
    assert first.stat().st_mtime_ns == stamp
    # a changed caption makes the old shard stale: refused in one line, nothing overwritten
    (tmp_path / "videos" / "clip0.txt").write_text("a dog")
    with pytest.raises(ValueError, match="--force"):
        prepare_data.run(cfg)
    assert first.stat().st_mtime_ns == stamp


def test_prepare_data_prompts_to_prompt_source(wan_folder, tmp_path):
    prompts = ["a red square", "a blue circle moves up", "", "cat runs fast", "a dog jumps left", "green"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    cfg = wan_cfg(tmp_path, wan_folder, kind="prompts")
    out = prepare_data.run(cfg)
    assert len(list(out.glob("shard_*.safetensors"))) == 3  # 5 prompts (the blank line skipped), 2 per shard
    src = build_source(cfg, seed=3)
    assert isinstance(src, PromptSource) and len(src) == 5
    enc = TextEncoder(wan_folder, dtype="fp32", max_sequence_length=L)
    table = enc.encode_prompts([p for p in prompts if p])
    b = src.next_batch(5)
    assert set(b) == {"context", "labels"} and "x0" not in b
    assert b["context"].shape == (5, L, D) and (b["labels"] == -1).all()
    # one shuffled pass covers every prompt once
    assert sorted(b["context"].sum((1, 2)).tolist()) == pytest.approx(sorted(table.sum((1, 2)).tolist()))
    state = src.state_dict()
    nxt = src.next_batch(3)
    again = PromptSource(out, seed=3)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(3)["context"], nxt["context"])
    assert not torch.equal(PromptSource(out, seed=4).next_batch(5)["context"], b["context"])  # seeded order
    assert torch.equal(src.null_context(2), enc.null_embeds().expand(2, L, D))
    assert torch.equal(src.embeds[torch.tensor([4, 0])], table[[4, 0]])  # rows read from the shards on demand
    with pytest.raises(ValueError, match="data.kind=prompts has prompt embeddings only"):
        b["x0"]


def test_prompt_kind_refuses_video_stages(tmp_path, wan_folder):
    with pytest.raises(ConfigError, match="df_dmd"):
        wan_cfg(tmp_path, wan_folder, "distill.method=df_dmd", kind="prompts")
    with pytest.raises(ConfigError, match="pretrain_teacher"):
        wan_cfg(tmp_path, wan_folder, "run.stages=[pretrain_teacher]", kind="prompts")
    with pytest.raises(ConfigError, match="data.kind"):
        load_config(None, ["data.kind=text"])


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_wan_recipe_configs_load(path):
    cfg = load_config(path)
    m = cfg.model
    assert (m.patch_size, m.num_attention_heads, m.attention_head_dim, m.num_layers, m.ffn_dim, m.text_dim,
            m.freq_dim, m.in_channels, m.out_channels) == ([1, 2, 2], 12, 128, 30, 8960, 4096, 256, 16, 16)
    assert latent_shape(cfg) == (16, 21, 60, 104) and cfg.data.frames_per_chunk == 3
    assert cfg.student.denoising_steps == [1000, 750, 500, 250] and cfg.student.shift == 5.0
    assert cfg.run.mixed_precision == "bf16" and cfg.model.pretrained.startswith("/path/to/")
    if cfg.data.kind == "prompts":
        d = cfg.distill
        assert (d.method, d.lr, d.critic_lr, d.betas, d.critic_steps_per_generator_step, d.real_guidance,
                d.ema_decay, d.ema_start, d.gradient_checkpointing) == ("sf_dmd", 2e-6, 4e-7, [0.0, 0.999], 5, 4.0,
                                                                         0.99, 40, True)
    else:
        assert cfg.data.pixel_size == [480, 832] and cfg.data.pixel_frames == 81


def test_missing_local_paths_are_one_line_errors(tmp_path, capsys):
    recipe = REPO / "configs" / "wan2.1-t2v-1.3b"
    (tmp_path / "p.txt").write_text("a cat\n")
    cfg = load_config(recipe / "student.yaml", [f"data.prompts={tmp_path / 'p.txt'}", f"data.path={tmp_path / 'o'}"])
    with pytest.raises(FileNotFoundError, match="components.text_encoder: local path not found: "
                                                "/path/to/Wan2.1-T2V-1.3B-Diffusers"):
        prepare_data.run(cfg)
    assert not (tmp_path / "o").exists()  # nothing written
    assert prepare_data.main([str(recipe / "student.yaml")]) == 2  # the CLI: one line on stderr
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.prompts: local path not found: /path/to/vidprom_filtered_extended.txt" in err
    assert prepare_data.main(["--config", str(recipe / "teacher.yaml")]) == 2
    assert "data.videos: local path not found: /path/to/videos" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="data.path: local path not found: /path/to/wan-prompt-embeds"):
        build_source(load_config(recipe / "student.yaml"), seed=0)
    from stages import init_student, sample
    with pytest.raises(FileNotFoundError, match="model source not found"):
        init_student.run(load_config(recipe / "student.yaml", [f"run.dir={tmp_path / 'r'}"]))
    assert sample.main([str(tmp_path / "nope"), "--prompts", str(tmp_path / "p.txt"), "--vbench-dir",
                        str(tmp_path / "vb")]) == 2
    assert "model source not found" in capsys.readouterr().err


def test_end_to_end_videos_to_vbench(wan_folder, tmp_path):
    """prepare_data (videos and prompts) -> pretrain_teacher on latents -> init_student and sf_dmd distill
    on the prompt source -> sample + VAE decode -> VBench layout."""
    from stages import distill, init_student, pretrain_teacher, sample

    write_videos(tmp_path / "videos", n=4)
    prompts = ["a red square moves left", "a blue circle jumps", "cat runs", "dog moves up fast"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    teacher_cfg = wan_cfg(tmp_path, wan_folder, "model.prediction=x0")
    prepare_data.run(teacher_cfg)
    pretrain_teacher.run(teacher_cfg)
    student_cfg = wan_cfg(tmp_path, wan_folder, "model.prediction=x0", kind="prompts")
    prepare_data.run(student_cfg)
    init_student.run(student_cfg)
    pairs = load_file(str(tmp_path / "run" / "init_student" / "ode_pairs" / "shard_00000.safetensors"))
    assert pairs["states"].shape[2:] == (Z, 6, 4, 4) and pairs["context"].shape[1:] == (L, D)
    stage = distill.run(student_cfg)
    assert json.loads((stage.path / "manifest.json").read_text())["status"] == "done"

    vb = tmp_path / "vbench"
    (tmp_path / "eval_prompts.txt").write_text("a red square\na dog jumps left\n")
    for model, sub in (("distill", "student"), ("pretrain_teacher", "teacher")):
        assert sample.main([str(tmp_path / "run" / model), "--prompts", str(tmp_path / "eval_prompts.txt"),
                            "--vbench-dir", str(vb / sub), "--per-prompt", "2", "--steps", "2"]) == 0
        names = sorted(p.name for p in (vb / sub).glob("*.mp4"))
        assert names == ["a dog jumps left-0.mp4", "a dog jumps left-1.mp4", "a red square-0.mp4", "a red square-1.mp4"]
    import imageio.v3 as iio
    frames = iio.imread(vb / "student" / "a red square-0.mp4")
    assert frames.shape == (21, 32, 32, 3)  # 6 latent frames -> 21 pixel frames, 4x4 latents -> 32x32

    # prompt switching from the prompt file: the switched line's latents follow the first prompt until frame 3
    from pipeline.evaluation import vbench as vb_module
    seen = []
    orig = vb_module.sample_text_latents
    vb_module.sample_text_latents = lambda *a, **kw: seen.append(orig(*a, **kw)) or seen[-1]
    try:
        (tmp_path / "switch.txt").write_text("a red square || 3: a dog jumps left\na red square\n")
        assert sample.main([str(tmp_path / "run" / "distill"), "--prompts", str(tmp_path / "switch.txt"),
                            "--vbench-dir", str(vb / "switch"), "--per-prompt", "2", "--steps", "2", "--recache"]) == 0
    finally:
        vb_module.sample_text_latents = orig
    switched, plain = seen  # each line alone, from the same noise
    assert (vb / "switch" / "a red square || 3: a dog jumps left-1.mp4").is_file()
    assert torch.equal(switched[:, :, :3], plain[:, :, :3]) and not torch.equal(switched[:, :, 3:], plain[:, :, 3:])
    (tmp_path / "far.txt").write_text("a red square || 6: a dog jumps left\n")
    assert sample.main([str(tmp_path / "run" / "distill"), "--prompts", str(tmp_path / "far.txt"),
                        "--vbench-dir", str(vb / "far"), "--steps", "2"]) == 2

    # evaluate on a text run: every model of the run in VBench's layout, resumable per model
    from stages import evaluate
    eval_cfg = wan_cfg(tmp_path, wan_folder, "model.prediction=x0", f"evaluate.prompts={tmp_path / 'eval_prompts.txt'}",
                       "evaluate.videos_per_prompt=1", kind="prompts")
    ev = evaluate.run(eval_cfg)
    for name in ("teacher", "teacher_few_step", "student_init", "student"):
        assert sorted(p.name for p in (ev.path / "vbench" / name).glob("*.mp4")) == ["a dog jumps left-0.mp4",
                                                                                   "a red square-0.mp4"]
    assert json.loads((ev.path / "manifest.json").read_text())["status"] == "done"
    with pytest.raises(ConfigError, match="evaluate.prompts"):
        evaluate.run(wan_cfg(tmp_path, wan_folder, kind="prompts"))

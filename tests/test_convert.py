"""`./launch.sh convert`: round trips are exact, diffusers loads the export, bad input fails cleanly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from conftest import TINY_MODEL_KW, assert_same_weights, make_tiny_model, weights
from pipeline.io.keys import diffusers_to_wan, wan_to_diffusers
from pipeline.io.readers import read_source
from pipeline.io.weights import WAN_HEADS, ConvertError, infer_wan_config
from stages import convert as convert_cli
from stages import sample as sample_cli


def tiny_config_file(tmp_path: Path, **kw) -> Path:
    """A diffusers config.json for the tiny test model (its 12-wide heads cannot be read off shapes)."""
    path = tmp_path / "tiny_config.json"
    path.write_text(json.dumps({**TINY_MODEL_KW, "patch_size": list(TINY_MODEL_KW["patch_size"]), **kw}))
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = convert_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_wan_names_are_the_inverse_of_diffusers_converter():
    sd = make_tiny_model().state_dict()
    wan = diffusers_to_wan(sd)
    # Original Wan names, as in Wan2.1 / Self-Forcing checkpoints.
    for key in ("blocks.0.self_attn.q.weight", "blocks.1.cross_attn.o.bias", "blocks.0.self_attn.norm_q.weight",
                "blocks.0.modulation", "blocks.0.ffn.0.weight", "blocks.0.ffn.2.bias", "head.head.weight",
                "head.modulation", "time_embedding.0.weight", "time_projection.1.bias", "text_embedding.2.weight",
                "patch_embedding.weight"):
        assert key in wan, key
    # diffusers' norm2 (cross-attention norm, with weights) is Wan's norm3.
    assert wan["blocks.0.norm3.weight"] is sd["blocks.0.norm2.weight"]
    assert not any(".norm2." in k for k in wan)
    back = wan_to_diffusers(wan)
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)


def test_key_without_wan_name_is_an_error():
    # A Wan-style name inside a diffusers dict would map back to a different key: refused.
    sd = {**make_tiny_model().state_dict(), "blocks.0.attn2.k_img.weight": torch.zeros(2)}
    with pytest.raises(ConvertError, match=r"no original-Wan name for \['blocks.0.attn2.k_img.weight'\]"):
        diffusers_to_wan(sd)


def test_stage_round_trips_are_exact(student_stage, tmp_path, capsys):
    _, stage = student_stage
    ema, raw = weights(stage, "transformer_ema"), weights(stage, "transformer")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # --ema must matter

    assert run_cli(capsys, stage, tmp_path / "d", "--to", "diffusers", "--ema")[0] == 0
    assert_same_weights(load_file(str(tmp_path / "d" / "diffusion_pytorch_model.safetensors")), ema)
    assert run_cli(capsys, stage, tmp_path / "w.safetensors", "--to", "wan")[0] == 0
    assert "head.head.weight" in load_file(str(tmp_path / "w.safetensors"))
    assert_same_weights(read_source(tmp_path / "w.safetensors").state_dict, raw)
    # wan file -> diffusers folder -> diffusers-named file: still the stage's tensors.
    assert run_cli(capsys, tmp_path / "w.safetensors", tmp_path / "d2", "--to", "diffusers")[0] == 0
    assert run_cli(capsys, tmp_path / "d2", tmp_path / "s.safetensors", "--to", "safetensors")[0] == 0
    assert_same_weights(load_file(str(tmp_path / "s.safetensors")), raw)
    # The model config and the sampling settings survive the trip.
    first, last = read_source(stage), read_source(tmp_path / "s.safetensors")
    assert first.config == last.config and first.sampling == last.sampling
    assert last.sampling["role"] == "student"


def test_sample_from_converted_equals_sample_from_stage(trained_stage, student_stage, tmp_path, capsys):
    for _, stage in (trained_stage, student_stage):
        ref = tmp_path / f"{stage.name}_ref.safetensors"
        args = ["--n", "6", "--frames", "6", "--seed", "3"]
        assert sample_cli.main([str(stage), "--out", str(ref), *args]) == 0
        for to, dest in (("diffusers", tmp_path / f"{stage.name}_d"), ("wan", tmp_path / f"{stage.name}.safetensors")):
            assert run_cli(capsys, stage, dest, "--to", to, "--ema")[0] == 0
            out = tmp_path / f"{stage.name}_{to}.safetensors"
            assert sample_cli.main([str(dest), "--out", str(out), *args]) == 0
            a, b = load_file(str(ref)), load_file(str(out))
            assert torch.equal(a["videos"], b["videos"]) and torch.equal(a["labels"], b["labels"]), (stage, to)
        capsys.readouterr()


@torch.no_grad()
def test_diffusers_loads_export_and_matches_bidirectional_forward(student_stage, tmp_path, capsys):
    _, stage = student_stage
    assert run_cli(capsys, stage, tmp_path / "d", "--to", "diffusers", "--ema")[0] == 0
    theirs, info = WanTransformer3DModel.from_pretrained(tmp_path / "d", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    from pipeline.models.loading import load_source
    ours, _, _ = load_source(stage)
    cfg = ours.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 6, 16, 16, generator=g)
    ctx = torch.randn(2, 2, cfg.text_dim, generator=g)
    t = torch.tensor([120.0, 870.0])
    a = ours(x, t, ctx, attention="bidirectional")
    b = theirs.eval()(x, t, ctx, return_dict=False)[0]
    assert (a - b).abs().max() <= 1e-5


def self_forcing_checkpoint(path: Path) -> dict:
    """A Self-Forcing-style `.pt`: generator / generator_ema / critic, original Wan names, `model.` prefix."""
    parts = {name: make_tiny_model(seed=i).state_dict() for i, name in enumerate(("generator", "generator_ema", "critic"))}
    torch.save({name: {"model." + k: v for k, v in diffusers_to_wan(sd).items()} for name, sd in parts.items()}, path)
    return parts


def test_self_forcing_pt_converts_exactly(tmp_path, capsys):
    parts = self_forcing_checkpoint(tmp_path / "sf.pt")
    config = tiny_config_file(tmp_path)
    for flags, part in (([], "generator"), (["--ema"], "generator_ema"), (["--part", "critic"], "critic")):
        dest = tmp_path / f"{part}_d"
        code, out, err = run_cli(capsys, tmp_path / "sf.pt", dest, "--to", "diffusers", "--model-config", config, *flags)
        assert code == 0, err
        assert f": {part}" in out
        assert_same_weights(load_file(str(dest / "diffusion_pytorch_model.safetensors")), parts[part])
    settings = json.loads((tmp_path / "generator_d" / "sampling.json").read_text())
    assert settings["role"] == "student" and settings["config"]["student"]["shift"] == 5.0
    assert not (tmp_path / "critic_d" / "sampling.json").exists()


def test_pickled_objects_are_refused(tmp_path, capsys):
    torch.save({"generator": {"w": torch.zeros(1)}, "optimizer": Path("x")}, tmp_path / "evil.pt")
    code, _, err = run_cli(capsys, tmp_path / "evil.pt", tmp_path / "d", "--to", "diffusers")
    assert code == 2 and "refused" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_wrong_shapes_name_the_key_and_write_nothing(tmp_path, capsys):
    self_forcing_checkpoint(tmp_path / "sf.pt")
    config = tiny_config_file(tmp_path, ffn_dim=48)
    code, _, err = run_cli(capsys, tmp_path / "sf.pt", tmp_path / "d", "--to", "diffusers", "--model-config", config)
    assert code == 2
    assert "shape mismatch for blocks.0.ffn.net.0.proj.weight" in err and "(32, 24)" in err and "(48, 24)" in err
    assert not any(p.name.startswith(("d", ".d")) for p in tmp_path.iterdir())


def test_existing_dest_needs_force(student_stage, tmp_path, capsys):
    _, stage = student_stage
    dest = tmp_path / "w.safetensors"
    dest.write_text("keep me")
    code, _, err = run_cli(capsys, stage, dest, "--to", "wan")
    assert code == 2 and "exists" in err and dest.read_text() == "keep me"
    assert run_cli(capsys, stage, dest, "--to", "wan", "--force")[0] == 0
    assert_same_weights(read_source(dest).state_dict, weights(stage, "transformer"))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left behind


def test_unknown_sources_fail_in_one_line(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("x")
    (tmp_path / "model.onnx").write_text("x")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    for source, words in (("folder", "not a stage folder"), ("model.onnx", "unknown source"),
                          ("missing", "not found"), ("broken.safetensors", "corrupt")):
        code, _, err = run_cli(capsys, tmp_path / source, tmp_path / "out", "--to", "diffusers")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_accelerate_state_and_dtype(tmp_path, capsys):
    from accelerate import Accelerator

    model = make_tiny_model(seed=5)
    accelerator = Accelerator(cpu=True)
    prepared, opt = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    accelerator.save_state(str(tmp_path / "state"))
    config = tiny_config_file(tmp_path)
    code, _, err = run_cli(capsys, tmp_path / "state", tmp_path / "b.safetensors", "--to", "safetensors",
                           "--model-config", config, "--dtype", "bf16")
    assert code == 0, err
    got = load_file(str(tmp_path / "b.safetensors"))
    assert_same_weights(got, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})


def test_sharded_diffusers_folder_and_inferred_config(tmp_path, capsys, monkeypatch):
    # The head count is read off the width only for Wan's own widths (1536, 3072, 5120): this 128-wide model
    # is made one of them for the test (tests/test_file_inputs.py checks the real widths and the refusal).
    monkeypatch.setitem(WAN_HEADS, 128, 1)
    model = make_tiny_model(num_attention_heads=1, attention_head_dim=128)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    sd = read_source(tmp_path / "sharded").state_dict
    assert_same_weights(sd, model.state_dict())
    inferred = infer_wan_config(sd)
    for key in ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers", "text_dim", "freq_dim",
                "in_channels", "out_channels", "cross_attn_norm", "qk_norm"):
        assert inferred[key] == model.config[key], key
    assert inferred["patch_size"] == list(model.config.patch_size)
    # A bare wan-named file (no metadata) converts with the inferred config.
    from safetensors.torch import save_file
    save_file(diffusers_to_wan(model.state_dict()), str(tmp_path / "bare.safetensors"))
    code, _, err = run_cli(capsys, tmp_path / "bare.safetensors", tmp_path / "d", "--to", "diffusers")
    assert code == 0, err
    theirs, info = WanTransformer3DModel.from_pretrained(tmp_path / "d", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_weights(theirs.state_dict(), model.state_dict())


DEEPSPEED_SAVE = """
import os, sys, torch
sys.path[:0] = [{repo!r}, {tests!r}]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
import deepspeed
from conftest import make_tiny_model
deepspeed.init_distributed(dist_backend="gloo")
model = make_tiny_model(seed=3).train()
config = {{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {{"stage": {stage}}},
          "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-3, "torch_adam": True}}}}}}
engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
engine.save_checkpoint({out!r})
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_checkpoint_is_consolidated(stage, tmp_path, capsys):
    """A ZeRO checkpoint written by DeepSpeed itself (one process, gloo, in a subprocess so that this
    process's torch.distributed stays untouched) converts to the model's own tensors."""
    import subprocess
    import sys

    import socket

    with socket.socket() as sock:  # a free port for the one-process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tests = Path(__file__).parent
    script = DEEPSPEED_SAVE.format(repo=str(tests.parent), tests=str(tests), port=port, stage=stage,
                                   out=str(tmp_path / "ds"))
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "ds" / "latest").is_file()
    code, out, err = run_cli(capsys, tmp_path / "ds", tmp_path / "m.safetensors", "--to", "safetensors",
                             "--model-config", tiny_config_file(tmp_path))
    assert code == 0, err
    assert "DeepSpeed checkpoint" in out
    assert_same_weights(load_file(str(tmp_path / "m.safetensors")), make_tiny_model(seed=3).state_dict())


def test_critic_and_training_checkpoint_sources(distill_stage, tmp_path, capsys):
    _, stage = distill_stage
    assert run_cli(capsys, stage, tmp_path / "critic", "--to", "diffusers", "--part", "critic")[0] == 0
    assert_same_weights(load_file(str(tmp_path / "critic" / "diffusion_pytorch_model.safetensors")),
                        weights(stage, "critic"))
    step = sorted((stage / "checkpoints").glob("step_*"))[-1]
    for flags, name in (([], "model"), (["--ema"], "ema"), (["--part", "critic"], "critic")):
        dest = tmp_path / f"{name}.safetensors"
        code, out, err = run_cli(capsys, step, dest, "--to", "wan", *flags)
        assert code == 0, err
        assert f"training checkpoint {step}: {name}" in out
        assert_same_weights(read_source(dest).state_dict, load_file(str(step / f"{name}.safetensors")))
    assert read_source(tmp_path / "model.safetensors").sampling["role"] == "student"
    assert read_source(tmp_path / "critic.safetensors").sampling["role"] == "teacher"
    code, _, err = run_cli(capsys, stage.parent / "init_student", tmp_path / "x", "--to", "diffusers", "--part", "critic")
    assert code == 2 and "no critic" in err


def test_half_precision_export_samples(student_stage, tmp_path, capsys):
    _, stage = student_stage
    assert run_cli(capsys, stage, tmp_path / "h.safetensors", "--to", "wan", "--dtype", "fp16", "--ema")[0] == 0
    assert all(v.dtype == torch.float16 for v in load_file(str(tmp_path / "h.safetensors")).values())
    from pipeline.models.loading import load_source
    model, _, _ = load_source(tmp_path / "h.safetensors")  # sampled in fp32: the exact upcast
    ema = weights(stage, "transformer_ema")
    assert all(torch.equal(v, ema[k].half().float()) for k, v in model.state_dict().items())
    assert sample_cli.main([str(tmp_path / "h.safetensors"), "--out", str(tmp_path / "s.safetensors"), "--n", "2"]) == 0


def test_sharded_distributed_checkpoint(tmp_path, capsys):
    """FSDP's sharded format (torch.distributed.checkpoint; accelerate writes `{"model": state_dict}`
    into pytorch_model_fsdp_0/), written here by torch itself in one process."""
    import torch.distributed.checkpoint as dcp

    model = make_tiny_model(seed=7)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "state" / "pytorch_model_fsdp_0"),
             no_dist=True)
    code, out, err = run_cli(capsys, tmp_path / "state", tmp_path / "d", "--to", "diffusers",
                             "--model-config", tiny_config_file(tmp_path))
    assert code == 0, err
    assert_same_weights(load_file(str(tmp_path / "d" / "diffusion_pytorch_model.safetensors")), model.state_dict())


def test_sample_streams_from_a_self_forcing_pt(tmp_path, capsys, monkeypatch):
    """`sample` reads a `.pt` directly: a Wan width gives the config, the generator Self-Forcing's
    student settings (few-step sampler, 3 frames per chunk)."""
    monkeypatch.setitem(WAN_HEADS, 128, 1)  # this 128-wide model stands for a Wan width (see above)
    model = make_tiny_model(num_attention_heads=1, attention_head_dim=128)
    torch.save({"generator": {"model." + k: v for k, v in diffusers_to_wan(model.state_dict()).items()}},
               tmp_path / "sf.pt")
    out = tmp_path / "s.safetensors"
    assert sample_cli.main([str(tmp_path / "sf.pt"), "--out", str(out), "--n", "2", "--frames", "6"]) == 0
    assert "4-step student" in capsys.readouterr().out
    assert load_file(str(out))["videos"].shape == (2, 6, 3, 16, 16)

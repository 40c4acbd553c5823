"""`benchmarks/random_recipe.py`: random stand-ins for a recipe's inputs (a stock-Wan-like transformer folder,
prompt-embedding shards) at a tiny shape with Wan's 16 latent channels, and the real recipe
(`configs/wan2.1-t2v-1.3b/student.yaml`) training on them through the launcher, as the GPU check runs it at
full shape; the trainer's device-peak report beside the `--dry-run` estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import random_recipe
from conftest import call, one_error
from pipeline.config import load_config
from pipeline.io.run_dir import read_json
from pipeline.plan import memory_estimate
from stages.launch import main as launch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "wan2.1-t2v-1.3b" / "student.yaml"
# Wan2.1's channels, patch and text layout, at a size that trains in a second
SMALL = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=32)
SHAPE_KEYS = [f"model.{k}={v}" for k, v in SMALL.items()]
RUN_KEYS = [*SHAPE_KEYS, "data.latent_size=[8,8]", "data.frames=6", "components.max_sequence_length=16",
            "distill.steps=2", "distill.grad_accum=1", "run.device=cpu",
            "run.mixed_precision=no"]  # the recipes' bf16: one process keeps accelerate's first choice for all tests


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("random_recipe")
    shape = json.loads((REPO / "configs" / "shapes" / "wan2.1-t2v-1.3b.json").read_text())
    (root / "shape.json").write_text(json.dumps({**shape, **SMALL}))
    assert random_recipe.main([str(root / "out"), "--shape", str(root / "shape.json"), "--prompts", "3",
                               "--seq-len", "16", "--latents", "6", "8", "8"]) == 0
    return root / "out"


def overrides(out: Path, name: str = "overrides.txt") -> list[str]:
    return (out / name).read_text().split()


def test_stand_ins_are_what_prepare_data_and_diffusers_write(stand_ins):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(stand_ins / "Wan-random" / "transformer")
    assert model.config.in_channels == 16 and model.config.num_layers == 2  # the shape file's, Wan's channels
    rows = load_file(stand_ins / "prompt-embeds" / "shard_00000.safetensors")["prompt_embeds"]
    null = load_file(stand_ins / "prompt-embeds" / "null_embeds.safetensors")["prompt_embeds"]
    assert rows.shape == (3, 16, 32) and null.shape == (1, 16, 32)
    used = (rows.float().abs().sum(-1) > 0).sum(-1)
    for r, n in zip(rows, used.tolist()):  # leading tokens, then zero padding as Wan's pipeline pads
        assert 8 <= n <= 16 and (r[:n].abs().sum(-1) > 0).all()
    assert (null[0, 1:] == 0).all() and null[0, 0].abs().sum() > 0  # the empty prompt: one token (EOS)
    videos = load_file(stand_ins / "latents" / "shard_00000.safetensors")
    assert videos["latents"].shape == (3, 16, 6, 8, 8) and torch.equal(videos["prompt_embeds"], rows)
    keys = dict(o.split("=", 1) for o in overrides(stand_ins))
    assert keys["distill.teacher"] == keys["distill.student"] == str(stand_ins / "Wan-random" / "transformer")


def test_recipe_distills_from_stock_wan_folders(stand_ins, capsys, monkeypatch):
    """The SF recipe's distill stage on 16-channel stock folders (no sampling record) as student, real and fake
    score: it trains, and with a device peak (a GPU's) it reports it beside the `--dry-run` estimate."""
    peak = 3 * 2 ** 20  # what max_memory_allocated would say on a GPU
    monkeypatch.setattr("pipeline.training.trainer.device_peak", lambda device: peak)
    argv = [RECIPE, "--stages", "distill", *overrides(stand_ins), *RUN_KEYS]
    capsys.readouterr()
    rc = launch([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    stage = stand_ins / "run" / "distill"
    manifest = read_json(stage / "manifest.json")
    assert manifest["status"] == "done" and manifest["metrics"]["steps"] == 2
    cfg = load_config(RECIPE, [str(a) for a in [*overrides(stand_ins), *RUN_KEYS]])
    est = memory_estimate(cfg, "distill").total
    assert manifest["metrics"]["peak_memory_gib"] == pytest.approx(peak / 2 ** 30)
    assert manifest["metrics"]["memory_estimate_gib"] == pytest.approx(est / 2 ** 30)
    line = next(ln for ln in out.splitlines() if ln.startswith("[distill] peak device memory"))
    assert f"estimate / measured {est / peak:.2f}" in line
    student = load_file(stage / "transformer" / "diffusion_pytorch_model.safetensors")
    start = load_file(stand_ins / "Wan-random" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(student[k], start[k]) for k in start)  # the generator trained


def test_no_peak_line_without_a_device_peak(tmp_path, stand_ins, capsys):
    """On a CPU (no allocator peak) the stage neither prints nor records one."""
    argv = [RECIPE, "--stages", "distill", *overrides(stand_ins), *RUN_KEYS, f"run.dir={tmp_path / 'run'}"]
    capsys.readouterr()
    rc = launch([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "peak device memory" not in out + err
    assert "peak_memory_gib" not in read_json(tmp_path / "run" / "distill" / "manifest.json")["metrics"]


def test_output_rule(tmp_path, stand_ins, capsys):
    shape = REPO / "configs" / "shapes" / "wan2.1-t2v-1.3b.json"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    for argv in ([foreign, "--shape", shape], [foreign, "--shape", shape, "--force"]):
        one_error(*call(capsys, random_recipe.main, *argv), str(foreign))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    one_error(*call(capsys, random_recipe.main, tmp_path / "x", "--shape", tmp_path / "none.json"), "none.json")
    one_error(*call(capsys, random_recipe.main, tmp_path / "x", "--prompts", "0"), "--prompts")
    assert not (tmp_path / "x").exists()


# Which of a recipe's sources come from its own earlier stages (kept), not from the stand-ins.
OWN_STAGES = {"teacher": (), "student": (), "self_forcing": ("distill.student",),
              "causal_forcing": ("init_student.teacher", "distill.student")}


@pytest.mark.parametrize("recipe", sorted(OWN_STAGES))
def test_every_wan_recipe_runs_on_stand_ins_from_anywhere(recipe, stand_ins, tmp_path, capsys, monkeypatch):
    """Each shipped Wan2.1 recipe, all its stages, started outside the checkout (its `${repo:...}` shape files
    still found) on 16-channel stock folders and random data: the recipes that start from stock Wan models run."""
    monkeypatch.chdir(tmp_path)
    path = REPO / "configs" / "wan2.1-t2v-1.3b" / f"{recipe}.yaml"
    cfg = load_config(path)
    videos = "pretrain_teacher" in cfg.run.stages or cfg.distill.method == "df_dmd"
    keys = [k for k in overrides(stand_ins, "overrides-latents.txt" if videos else "overrides.txt")
            if k.split("=")[0] not in OWN_STAGES[recipe]]
    steps = [f"{s}.{k}={v}" for s in ("pretrain_teacher", "init_student", "distill")
             for k, v in (("steps", 2), ("grad_accum", 1))]
    capsys.readouterr()
    rc = launch([str(path), *keys, *RUN_KEYS, *steps, "init_student.ode_pairs=2", f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 0, err
    for stage in cfg.run.stages:
        assert read_json(tmp_path / "run" / stage / "manifest.json")["status"] == "done", stage

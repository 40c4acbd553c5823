"""Inputs that come from files, checked against what they meet (issue [hardening], rules 4 and 6): every
bad one ends with exit code 2, exactly one `error:` line naming the file and the key or shape, no
traceback, and nothing that existed before changed.

- imports say what they assumed: a head count that is in no shape is never guessed (only Wan's own widths
  are known), wrapper segments anywhere in a key are stripped, NaN / inf weights are refused;
- JSON of the wrong shape (`config.json`, `sampling.json`, a sharded index, `--model-config`, safetensors
  metadata, a checkpoint's `meta.json`, a stage's manifest), empty files;
- latent / prompt shards against the model and data settings;
- `sample`'s numeric options.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from conftest import TINY_MODEL_KW, TINY_OVERRIDES, assert_same_weights, make_tiny_model, tiny_cfg
from pipeline.data.sources import LatentSource, PromptSource, build_source
from pipeline.io.keys import diffusers_to_wan, strip_wrappers
from pipeline.io.weights import WAN_HEADS, ConvertError, infer_wan_config
from pipeline.training.checkpoint import latest_checkpoint
from stages import convert as convert_cli
from stages import launch
from stages import sample as sample_cli
from tests.conftest import call, one_error


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def config_file(folder: Path, name: str = "tiny_config.json", **kw) -> Path:
    path = folder / name
    path.write_text(json.dumps({**TINY_MODEL_KW, "patch_size": list(TINY_MODEL_KW["patch_size"]), **kw}))
    return path


# ---- rule 6: the head count is read, never guessed ------------------------------------------------------

def test_a_head_count_not_in_the_weights_is_an_error_not_a_guess(tmp_path, capsys):
    """A 2-head model of width 128 once came out as 1 head (Wan's 128-wide heads assumed): wrong outputs."""
    model = make_tiny_model(num_attention_heads=2, attention_head_dim=64)
    src = tmp_path / "bare.safetensors"
    save_file(diffusers_to_wan(model.state_dict()), str(src))  # no metadata: no config
    torch.save({"generator": {f"model.{k}": v for k, v in diffusers_to_wan(model.state_dict()).items()}},
               tmp_path / "sf.pt")
    for source in (src, tmp_path / "sf.pt"):
        one_error(*call(capsys, convert_cli.main, source, tmp_path / "d", "--to", "diffusers"),
                  str(source), "128-wide", "--model-config")
        one_error(*call(capsys, sample_cli.main, source, "--out", tmp_path / "s.safetensors", "--n", "2"),
                  "128-wide", "--model-config")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.safetensors", "sf.pt"]  # nothing written
    cfg = config_file(tmp_path, num_attention_heads=2, attention_head_dim=64)
    rc, err = call(capsys, convert_cli.main, src, tmp_path / "d", "--to", "diffusers", "--model-config", cfg)
    assert rc == 0, err
    assert json.loads((tmp_path / "d" / "config.json").read_text())["num_attention_heads"] == 2
    assert_same_weights(load_file(str(tmp_path / "d" / "diffusion_pytorch_model.safetensors")), model.state_dict())
    # sample takes --model-config too (a .pt generator: Self-Forcing's 3 frames per chunk)
    rc, err = call(capsys, sample_cli.main, tmp_path / "sf.pt", "--out", tmp_path / "s.safetensors", "--n", "2",
                   "--frames", "3", "--model-config", cfg)
    assert rc == 0, err


@pytest.mark.parametrize("width,heads", sorted(WAN_HEADS.items()))
def test_wan_widths_give_their_head_counts(width, heads):
    """Wan2.1 1.3B (1536: 12 heads), Wan2.2 TI2V-5B (3072: 24), Wan2.1/2.2 14B (5120: 40): 128-wide heads."""
    assert WAN_HEADS == {1536: 12, 3072: 24, 5120: 40}
    with init_empty_weights():  # shapes only: no memory
        model = WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=128, num_layers=1, ffn_dim=64,
                                      in_channels=16, out_channels=16, text_dim=64, freq_dim=32)
    config = infer_wan_config(model.state_dict())
    assert (config["num_attention_heads"], config["attention_head_dim"]) == (heads, 128)
    with init_empty_weights():
        odd = WanTransformer3DModel(num_attention_heads=heads + 1, attention_head_dim=128, num_layers=1, ffn_dim=64,
                                    in_channels=16, out_channels=16, text_dim=64, freq_dim=32)
    with pytest.raises(ConvertError, match=f"{width + 128}-wide model cannot be read.*--model-config"):
        infer_wan_config(odd.state_dict())


# ---- rule 6: wrapper segments anywhere in a key ------------------------------------------------------------

WRAPPED = [  # how each wrapper names a key, anywhere in its path (per-block wrapping puts them mid-key)
    lambda k: "_fsdp_wrapped_module." + re.sub(r"^(blocks\.\d+)\.", r"\1._fsdp_wrapped_module.", k),
    lambda k: re.sub(r"^(blocks\.\d+)\.", r"\1._checkpoint_wrapped_module.", k),
    lambda k: "module._orig_mod." + k,
    lambda k: "model." + re.sub(r"^(blocks\.\d+)\.", r"\1._orig_mod.", k),
]


@pytest.mark.parametrize("wrap", range(len(WRAPPED)), ids=["fsdp", "checkpoint_wrapper", "ddp+compile",
                                                           "self-forcing+compiled-blocks"])
def test_wrapper_segments_anywhere_are_stripped(wrap, tmp_path, capsys):
    model = make_tiny_model(seed=3)
    for names in ("diffusers", "wan"):
        sd = model.state_dict() if names == "diffusers" else diffusers_to_wan(model.state_dict())
        wrapped = {WRAPPED[wrap](k): v for k, v in sd.items()}
        assert list(wrapped) != list(sd)
        assert list(strip_wrappers(wrapped)) == list(sd)
        torch.save(wrapped, tmp_path / f"{names}.pt")
        dest = tmp_path / f"{names}.safetensors"
        rc, err = call(capsys, convert_cli.main, tmp_path / f"{names}.pt", dest, "--to", "safetensors",
                       "--model-config", config_file(tmp_path))
        assert rc == 0, err
        assert_same_weights(load_file(str(dest)), model.state_dict())


def test_keys_that_collide_once_unwrapped_are_refused():
    w = torch.zeros(1)
    with pytest.raises(ConvertError, match=r"keys 'proj_out.weight' and 'module.proj_out.weight' both name"):
        strip_wrappers({"proj_out.weight": w, "module.proj_out.weight": w})


# ---- rule 6: non-finite weights ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_weights_refuse_to_convert_without_the_flag(bad, tmp_path, capsys):
    model = make_tiny_model(seed=4)
    sd = model.state_dict()
    sd["blocks.1.attn1.to_k.weight"][0, 3] = bad
    torch.save(sd, tmp_path / "broken.pt")
    cfg = config_file(tmp_path)
    before = snapshot(tmp_path)
    line = one_error(*call(capsys, convert_cli.main, tmp_path / "broken.pt", tmp_path / "d", "--to", "diffusers",
                           "--model-config", cfg), "broken.pt", "'blocks.1.attn1.to_k.weight'", "--allow-nonfinite")
    assert ("NaN" if bad != bad else "inf") in line
    assert snapshot(tmp_path) == before and not (tmp_path / "d").exists()
    line = one_error(*call(capsys, sample_cli.main, tmp_path / "broken.pt", "--out", tmp_path / "s.safetensors",
                           "--model-config", cfg), "'blocks.1.attn1.to_k.weight'", "outputs NaN")
    assert snapshot(tmp_path) == before
    rc, err = call(capsys, convert_cli.main, tmp_path / "broken.pt", tmp_path / "d", "--to", "diffusers",
                   "--model-config", cfg, "--allow-nonfinite")
    assert rc == 0, err
    got = load_file(str(tmp_path / "d" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(got[k].nan_to_num(), sd[k].nan_to_num()) for k in sd)  # kept as they were


def test_a_cast_that_overflows_is_refused(tmp_path, capsys):
    sd = make_tiny_model(seed=4).state_dict()
    sd["proj_out.bias"][1] = 1e6  # finite in fp32, beyond fp16's 65504
    torch.save(sd, tmp_path / "big.pt")
    one_error(*call(capsys, convert_cli.main, tmp_path / "big.pt", tmp_path / "d.safetensors", "--to", "safetensors",
                    "--model-config", config_file(tmp_path), "--dtype", "fp16"),
              "after --dtype fp16", "'proj_out.bias'", "inf")
    assert not (tmp_path / "d.safetensors").exists()


def test_sampling_a_stage_with_nan_weights_is_refused(trained_stage, tmp_path, capsys):
    _, stage = trained_stage
    copy = tmp_path / "pretrain_teacher"
    shutil.copytree(stage, copy)
    f = copy / "transformer_ema" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["proj_out.weight"][0, 0] = float("nan")
    save_file(sd, str(f))
    before = snapshot(copy)
    one_error(*call(capsys, sample_cli.main, copy, "--out", tmp_path / "s.safetensors", "--n", "2"),
              "'proj_out.weight'", "NaN")
    assert snapshot(copy) == before and not (tmp_path / "s.safetensors").exists()


# ---- rule 4: JSON and files of the wrong shape ---------------------------------------------------------

def _diffusers_folder(tmp_path: Path, sharded: bool = False) -> Path:
    folder = tmp_path / "model"
    make_tiny_model(seed=6).save_pretrained(folder, **({"max_shard_size": "20KB"} if sharded else {}))
    return folder


INDEX = "diffusion_pytorch_model.safetensors.index.json"
FOLDER_ROWS = [  # id, file, its new text, what the line names besides the file
    ("config.json list", "config.json", "[]", "expected a JSON object {...}, got a list"),
    ("config.json not JSON", "config.json", "{num_layers: 2", "not valid JSON"),
    ("config.json empty", "config.json", "", "not valid JSON"),
    ("sampling.json list", "sampling.json", "[1, 2]", "expected {\"role\""),
    ("sampling.json not JSON", "sampling.json", "{", "not valid JSON"),
    ("sampling.json section not an object", "sampling.json", '{"role": "student", "config": {"student": [4]}}',
     "config section 'student' must be an object"),
    ("index without weight_map", INDEX, '{"metadata": {}}', "missing key 'weight_map'"),
    ("index list", INDEX, "[]", "expected a JSON object"),
    ("weight_map a list", INDEX, '{"weight_map": []}', "key 'weight_map' must be a JSON object"),
    ("weight_map pointing outside", INDEX, '{"weight_map": {"proj_out.weight": "../x.safetensors"}}',
     "weight_map['proj_out.weight'] must be a shard file name"),
]


@pytest.mark.parametrize("name,text,needle", [r[1:] for r in FOLDER_ROWS], ids=[r[0] for r in FOLDER_ROWS])
def test_json_files_of_a_folder(name, text, needle, tmp_path, capsys):
    folder = _diffusers_folder(tmp_path, sharded=name == INDEX)
    (folder / name).write_text(text)
    before = snapshot(tmp_path)
    one_error(*call(capsys, convert_cli.main, folder, tmp_path / "d", "--to", "diffusers"), str(folder / name), needle)
    one_error(*call(capsys, sample_cli.main, folder, "--out", tmp_path / "s.safetensors"), str(folder / name), needle)
    assert snapshot(tmp_path) == before and not (tmp_path / "d").exists()


@pytest.mark.parametrize("text,needle", [("[]", "expected a JSON object {...}, got a list"),
                                         ("not json", "not valid JSON"), ("", "not valid JSON"),
                                         ('{"num_attention_heads": "two"}', "'num_attention_heads' must be a positive"),
                                         ('{"num_attention_heads": 0}', "'num_attention_heads' must be a positive")],
                         ids=["list", "not JSON", "empty", "heads a string", "zero heads"])
def test_bad_model_config_file(text, needle, tmp_path, capsys):
    torch.save(make_tiny_model().state_dict(), tmp_path / "m.pt")
    cfg = tmp_path / "c.json"
    cfg.write_text(text)
    for main, args in ((convert_cli.main, [tmp_path / "d", "--to", "diffusers"]),
                       (sample_cli.main, ["--out", tmp_path / "s.safetensors"])):
        one_error(*call(capsys, main, tmp_path / "m.pt", *args, "--model-config", cfg), f"--model-config {cfg}", needle)
    one_error(*call(capsys, convert_cli.main, tmp_path / "m.pt", tmp_path / "d", "--to", "diffusers",
                    "--model-config", tmp_path / "none.json"), "--model-config", "not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "m.pt"]


@pytest.mark.parametrize("key,text,needle", [("config", "{", "not valid JSON"),
                                             ("config", "[1]", "expected a JSON object"),
                                             ("sampling", '"teacher"', "expected {\"role\"")],
                         ids=["config not JSON", "config list", "sampling a string"])
def test_bad_safetensors_metadata(key, text, needle, tmp_path, capsys):
    meta = {"format": "pt", "config": json.dumps({**TINY_MODEL_KW, "patch_size": [1, 2, 2]}), key: text}
    f = tmp_path / "m.safetensors"
    save_file(make_tiny_model().state_dict(), str(f), metadata=meta)
    one_error(*call(capsys, convert_cli.main, f, tmp_path / "d", "--to", "diffusers"), f"{f}: metadata '{key}'", needle)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("name,needle", [("empty.pt", "corrupt checkpoint"), ("empty.pth", "corrupt checkpoint"),
                                         ("empty.safetensors", "corrupt safetensors file")])
def test_empty_weight_files(name, needle, tmp_path, capsys):
    (tmp_path / name).write_bytes(b"")
    for main, args in ((convert_cli.main, [tmp_path / "d", "--to", "diffusers"]),
                       (sample_cli.main, ["--out", tmp_path / "s.safetensors"])):
        one_error(*call(capsys, main, tmp_path / name, *args), needle, str(tmp_path / name))
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_pt_entry_that_is_not_a_state_dict(tmp_path, capsys):
    torch.save({"generator": {"proj_out.weight": torch.zeros(2), "step": 5}}, tmp_path / "x.pt")
    one_error(*call(capsys, convert_cli.main, tmp_path / "x.pt", tmp_path / "d", "--to", "diffusers"),
              "x.pt", "entry 'generator'", "'step' holds a int")


# ---- stage folders as sample sources --------------------------------------------------------------------

@pytest.mark.parametrize("text,needle", [("[]", "expected a JSON object"), ("{", "not valid JSON")])
def test_stage_manifest_of_the_wrong_shape(text, needle, tmp_path, capsys):
    stage = tmp_path / "pretrain_teacher"
    stage.mkdir()
    (stage / "manifest.json").write_text(text)
    one_error(*call(capsys, sample_cli.main, stage, "--out", tmp_path / "s.safetensors"),
              str(stage / "manifest.json"), needle)
    assert not (tmp_path / "s.safetensors").exists()


def test_stage_without_its_class_table(trained_stage, tmp_path, capsys):
    _, stage = trained_stage
    copy = tmp_path / "pretrain_teacher"
    shutil.copytree(stage, copy)
    save_file({"other": torch.zeros(1)}, str(copy / "conditioning.safetensors"))
    one_error(*call(capsys, sample_cli.main, copy, "--out", tmp_path / "s.safetensors"),
              str(copy / "conditioning.safetensors"), "'class_table'")


# ---- training checkpoints: meta.json ---------------------------------------------------------------------

META_ROWS = [  # id, how meta.json is broken, what the line says
    ("empty object", lambda m: {}, "meta.json has no key 'step'"),
    ("a list", lambda m: [m], "meta.json must be a JSON object, got list"),
    ("zero bytes", None, "meta.json unreadable"),
    ("no ema", lambda m: {k: v for k, v in m.items() if k != "ema"}, "meta.json has no key 'ema'"),
    ("step a string", lambda m: {**m, "step": "2"}, "meta.json key 'step' must be an integer, got str"),
    ("optimizer a list", lambda m: {**m, "optimizer": []}, "key 'optimizer' must be an object, got list"),
    ("optimizer without param_groups", lambda m: {**m, "optimizer": {"scalars": {}}}, "needs 'param_groups'"),
    ("ema counters of the wrong type", lambda m: {**m, "ema": {**m["ema"], "decay": "high"}},
     "meta.json key 'ema' does not restore the EMA"),
]


def test_checkpoint_meta_of_the_wrong_shape(tmp_path, capsys, monkeypatch):
    """A teacher run stopped after its step-2 checkpoint; each broken meta.json refuses the resume in one
    line naming the checkpoint and the key, and leaves every file as it was."""
    from stages import pretrain_teacher
    from tests.conftest import Interrupt, crash_after_checkpoint

    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    run = tmp_path / "run"
    args = [str(cfg), "--stages", "pretrain_teacher", *TINY_OVERRIDES, f"run.dir={run}"]
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, pretrain_teacher, 2)
        with pytest.raises(Interrupt):
            launch.main(args)
    ckpt = latest_checkpoint(run / "pretrain_teacher" / "checkpoints")
    good = (ckpt / "meta.json").read_text()
    for _, broken, needle in META_ROWS:
        (ckpt / "meta.json").write_text("" if broken is None else json.dumps(broken(json.loads(good))))
        before = snapshot(run)
        line = one_error(*call(capsys, launch.main, *args), needle)
        assert str(ckpt) in line
        assert snapshot(run) == before, needle


# ---- rule 4: latent and prompt shards against the model and data settings --------------------------------

def _latent_cfg(tmp_path, *extra):
    return tiny_cfg(tmp_path, "data.kind=latents", f"data.path={tmp_path / 'latents'}", "model.in_channels=4",
                    "model.out_channels=4", "data.latent_size=[4,4]", "run.stages=[pretrain_teacher]", *extra)


def _shards(folder: Path, latents=(2, 4, 6, 4, 4), embeds=(2, 5, 16), null=(1, 5, 16), nan=False, name="a"):
    folder.mkdir(exist_ok=True)
    lat = torch.randn(latents)
    if nan:
        lat[1, 0, 0, 0, 0] = float("nan")
    save_file({"latents": lat, "prompt_embeds": torch.randn(embeds)}, str(folder / f"{name}.safetensors"))
    save_file({"prompt_embeds": torch.zeros(null)}, str(folder / "null_embeds.safetensors"))


SHARD_ROWS = [  # id, shard shapes, needle
    ("9 frames, data.frames=6", dict(latents=(2, 4, 9, 4, 4)), "F = 9 but data.frames = 6"),
    ("3 channels, model.in_channels=4", dict(latents=(2, 3, 6, 4, 4)), "C = 3 but model.in_channels = 4"),
    ("latent size", dict(latents=(2, 4, 6, 8, 4)), "H = 8 but data.latent_size (H) = 4"),
    ("4-dim latents", dict(latents=(2, 4, 4, 4)), "latents must be [N, C, F, H, W], got [2, 4, 4, 4]"),
    ("text width", dict(embeds=(2, 5, 8), null=(1, 5, 8)), "are 8 wide, but model.text_dim = 16"),
    ("rows", dict(embeds=(3, 5, 16)), "2 latents but 3 prompt_embeds rows"),
    ("null length", dict(null=(1, 7, 16)), "null_embeds.safetensors: prompt_embeds [1, 7, 16] do not match"),
    ("NaN latents", dict(nan=True), "latents hold NaN or inf (row 1)"),
]


@pytest.mark.parametrize("shapes,needle", [r[1:] for r in SHARD_ROWS], ids=[r[0] for r in SHARD_ROWS])
def test_latent_shards_against_the_config(shapes, needle, tmp_path):
    _shards(tmp_path / "latents", **shapes)
    with pytest.raises(ValueError, match="^" + re.escape(str(tmp_path / "latents"))) as e:
        build_source(_latent_cfg(tmp_path), seed=0)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_matching_latent_shards_load_as_before(tmp_path):
    _shards(tmp_path / "latents")
    src = build_source(_latent_cfg(tmp_path), seed=0)
    assert isinstance(src, LatentSource) and src.next_batch(2)["x0"].shape == (2, 4, 6, 4, 4)


def test_shards_that_disagree_with_each_other(tmp_path):
    folder = tmp_path / "latents"
    _shards(folder)
    _shards(folder, latents=(2, 4, 9, 4, 4), name="b")
    with pytest.raises(ValueError, match=r"b.safetensors: latents \[2, 4, 9, 4, 4\] .*F = 9 but the first shard's F"):
        LatentSource(folder, seed=0)  # no config: the first shard rules
    (folder / "b.safetensors").unlink()
    _shards(folder, embeds=(2, 7, 16), name="b")
    with pytest.raises(ValueError, match="prompt_embeds differ in length"):
        LatentSource(folder, seed=0)


def test_null_embeds_without_their_tensor(tmp_path):
    _shards(tmp_path / "latents")
    save_file({"other": torch.zeros(1)}, str(tmp_path / "latents" / "null_embeds.safetensors"))
    with pytest.raises(ValueError, match=r"null_embeds.safetensors: no 'prompt_embeds' tensor"):
        build_source(_latent_cfg(tmp_path), seed=0)


def test_prompt_shards_against_the_config(tmp_path):
    folder = tmp_path / "latents"
    folder.mkdir()
    save_file({"prompt_embeds": torch.randn(3, 5, 8)}, str(folder / "a.safetensors"))
    save_file({"prompt_embeds": torch.zeros(1, 5, 8)}, str(folder / "null_embeds.safetensors"))
    cfg = tiny_cfg(tmp_path, "data.kind=prompts", f"data.path={folder}", "run.stages=[init_student]")
    with pytest.raises(ValueError, match=r"a.safetensors: prompt_embeds \[3, 5, 8\] are 8 wide, but model.text_dim = 16"):
        build_source(cfg, seed=0)
    save_file({"prompt_embeds": torch.randn(3, 5, 16)}, str(folder / "a.safetensors"))
    save_file({"prompt_embeds": torch.randn(3, 6, 16)}, str(folder / "b.safetensors"))
    save_file({"prompt_embeds": torch.zeros(1, 5, 16)}, str(folder / "null_embeds.safetensors"))
    with pytest.raises(ValueError, match=r"b.safetensors: prompt_embeds \[3, 6, 16\] differ from the earlier"):
        PromptSource(folder, seed=0)


def test_shards_of_the_wrong_shape_stop_the_stage_in_one_line(tmp_path, capsys):
    """End to end: latent shards of 9 frames under `data.frames=6` (once trained on silently)."""
    _shards(tmp_path / "latents", latents=(2, 4, 9, 4, 4))
    before = snapshot(tmp_path / "latents")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    rc, err = call(capsys, launch.main, cfg, "--stages", "pretrain_teacher", *TINY_OVERRIDES,
                   f"run.dir={tmp_path / 'run'}", "data.kind=latents", f"data.path={tmp_path / 'latents'}",
                   "model.in_channels=4", "model.out_channels=4", "data.latent_size=[4,4]")
    one_error(rc, err, str(tmp_path / "latents" / "a.safetensors"), "F = 9 but data.frames = 6")
    assert snapshot(tmp_path / "latents") == before


# ---- sample's numeric options ------------------------------------------------------------------------------

SAMPLE_ROWS = [  # id, options, what the line says
    ("negative frames", ["--frames", "-3"], "--frames must be positive, got -3"),
    ("zero frames", ["--frames", "0"], "--frames must be positive, got 0"),
    ("zero steps", ["--steps", "0"], "--steps must be positive, got 0"),
    ("negative steps", ["--steps", "-2"], "--steps must be positive, got -2"),
    ("NaN guidance", ["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    ("infinite guidance", ["--guidance", "inf"], "--guidance must be a finite number, got inf"),
    ("negative guidance", ["--guidance", "-1"], "--guidance must be >= 0, got -1.0"),
    ("negative lag", ["--lag", "-1"], "--lag must be >= 0, got -1"),
    ("zero videos", ["--n", "0"], "--n must be positive, got 0"),
    ("negative videos", ["--n", "-4"], "--n must be positive, got -4"),
    ("huge seed", ["--seed", "99999999999999999999"], "--seed: need 0 <= --seed <= 4294967295"),
    ("negative seed", ["--seed", "-1"], "--seed: need 0 <= --seed <= 4294967295, got -1"),
]


@pytest.mark.parametrize("extra,needle", [r[1:] for r in SAMPLE_ROWS], ids=[r[0] for r in SAMPLE_ROWS])
def test_sample_numeric_options(extra, needle, trained_stage, tmp_path, capsys):
    _, stage = trained_stage
    out = tmp_path / "s.safetensors"
    line = one_error(*call(capsys, sample_cli.main, stage, "--out", out, *extra), needle)
    assert line == f"error: {needle}" or line.startswith(f"error: {needle}")
    assert list(tmp_path.iterdir()) == []  # checked before anything is read or written


def test_text_sample_numeric_options(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    for extra, needle in ((["--per-prompt", "0"], "--per-prompt must be positive, got 0"),
                          (["--frames", "-3"], "--frames must be positive, got -3"),
                          (["--seed", str(2**64)], "--seed: need 0 <= --seed <= 4294967295")):
        one_error(*call(capsys, sample_cli.main, tmp_path / "model", "--prompts", prompts, "--vbench-dir",
                        tmp_path / "v", *extra), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]

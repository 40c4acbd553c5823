"""One home for sampling metadata: `sampling.json` beside every saved transformer, `config.json` with
constructor arguments only; folders written before (extra keys in `config.json`) load, sample and
convert as before. Also the one dtype table and the one device policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from conftest import assert_same_weights, weights
from pipeline.io.readers import read_source
from pipeline.models.device import DTYPES, dtype_of, resolve_device
from pipeline.models.loading import load_model, load_source, save_model, student_config
from pipeline.models.sampling_meta import (LEGACY_KEYS, SAMPLING_FILE, is_student, read_sampling,
                                           sampling_metadata)
from stages import convert as convert_cli
from stages import sample as sample_cli

CONSTRUCTOR = WanTransformer3DModel._get_init_keys(WanTransformer3DModel) - {"self"}


def stage_folders(path: Path) -> list[Path]:
    return [path / sub for sub in ("transformer", "transformer_ema", "critic") if (path / sub).is_dir()]


def assert_constructor_only(folder: Path):
    config = json.loads((folder / "config.json").read_text())
    ours = {k for k in config if not k.startswith("_")}  # `_class_name`, `_diffusers_version`: diffusers' own
    assert ours <= CONSTRUCTOR, (folder, ours - CONSTRUCTOR)
    assert not set(LEGACY_KEYS) & set(config), folder


def as_legacy(stage: Path, dest: Path, cfg) -> Path:
    """A copy of `stage` as stages wrote it before `sampling.json`: `prediction` (and a student's
    `denoising_steps`, `shift`) as extra keys of each folder's config.json, no sampling.json."""
    shutil.copytree(stage, dest)
    for folder in stage_folders(dest):
        record = json.loads((folder / SAMPLING_FILE).read_text())
        config = json.loads((folder / "config.json").read_text())
        config["prediction"] = cfg.model.prediction
        if record["role"] == "student":
            config.update(student_config(cfg))
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (folder / SAMPLING_FILE).unlink()
    return dest


def without_attention(record: dict | None) -> dict | None:
    """A record as folders written before teachers recorded their attention had it."""
    if record is None:
        return None
    return {**record, "config": {k: v for k, v in record["config"].items() if k != "pretrain_teacher"}}


def test_stage_folders_hold_constructor_config_and_sampling_json(trained_stage, student_stage, distill_stage):
    cfg, _ = trained_stage
    for (_, stage), role in ((trained_stage, "teacher"), (student_stage, "student"), (distill_stage, "student")):
        for folder in stage_folders(stage):
            assert_constructor_only(folder)
            record = json.loads((folder / SAMPLING_FILE).read_text())
            want = "teacher" if folder.name == "critic" else role  # the critic is a copy of the teacher
            assert record["role"] == want, folder
            assert record["config"]["model"]["prediction"] == cfg.model.prediction
            if want == "student":
                assert record["config"]["student"] == student_config(cfg)
            else:
                assert "student" not in record["config"]
                assert record["config"]["pretrain_teacher"] == {"attention": cfg.pretrain_teacher.attention}
            assert WanTransformer3DModel.from_pretrained(folder) is not None  # diffusers reads config.json as is


def test_legacy_stage_folders_load_sample_and_convert_as_before(trained_stage, student_stage, distill_stage,
                                                                tmp_path, capfd):
    cfg, _ = trained_stage
    args = ["--n", "6", "--frames", "6", "--seed", "3"]
    for _, stage in (trained_stage, student_stage, distill_stage):
        old = as_legacy(stage, tmp_path / f"old_{stage.name}", cfg)
        for folder in stage_folders(old):
            # the same record (a teacher's now also says how it attends; the stage's config.yaml said so before)
            assert read_sampling(folder) == without_attention(read_sampling(stage / folder.name)), folder
        # Loaded: the same weights and record, and no diffusers warning about unexpected config keys.
        capfd.readouterr()
        (a, ta, ca), (b, tb, cb) = load_source(stage), load_source(old)
        assert "not expected" not in capfd.readouterr().err
        assert_same_weights(a.state_dict(), b.state_dict())
        assert sampling_metadata(a) == sampling_metadata(b) and is_student(a) == is_student(b)
        assert is_student(b) == (stage.name != "pretrain_teacher")
        assert torch.equal(ta, tb) and ca == cb
        # Sampled: the same videos.
        out_new, out_old = tmp_path / f"{stage.name}_new.safetensors", tmp_path / f"{stage.name}_old.safetensors"
        assert sample_cli.main([str(stage), "--out", str(out_new), *args]) == 0
        assert sample_cli.main([str(old), "--out", str(out_old), *args]) == 0
        assert torch.equal(load_file(str(out_new))["videos"], load_file(str(out_old))["videos"])
        # Converted (stage and bare folder, generator and critic): the same weights, config and sampling.json.
        sources = [([stage, old], ["--ema"]), ([stage / "transformer", old / "transformer"], [])]
        if (stage / "critic").is_dir():
            sources.append(([stage, old], ["--part", "critic"]))
        for i, (pair, flags) in enumerate(sources):
            dests = [tmp_path / f"{stage.name}_{i}_{kind}" for kind in ("new", "old")]
            for src, dest in zip(pair, dests):
                assert convert_cli.main([str(src), str(dest), "--to", "diffusers", *flags]) == 0
                assert_constructor_only(dest)
            new, legacy = (read_source(d) for d in dests)
            assert_same_weights(new.state_dict, legacy.state_dict)
            bare = i == 1  # a bare folder's record is its own: the legacy one does not say how a teacher attends
            assert new.config == legacy.config and legacy.sampling is not None
            assert (without_attention(new.sampling) if bare else new.sampling) == legacy.sampling


def test_legacy_model_saved_again_is_new_style(student_stage, tmp_path):
    cfg, stage = student_stage
    old = as_legacy(stage, tmp_path / "old", cfg)
    model = load_model(old / "transformer_ema")
    save_model(model, tmp_path / "again")
    assert_constructor_only(tmp_path / "again")
    assert read_sampling(tmp_path / "again") == read_sampling(stage / "transformer_ema")
    assert_same_weights(weights(tmp_path, "again"), weights(stage, "transformer_ema"))


def test_bad_sampling_json_fails_in_one_line(trained_stage, tmp_path, capsys):
    _, stage = trained_stage
    folder = tmp_path / "t"
    shutil.copytree(stage / "transformer_ema", folder)
    for text in ("{not json", '{"role": "oracle"}'):
        (folder / SAMPLING_FILE).write_text(text)
        code = sample_cli.main([str(folder), "--out", str(tmp_path / "s.safetensors"), "--n", "2"])
        err = capsys.readouterr().err
        assert code == 2 and "sampling.json" in err and len(err.strip().splitlines()) == 1, err


def test_one_dtype_table_and_device_policy(monkeypatch):
    assert dtype_of("bf16") is torch.bfloat16 and set(DTYPES) == {"fp32", "bf16", "fp16"}
    with pytest.raises(ValueError, match=r"^components.vae_dtype: expected one of fp32, bf16, fp16, got 'fp64'$"):
        dtype_of("fp64", "components.vae_dtype")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^run.device=cuda, but no CUDA device is visible"):
        resolve_device("cuda", "run.device")
    with pytest.raises(ValueError, match=r"^run.device: expected auto, cpu or cuda, got 'gpu'$"):
        resolve_device("gpu", "run.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") == resolve_device("cuda")

"""Config loading: precedence, one-line errors naming the key, validation."""

from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config, to_yaml

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_defaults_file_overrides_precedence(tmp_path):
    default = Config()
    p = write(tmp_path, "run:\n  seed: 7\npretrain_teacher:\n  lr: 0.5\n  steps: 11\n")
    from_file = load_config(p)
    assert from_file.run.seed == 7 and from_file.pretrain_teacher.lr == 0.5 and from_file.pretrain_teacher.steps == 11
    # Keys the file does not set keep their defaults.
    assert from_file.pretrain_teacher.batch_size == default.pretrain_teacher.batch_size
    assert from_file.model.num_layers == default.model.num_layers
    both = load_config(p, ["pretrain_teacher.lr=0.25", "model.num_layers=3"])
    assert both.pretrain_teacher.lr == 0.25 and both.model.num_layers == 3
    assert both.run.seed == 7 and both.pretrain_teacher.steps == 11
    # Later overrides win over earlier ones.
    assert load_config(p, ["run.seed=1", "run.seed=2"]).run.seed == 2
    assert load_config().run.seed == default.run.seed


def test_nested_override_and_list(tmp_path):
    cfg = load_config(None, ["pretrain_teacher.sampler.steps=5", "pretrain_teacher.betas=[0.8,0.95]",
                             "run.stages=[pretrain_teacher]"])
    assert cfg.pretrain_teacher.sampler.steps == 5
    assert cfg.pretrain_teacher.betas == [0.8, 0.95]
    assert cfg.pretrain_teacher.sampler.guidance == Config().pretrain_teacher.sampler.guidance


@pytest.mark.parametrize("key,suggestion", [
    ("pretrain_teacher.stepz", "pretrain_teacher.steps"),
    ("model.num_layrs", "model.num_layers"),
    ("pretrain_teacher.sampler.guidence", "pretrain_teacher.sampler.guidance"),
])
def test_unknown_override_key(key, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=3"])
    msg = one_line(e)
    assert f"'{key}'" in msg and f"'{suggestion}'" in msg


def test_unknown_key_in_file(tmp_path):
    p = write(tmp_path, "data:\n  frames_per_chunck: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = one_line(e)
    assert "data.frames_per_chunck" in msg and "'data.frames_per_chunk'" in msg and str(p) in msg
    p2 = write(tmp_path, "nosuchsection:\n  x: 1\n", "c2.yaml")
    with pytest.raises(ConfigError, match="nosuchsection"):
        load_config(p2)


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["pretrain_teacher.steps=many"])
    msg = one_line(e)
    assert "'pretrain_teacher.steps'" in msg and "wrong type" in msg
    p = write(tmp_path, "data:\n  size: big\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "'data.size'" in one_line(e)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = write(tmp_path, "run: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "YAML" in one_line(e)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["pretrain_teacher.steps"])


def test_mixed_precision_no(tmp_path):
    assert load_config(None, ["run.mixed_precision=no"]).run.mixed_precision == "no"
    assert load_config(write(tmp_path, "run:\n  mixed_precision: no\n")).run.mixed_precision == "no"
    assert load_config(None, ["run.mixed_precision=bf16"]).run.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(None, ["run.mixed_precision=fp8"])


@pytest.mark.parametrize("override,needle", [
    ("data.size=20", "data.size"),
    ("data.frames=7", "data.frames"),
    ("run.stages=[pretrain_teacher,distil]", "distil"),
    ("pretrain_teacher.trajectory=xf", "trajectory"),
    ("pretrain_teacher.attention=causal", "attention"),
    ("model.prediction=eps", "prediction"),
    ("model.patch_size=[2,4,4]", "patch_size"),
    ("pretrain_teacher.sampler.kind=ddim", "sampler.kind"),
    ("pretrain_teacher.steps=0", "steps"),
])
def test_invalid_values_rejected(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in one_line(e)


def test_valid_alternatives_accepted():
    cfg = load_config(None, ["data.size=32", "data.frames=8", "data.frames_per_chunk=2"])
    assert (cfg.data.size, cfg.data.frames, cfg.data.frames_per_chunk) == (32, 8, 2)


def test_tiny_yaml_loads_and_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    assert cfg.data.kind == "sprites" and cfg.data.frames % cfg.data.frames_per_chunk == 0
    from stages.launch import AVAILABLE
    assert cfg.run.stages == list(AVAILABLE), "the default pipeline runs every implemented stage, in order"
    # The resolved config written to a stage folder loads back to the same config.
    p = write(tmp_path, to_yaml(cfg), "resolved.yaml")
    assert load_config(p) == cfg

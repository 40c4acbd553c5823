"""The config schema checks every value against its meaning (issue 19, rule 4): walking the schema, every
numeric key declares its range beside it, and a value outside that range (or a non-finite float, or a
value that is not one of a key's choices) given on the command line ends `--dry-run` with exit code 2,
exactly one line `error: ...` naming the key, no traceback, and nothing created under `run.dir`."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from pipeline.config import Choice, Config, ConfigError, Range, load_config, to_yaml, validate
from stages import launch

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def unwrap(hint) -> tuple[object, bool]:
    """`(element type, is a list)` of a field's type hint, through Optional."""
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def walk(cls=Config, prefix=""):
    """Every leaf key of the schema: `(key, element type, is a list, dataclass field)`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from walk(hint, f"{prefix}{f.name}.")
        else:
            yield (f"{prefix}{f.name}", *unwrap(hint), f)


NUMERIC = [(k, t, lst, f) for k, t, lst, f in walk() if t in (int, float)]
CHOICES = [(k, t, lst, f) for k, t, lst, f in walk() if isinstance(t, type) and issubclass(t, Choice)]


def outside(rng: Range, typ) -> int | float:
    """A value just outside the declared bounds (a finite-only float: nan)."""
    step = 1 if typ is int else 0.5
    if rng.lo is not None:
        return typ(rng.lo if rng.lo_open else rng.lo - step)
    if rng.hi is not None:
        return typ(rng.hi if rng.hi_open else rng.hi + step)
    return float("nan")


def inside(rng: Range, typ) -> int | float:
    """A value within the declared range."""
    if rng.lo is not None and rng.hi is not None:
        x = (rng.lo + rng.hi) // 2 if typ is int else (rng.lo + rng.hi) / 2
    elif rng.lo is not None:
        x = rng.lo + 1
    elif rng.hi is not None:
        x = rng.hi - 1
    else:
        x = 0.0
    x = rng.multiple_of * max(1, round(x / rng.multiple_of)) if rng.multiple_of else x
    assert rng.contains(typ(x)), (rng, x)
    return typ(x)


def as_list(rng: Range, first, typ) -> list:
    """A list of the declared length whose first value is `first` and the others valid."""
    n = rng.length if rng.length is not None else max(rng.min_length, 1)
    return [first] + [inside(rng, typ)] * (n - 1)


def text(v) -> str:
    """A value as written on the command line."""
    if isinstance(v, list):
        return "[" + ",".join(text(x) for x in v) + "]"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return repr(v)


def bad_values(key, typ, is_list, f) -> list[str]:
    """`key=value` overrides that must each be refused: below/above the range, non-finite, not a multiple."""
    rng = f.metadata["range"]
    firsts = [outside(rng, typ)]
    if typ is float and firsts[0] == firsts[0]:  # also a nan where the range case was not one already
        firsts.append(float("nan"))
    if rng.multiple_of:  # within bounds, not a multiple
        firsts.append(inside(rng, typ) + 1)
    return [f"{key}={text(as_list(rng, x, typ) if is_list else x)}" for x in firsts]


def test_every_numeric_key_declares_its_range():
    assert len(NUMERIC) > 60  # the walk found the schema
    for key, typ, _, f in NUMERIC:
        rng = f.metadata.get("range")
        assert isinstance(rng, Range), f"{key}: no range declared beside the field"
        if typ is int:
            assert rng.lo is not None or rng.hi is not None, f"{key}: an int with no bound"
    lists = {k: f.metadata["range"] for k, _, lst, f in NUMERIC if lst}
    assert lists["model.patch_size"].length == 3 and lists["pretrain_teacher.betas"].length == 2
    assert lists["data.latent_size"].length == 2 and lists["student.denoising_steps"].min_length == 1


def test_defaults_and_every_shipped_config_validate():
    validate(Config())
    files = sorted(REPO.glob("configs/*.yaml")) + sorted(p for p in REPO.glob("configs/*/*.yaml")
                                                         if p.parent.name != "accelerate")
    assert len(files) >= 3
    for path in files:
        cfg = load_config(path)
        assert load_config(None, partial=dataclasses.asdict(cfg)) == cfg  # every value, stored, loads back


def test_ranges_accept_what_real_runs_use():
    cfg = load_config(None, ["student.denoising_steps=[1000,750,500,250,125]", "student.denoising_steps=[1000]",
                             "distill.ema_decay=0", "distill.real_guidance=0", "distill.fake_guidance=0",
                             "pretrain_teacher.sampler.guidance=0", "distill.lr=2e-6", "distill.critic_lr=4e-7",
                             "init_student.ode_batch_size=null", "distill.betas=[0.0,0.999]", "run.seed=0",
                             "evaluate.seed=4294967295", "pretrain_teacher.preview_n=0", "pretrain_teacher.tf_prob=1",
                             "pretrain_teacher.warmup_steps=0", "distill.sigma_min=0", "distill.sigma_max=1",
                             "pretrain_teacher.sampler.lag=0", "pretrain_teacher.sampler.clip_x0=0"])
    assert cfg.init_student.ode_batch_size is None and cfg.student.denoising_steps == [1000]


def run_in_process(capsys, tmp_path, override: str) -> None:
    run = tmp_path / "run"
    capsys.readouterr()
    rc = launch.main([TINY, "--dry-run", override, f"run.dir={run}"])
    out, err = capsys.readouterr()
    key = override.split("=")[0]
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (override, err)
    assert key in lines[0] and "Traceback" not in err and out == "", (override, err)
    assert not run.exists()


@pytest.mark.parametrize("key,typ,is_list,f", NUMERIC, ids=[k for k, *_ in NUMERIC])
def test_out_of_range_value_is_one_line_naming_the_key(capsys, tmp_path, key, typ, is_list, f):
    for override in bad_values(key, typ, is_list, f):
        run_in_process(capsys, tmp_path, override)


@pytest.mark.parametrize("key,typ,is_list,f", CHOICES, ids=[k for k, *_ in CHOICES])
def test_value_outside_the_choices_is_one_line_naming_them(capsys, tmp_path, key, typ, is_list, f):
    override = f"{key}=[{next(iter(typ))},nonsense]" if is_list else f"{key}=nonsense"
    run_in_process(capsys, tmp_path, override)
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert "'nonsense'" in str(e.value) and all(m in str(e.value) for m in typ.__members__)


SUBPROCESS_KEYS = ["model.num_layers", "pretrain_teacher.betas"]  # an int, a list of floats


def test_real_command_line(tmp_path):
    """A few of the same cases through `python -m stages.launch` itself (the rest run in process)."""
    fields = {k: (k, t, lst, f) for k, t, lst, f in NUMERIC}
    procs = []
    for i, key in enumerate(SUBPROCESS_KEYS):
        run = tmp_path / f"run{i}"
        override = bad_values(*fields[key])[0]
        procs.append((key, run, subprocess.Popen(
            [sys.executable, "-m", "stages.launch", TINY, "--dry-run", override, f"run.dir={run}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for key, run, proc in procs:
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert key in lines[0] and "Traceback" not in err and out == "", err
        assert not run.exists()


# ---- Enum-typed choices: plain strings to the code that reads them -----------------------------------

def test_choices_are_their_strings():
    for key, typ, _, f in CHOICES:
        assert issubclass(typ, str)
        assert all(name == member.value for name, member in typ.__members__.items()), key
    cfg = load_config(TINY)
    assert cfg.model.prediction == "x0" and {"x0": 1}[cfg.model.prediction] == 1
    assert f"{cfg.distill.method}" == "sf_dmd" and repr(cfg.distill.method) == "'sf_dmd'"
    assert cfg.run.stages == ["pretrain_teacher", "init_student", "distill", "evaluate"]
    written = to_yaml(cfg)
    assert "  prediction: x0\n" in written and "Prediction" not in written and "mixed_precision: auto" in written
    assert to_yaml(load_config(TINY, ["run.mixed_precision=no"])).count("mixed_precision: 'no'") == 1


def test_bad_value_in_a_file_names_the_file(tmp_path):
    for body, needle in [("distill:\n  method: dmd2\n", "distill.method: expected sf_dmd, df_dmd or sf_gan, got 'dmd2'"),
                         ("distill:\n  lr: -1\n", "distill.lr must be positive"),
                         ("pretrain_teacher:\n  sampler: 3\n", "config key 'pretrain_teacher.sampler' is a section"),
                         ("- run\n- data\n", "expected a mapping of config sections")]:
        p = tmp_path / "c.yaml"
        p.write_text(body)
        with pytest.raises(ConfigError) as e:
            load_config(p)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{p}: ") and needle in msg, msg
    with pytest.raises(ConfigError) as e:  # the same value given on the command line: no file to name
        load_config(None, ["distill.lr=-1"])
    assert str(e.value) == "distill.lr must be positive, got -1.0"


# ---- per-section checks: a section checks its own keys, `validate` only what spans sections -----------

def test_sections_check_themselves():
    from pipeline.config import DataConfig, DistillConfig, SamplerConfig, StudentConfig, TeacherConfig

    SamplerConfig(kind="synchronous", steps=3).check("s")  # built directly, plain strings: fine
    for section, prefix, needle in [
            (DistillConfig(sigma_min=0.5, sigma_max=0.4), "d", "d: need 0 <= sigma_min < sigma_max"),
            (TeacherConfig(tf_prob=0.6, bid_prob=0.5), "t", "t: need tf_prob + bid_prob <= 1"),
            (StudentConfig(denoising_steps=[250, 500]), "st", "st.denoising_steps: expected decreasing"),
            (DataConfig(frames=7), "x", "x.frames (7) must be a multiple of x.frames_per_chunk (3)"),
            (TeacherConfig(sampler=SamplerConfig(guidance=float("nan"))), "t", "t.sampler.guidance must be a finite")]:
        with pytest.raises(ConfigError) as e:
            section.check(prefix)
        assert needle in str(e.value), str(e.value)


def test_cross_section_rules():
    for overrides, needle in [(["model.patch_size=[1,4,4]", "data.kind=latents", "data.latent_size=[6,8]",
                                "model.in_channels=16", "model.out_channels=16"], "must divide the 6x8 frames"),
                              (["model.in_channels=4", "model.out_channels=4"], "model.in_channels: sprites videos"),
                              (["data.kind=prompts", "data.path=/p", "run.stages=[pretrain_teacher]"], "needs videos"),
                              (["student.max_context_frames=6", "student.sink_frames=6"], "larger than the sinks")]:
        with pytest.raises(ConfigError) as e:
            load_config(TINY, overrides)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    load_config(TINY, ["data.kind=latents", "data.latent_size=[60,104]", "model.patch_size=[1,2,2]",
                       "model.in_channels=16", "model.out_channels=16"])  # Wan's latents: fine

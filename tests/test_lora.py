"""LoRA through peft (`<stage>.lora.*`): adapters train, checkpoints hold them and resume exactly, exports are merged
plain weights equal to the adapted model."""

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.config import LoraSection
from pipeline.models.loading import load_model
from pipeline.models.lora import add_lora, has_lora, merged_copy
from stages import distill, init_student
from tests.conftest import assert_same_weights, crash_then_resume, make_tiny_model, weights


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 6, 8, 8, generator=g), torch.rand(2, 6, generator=g) * 1000, torch.randn(2, 2, 16, generator=g)


def test_adapters_start_at_the_model_and_merge_into_it():
    model, plain = make_tiny_model(), make_tiny_model()
    n = add_lora(model, rank=4, target_modules=["to_q", "to_v"])
    dims = [(m.in_features, m.out_features) for name, m in plain.named_modules() if name.endswith(("to_q", "to_v"))]
    assert n == sum(4 * (i + o) for i, o in dims) and has_lora(model) and not has_lora(plain)
    x, t, c = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, c, attention="block_causal", frames_per_chunk=3),
                           plain(x, t, c, attention="block_causal", frames_per_chunk=3))  # B = 0 at the start
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
        adapted = model(x, t, c, attention="block_causal", frames_per_chunk=3)
        merged = merged_copy(model)
        assert not has_lora(merged) and all(".lora_" not in k and "base_layer" not in k for k in merged.state_dict())
        torch.testing.assert_close(merged(x, t, c, attention="block_causal", frames_per_chunk=3), adapted,
                                   atol=1e-5, rtol=0)
        assert not torch.allclose(adapted, plain(x, t, c, attention="block_causal", frames_per_chunk=3), atol=1e-3)


def test_gradients_reach_the_adapters_only_also_with_gradient_checkpointing():
    model = make_tiny_model()
    add_lora(model, rank=2)
    model.train()
    model.enable_gradient_checkpointing()
    x, t, c = inputs()
    model(x, t, c, attention="block_causal", frames_per_chunk=3).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads) and any(g.abs().sum() > 0 for g in grads.values())


def lora_cfg(cfg, run_dir, rank=4, critic=True):
    lora = LoraSection(rank=rank, critic=critic)
    d = replace(cfg.distill, student=str(Path(cfg.run.dir) / "init_student"),
                teacher=str(Path(cfg.run.dir) / "pretrain_teacher"), lora=lora)
    return replace(cfg, run=replace(cfg.run, dir=str(run_dir)), distill=d)


def test_distill_with_lora_exports_plain_weights_and_resumes_exactly(student_stage, tmp_path, monkeypatch, capsys):
    cfg, _ = student_stage
    capsys.readouterr()
    full = distill.run(lora_cfg(cfg, tmp_path / "full")).path
    out = capsys.readouterr().out
    assert "[lora] generator: rank 4," in out and "[lora] critic: rank 4," in out
    for sub in ("transformer", "transformer_ema", "critic"):
        sd = weights(full, sub)
        assert all(".lora_" not in k and "base_layer" not in k for k in sd)
        load_model(full / sub)  # an ordinary transformer folder
    student = weights(Path(cfg.run.dir) / "init_student", "transformer_ema")
    trained = weights(full, "transformer")
    changed = [k for k in student if not torch.equal(student[k], trained[k])]
    assert changed and all(k.endswith("weight") and ("to_q" in k or "to_k" in k or "to_v" in k or "to_out.0" in k)
                           for k in changed)  # only the adapted layers moved
    ckpt = load_file(str(full / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert any(".lora_A." in k for k in ckpt) and all(".lora_" in k for k in ckpt)  # the frozen base is not saved
    critic_ckpt = load_file(str(full / "checkpoints" / "step_0000004" / "critic.safetensors"))
    assert critic_ckpt and all(".lora_" in k for k in critic_ckpt)
    ema = load_file(str(full / "checkpoints" / "step_0000004" / "ema.safetensors"))
    assert ema and all(".lora_" in k for k in ema)  # the EMA averages the adapters only
    resumed = crash_then_resume(monkeypatch, capsys, distill, lora_cfg(cfg, tmp_path / "x"), tmp_path / "resumed")
    for sub in ("transformer", "transformer_ema", "critic"):
        assert_same_weights(weights(resumed, sub), weights(full, sub))
    a = load_file(str(resumed / "checkpoints/step_0000004/optimizer.safetensors"))
    b = load_file(str(full / "checkpoints/step_0000004/optimizer.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_student_with_lora(trained_stage, tmp_path, capsys):
    cfg, _ = trained_stage
    import shutil
    shutil.copytree(Path(cfg.run.dir) / "pretrain_teacher", tmp_path / "r" / "pretrain_teacher")
    ic = replace(cfg.init_student, lora=LoraSection(rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                            "ffn.net.0.proj", "ffn.net.2"]))
    capsys.readouterr()
    path = init_student.run(replace(cfg, run=replace(cfg.run, dir=str(tmp_path / "r")), init_student=ic)).path
    assert "[lora] student: rank 2," in capsys.readouterr().out
    assert json.loads((path / "manifest.json").read_text())["status"] == "done"
    assert all(".lora_" not in k for k in weights(path, "transformer_ema"))


def test_the_memory_estimate_counts_the_adapters_peft_adds():
    from pipeline.training.memory import Shape, lora_params

    targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    model = make_tiny_model()
    c = model.config
    shape = Shape(sum(p.numel() for p in model.parameters()), c.num_attention_heads * c.attention_head_dim,
                  c.ffn_dim, c.num_layers, 16, 6, 3)
    assert lora_params(shape, 4, targets) == add_lora(model, rank=4, target_modules=targets)


def test_dry_run_prints_the_lora_memory(capsys):
    from stages.launch import main as launch

    root = Path(__file__).resolve().parents[1]
    args = [str(root / "configs/wan2.1-t2v-1.3b/student.yaml"), "--stages", "distill", "--dry-run"]
    assert launch(args) == 0
    full = capsys.readouterr().out
    assert launch([*args, "distill.lora.rank=256"]) == 0
    lora = capsys.readouterr().out

    def gib(out):
        return float(out.split("memory: ~")[1].split(" GiB")[0])
    assert "LoRA: 0.189B params trainable" in lora and gib(lora) < gib(full) - 20  # AdamW states of 2 x 1.4B gone


def test_unknown_target_module_is_one_line(student_stage, tmp_path, capsys):
    from stages.launch import main as launch
    from tests.conftest import TINY_OVERRIDES, call, copy_stages, one_error
    cfg, _ = student_stage
    run = copy_stages(cfg.run.dir, tmp_path / "r")
    (tmp_path / "c.yaml").write_text("{}\n")
    rc, err = call(capsys, launch, tmp_path / "c.yaml", "--stages", "distill", *TINY_OVERRIDES, f"run.dir={run}",
                   "distill.lora.rank=2", "distill.lora.target_modules=[to_qq]")
    one_error(rc, err, "lora.target_modules ['to_qq']", "not found")

"""The one training loop: a method written here (a class and a config section, no loop code) trains
through `Trainer`, resumes bit-exactly after an interruption; the layout rules of the library."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from pipeline.config import TrainingConfig
from pipeline.data import shard
from pipeline.diffusion.sampling import Denoiser
from pipeline.methods.base import METHODS, Method, Trained, register
from pipeline.models.causal_wan import build_transformer
from pipeline.training import checkpoint
from pipeline.training.distributed import shared_generator
from pipeline.training.optim import make_optimizer, trainable
from pipeline.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ShrinkConfig(TrainingConfig):
    """The toy method's config section."""

    steps: int = 6
    batch_size: int = 2
    warmup_steps: int = 0
    lr: float = 1e-2
    checkpoint_every: int = 2
    log_every: int = 1
    level: float = 0.5  # the noise level the toy trains at


@register("shrink")
class Shrink(Method):
    """A toy method: push the transformer's output on random videos towards 0."""

    stage = "shrink"

    def build(self, accelerator) -> None:
        model = trainable(build_transformer(self.cfg.model), self.section)
        self.ema = EMAModel(model.parameters(), decay=self.section.ema_decay)
        optimizer, scheduler = make_optimizer(model, self.section)
        self.trained = {"model": Trained(model, optimizer, scheduler, self.section.grad_clip, "shrink.lr")}
        self.gen = shared_generator(accelerator, self.cfg.run.seed)
        self.history: list[float] = []

    def bind(self) -> None:
        self.denoiser = Denoiser(self.trained["model"].module, "block_causal", self.cfg.data.frames_per_chunk, "flow")

    def batch(self, i: int) -> torch.Tensor:
        d = self.cfg.data
        return shard.randn((self.section.batch_size, self.cfg.model.in_channels, d.frames, d.size, d.size), self.gen)

    def loss(self, x: torch.Tensor):
        sigma = torch.full(x.shape[:1] + x.shape[2:3], self.section.level)
        context = torch.zeros(x.shape[0], self.cfg.data.cond_tokens, self.cfg.model.text_dim)
        return self.denoiser.raw(x, sigma, context).pow(2).mean(), {}

    def train_step(self, step: int) -> None:
        update = self.optimize("model", step=step, batch=self.batch, loss=self.loss)
        self.history.append(update.loss.item())
        self.update_ema()

    def logs(self, step: int, *, elapsed: float):
        return {"loss": self.history[-1]}, {"loss": f"{self.history[-1]:.4f}"}

    def metrics(self, *, step: int, extra: dict) -> dict:
        return {"first_loss": self.history[0] if self.history else None,
                "last_loss": self.history[-1] if self.history else None}


def weights(stage: Path) -> dict:
    return {part: load_file(str(stage / part / "diffusion_pytorch_model.safetensors"))
            for part in ("transformer", "transformer_ema")}


def test_a_method_written_in_a_test_trains_and_resumes_bit_exactly(make_cfg, monkeypatch, capsys):
    assert METHODS["shrink"] is Shrink
    whole_cfg = make_cfg(sub="whole")
    stage = Trainer(Shrink(cfg=whole_cfg, section=ShrinkConfig())).run()
    manifest = json.loads((stage.path / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["metrics"]["steps"] == 6
    assert manifest["metrics"]["last_loss"] < manifest["metrics"]["first_loss"]  # it learns
    assert (stage.path / "logs").is_dir() and not (stage.path / "preview.gif").exists()

    cut_cfg = make_cfg(sub="cut")
    orig = checkpoint.save_training_checkpoint

    class Interrupt(Exception):
        pass

    def crash_at_4(root, step, *a, **kw):
        out = orig(root, step, *a, **kw)
        if step == 4:
            raise Interrupt
        return out

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_training_checkpoint", crash_at_4)
        with pytest.raises(Interrupt):
            Trainer(Shrink(cfg=cut_cfg, section=ShrinkConfig())).run()
    assert json.loads((Path(cut_cfg.run.dir) / "shrink" / "manifest.json").read_text())["status"] == "running"
    capsys.readouterr()
    resumed = Trainer(Shrink(cfg=cut_cfg, section=ShrinkConfig())).run()
    assert "resuming from step_0000004" in capsys.readouterr().out
    a, b = weights(stage.path), weights(resumed.path)
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)

    # done: a second run skips; more steps extend it
    capsys.readouterr()
    Trainer(Shrink(cfg=cut_cfg, section=ShrinkConfig())).run()
    assert "done already" in capsys.readouterr().out
    longer = Trainer(Shrink(cfg=cut_cfg, section=ShrinkConfig(steps=8))).run()
    assert json.loads((longer.path / "manifest.json").read_text())["metrics"]["steps"] == 8


def test_the_pipeline_methods_are_registered():
    import pipeline.methods.distillation  # noqa: F401
    import pipeline.methods.flow_matching  # noqa: F401
    import pipeline.methods.ode_regression  # noqa: F401

    assert {"flow_matching", "ode_regression", "sf_dmd", "df_dmd"} <= set(METHODS)
    assert all(issubclass(METHODS[n], Method) for n in METHODS)


# ---- layout rules ---------------------------------------------------------------------------------------

def module_imports() -> dict[str, set[str]]:
    """`{module: project modules it imports}` over pipeline/, stages/ and benchmarks/ (top-level imports
    and imports inside functions alike)."""
    files = [p for d in ("pipeline", "stages", "benchmarks") for p in (REPO / d).rglob("*.py")]
    names = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    graph = {}
    for name, path in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for target in [f"{node.module}.{a.name}" for a in node.names] + [node.module]:
                    if target in names:
                        deps.add(target)
                        break
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in names}
        graph[name] = deps - {name}
    return graph


def test_no_import_cycles():
    graph = module_imports()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_library_never_imports_the_stages():
    graph = module_imports()
    offenders = {m: sorted(d for d in deps if d.startswith("stages"))
                 for m, deps in graph.items() if m.startswith(("pipeline", "benchmarks"))}
    assert not {m: d for m, d in offenders.items() if d}


@pytest.mark.parametrize("stage", ["pretrain_teacher", "init_student", "distill"])
def test_training_stages_are_thin(stage):
    source = (REPO / "stages" / f"{stage}.py").read_text()
    tree = ast.parse(source)
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While))], f"{stage} has a loop"
    assert len(source.splitlines()) <= 100


def test_force_moves_the_folder_aside_once_every_process_has_looked(tmp_path):
    """`--force` with several processes: the main process moves the stage folder aside only after every
    process has looked for it, so all of them wait for the move alike. Two threads stand in for two processes
    (a barrier for `wait_for_everyone`), the second one slow to start: before, it found no folder, skipped the
    wait and the first one waited for ever (DDP runs hung at start-up)."""
    import threading
    import time
    from types import SimpleNamespace

    from pipeline.training.trainer import force_move_aside

    (tmp_path / "distill").mkdir()
    barrier = threading.Barrier(2, timeout=10)
    waits, errors = [0, 0], []

    def process(rank):
        stage = SimpleNamespace(path=tmp_path / "distill", stage="distill",
                                move_aside=lambda: (tmp_path / "distill").rename(tmp_path / "distill.replaced-1"))

        def wait():
            waits[rank] += 1
            barrier.wait()
        try:
            time.sleep(0.5 * rank)
            force_move_aside(SimpleNamespace(is_main_process=rank == 0, wait_for_everyone=wait), stage)
        except threading.BrokenBarrierError as e:
            errors.append(e)
    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and waits[0] == waits[1] == 2
    assert (tmp_path / "distill.replaced-1").is_dir() and not (tmp_path / "distill").exists()

"""Training methods: one class per method, each owning its models, optimisers and training step.

`method_for(stage, cfg)` is the method a training stage runs: `pretrain_teacher` → flow matching,
`init_student` → ODE regression, `distill` → the method `distill.method` names (`sf_dmd`, `df_dmd`).
"""

from __future__ import annotations


def method_for(stage: str, cfg):
    """The configured method of the training stage `stage`, constructed on `cfg` (a `Method`)."""
    from pipeline.methods.base import METHODS
    from pipeline.methods import distillation, flow_matching, ode_regression  # noqa: F401 (they register)

    name = {"pretrain_teacher": "flow_matching", "init_student": "ode_regression",
            "distill": cfg.distill.method}[stage]
    return METHODS[name](cfg=cfg)

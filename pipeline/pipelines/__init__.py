"""diffusers pipelines of our models: `CausalWanPipeline` (a trained causal student, whole or streamed)."""

from pipeline.pipelines.causal_wan import CausalWanPipeline, PipelineError  # noqa: F401

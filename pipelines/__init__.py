"""Diffusers-style pipelines of mmgen."""

from .pipeline_mmgen import (
    CFG_INTERVAL,
    GUIDANCE_SCALE,
    IMAGE_GUIDANCE_SCALE,
    NUM_INFERENCE_STEPS,
    GenerationStats,
    InterleavedPipelineOutput,
    MMGenPipeline,
    StreamEvent,
)

__all__ = [
    "CFG_INTERVAL",
    "GUIDANCE_SCALE",
    "IMAGE_GUIDANCE_SCALE",
    "NUM_INFERENCE_STEPS",
    "GenerationStats",
    "InterleavedPipelineOutput",
    "MMGenPipeline",
    "StreamEvent",
]

"""Diffusers-style pipelines of mmgen."""

from .pipeline_mmgen import GenerationStats, InterleavedPipelineOutput, MMGenPipeline, StreamEvent

__all__ = ["GenerationStats", "InterleavedPipelineOutput", "MMGenPipeline", "StreamEvent"]

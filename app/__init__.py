"""The Gradio demo: `launch()` serves a model; `build_demo(pipe)` and `serve(demo)` for tests and embedding."""

from .demo import build_demo, compression_choices, drafter_choices, launch, serve

__all__ = ["build_demo", "compression_choices", "drafter_choices", "launch", "serve"]

"""Fixtures of the corpus runs: one tiny pipeline per module (the same as the shared `model_dir` folder)."""

from __future__ import annotations

import pytest

from ..conftest import tiny_pipeline

# Small enough that a sane case finishes in well under a second: a few tokens, one flow step, one image.
FAST = dict(max_new_tokens=4, num_inference_steps=1, max_images=1)


@pytest.fixture(scope="module")
def pipe(tokenizer):
    return tiny_pipeline(tokenizer, "llama", image_scale=6.0)


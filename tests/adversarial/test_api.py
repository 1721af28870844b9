"""The corpus through the Python API: `MMGenPipeline`, `open_image`, `from_pretrained` and the file readers.

An error must be a ValueError, TypeError or FileNotFoundError raised by mmgen's own checks, whose message
names the problem; a sane result is a well-formed output from the tiny pipeline.
"""

from __future__ import annotations

import collections
from pathlib import Path

import PIL.Image
import PIL.ImageFile
import pytest

from mmgen.app.uploads import open_image as open_upload
from mmgen.config import ModelArguments, TrainArguments, parse_config
from mmgen.evals.adapters import get_adapter
from mmgen.image_tokenizer import MAX_IMAGE_PIXELS, open_image
from mmgen.pipelines import InterleavedPipelineOutput, MMGenPipeline

from ..conftest import ROOT
from .cases import CASES, FILES, IMAGES, MODELS, Case, cases_for
from .conftest import FAST

READERS = {
    "eval": lambda path: get_adapter("isg").read(path),
    "train": lambda path: parse_config((ModelArguments, TrainArguments), path),
}


def outcome(expected: str | None, run):
    """Run `run()`: with `expected` None return its result, else check the error it raises."""
    if expected is None:
        return run()
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=expected) as info:
        run()
    site = Path(info.traceback[-1].path).resolve()
    assert site.is_relative_to(ROOT) and "site-packages" not in site.parts, (
        f"raised at {site}, not by mmgen's own checks: {info.value}"
    )
    return None


def prompt_of(case: Case, folder: Path):
    return [open_image(IMAGES[case.image](folder)), case.text] if case.image else case.text


@pytest.mark.parametrize("case", cases_for("api", kind="generate"))
def test_generation_input(case, pipe, tmp_path):
    out = outcome(case.expected("api"), lambda: pipe(prompt_of(case, tmp_path), **{**FAST, **case.params}))
    if out is not None:
        assert isinstance(out, InterleavedPipelineOutput) and len(out.segments) == 1
        assert isinstance(out.text[0], str) and pipe.last_stats.text_tokens <= FAST["max_new_tokens"]
        assert len(out.images[0]) <= FAST["max_images"]
        assert all(isinstance(im, PIL.Image.Image) and im.size == (16, 16) for im in out.images[0])


@pytest.mark.parametrize("case", cases_for("api", kind="model"))
def test_model_folder(case, model_dir, tmp_path):
    folder = MODELS[case.model](model_dir, tmp_path / "model")
    outcome(case.expected("api"), lambda: MMGenPipeline.from_pretrained(folder))


@pytest.mark.parametrize("case", cases_for("api", kind="file"))
def test_data_and_config_file(case, tmp_path):
    reader, build = FILES[case.file]
    outcome(case.expected("api"), lambda: READERS[reader](build(tmp_path)))


@pytest.mark.parametrize("case", [c for c in CASES if isinstance(c.text, str) and "<|" in c.text], ids=lambda c: c.name)
def test_typed_special_tokens_are_text_not_markers(case, pipe):
    codec = pipe.codec
    ids = codec.text_ids(case.text)
    special = {codec.ids.image_start, codec.ids.image_end, codec.ids.image_pad, codec.ids.eos, codec.ids.pad}
    assert not special & set(ids), "a typed marker became a special token"
    assert codec.decode_text(ids) == case.text


@pytest.mark.parametrize("image", ["bomb_20000", "over_limit_5000"])
def test_oversized_images_are_refused_from_the_header_before_any_pixel_is_decoded(image, upload_dir, monkeypatch):
    def decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", decode)
    path = IMAGES[image](upload_dir)
    with pytest.raises(ValueError, match="decompression bomb|refused before decoding"):
        open_image(path)
    with pytest.raises(ValueError, match="pixel limit"):
        open_upload(path)
    # mmgen's own limit is the lower one, so PIL's guard is a second line, never the only one.
    assert MAX_IMAGE_PIXELS < PIL.Image.MAX_IMAGE_PIXELS


def test_the_corpus_is_large_named_and_every_case_reaches_a_surface():
    assert len(CASES) >= 40
    names = collections.Counter(c.name for c in CASES)
    assert not [n for n, k in names.items() if k > 1], "case names are unique"
    for case in CASES:
        assert case.surfaces, f"{case.name} reaches no surface"
        assert case.image is None or case.image in IMAGES
        assert case.model is None or case.model in MODELS
        assert case.file is None or case.file in FILES
    used = {c.image for c in CASES} | {c.model for c in CASES} | {c.file for c in CASES}
    assert set(IMAGES) | set(MODELS) | set(FILES) <= used, "every builder is used by a case"

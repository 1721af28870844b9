"""The common sample format of the evaluation toolkit, and its JSON files.

Every benchmark adapter turns its public format into `EvalSample`s (a query and an optional
golden answer, both lists of `Text`/`Image` segments) and model outputs into `Prediction`s.
On disk a segment list is `[{"type": "text"|"image", "content": str}]`, where an image's content
is the path of a PNG file relative to a base folder, so a results folder can be moved as a whole.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image

from mmgen.image_tokenizer import open_image
from mmgen.segments import Image, Segment, Text

__all__ = [
    "EvalSample",
    "Prediction",
    "atomic_write_text",
    "image_segments",
    "load_image",
    "safe_name",
    "save_png",
    "segments_from_json",
    "segments_to_json",
    "text_segments",
    "type_sequence",
]


def _check_segments(segments: Any, what: str, sample_id: str) -> list[Segment]:
    if not isinstance(segments, (list, tuple)):
        raise TypeError(
            f"sample {sample_id!r}: {what} must be a list of segments, got {type(segments).__name__}"
        )
    for seg in segments:
        if not isinstance(seg, (Text, Image)):
            raise TypeError(
                f"sample {sample_id!r}: {what} holds a {type(seg).__name__}; only Text and Image segments are allowed"
            )
    return list(segments)


@dataclass
class EvalSample:
    """One benchmark item: the query given to the model, the golden answer if the benchmark has one,
    and free-form metadata (`category`, the benchmark's raw record for writing predictions back, ...)."""

    id: str
    query: list[Segment]
    golden: list[Segment] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id:
            raise TypeError(f"EvalSample id must be a non-empty str, got {self.id!r}")
        self.query = _check_segments(self.query, "query", self.id)
        if self.golden is not None:
            self.golden = _check_segments(self.golden, "golden", self.id)
        if not isinstance(self.meta, dict):
            raise TypeError(f"sample {self.id!r}: meta must be a dict, got {type(self.meta).__name__}")

    @property
    def category(self) -> str | None:
        """The benchmark's category of this item, used to break scores down in summaries."""
        value = self.meta.get("category")
        return None if value is None else str(value)


@dataclass
class Prediction:
    """A model's output for one sample id."""

    id: str
    output: list[Segment]

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id:
            raise TypeError(f"Prediction id must be a non-empty str, got {self.id!r}")
        self.output = _check_segments(self.output, "output", self.id)


def type_sequence(segments: Iterable[Segment]) -> list[str]:
    """The modality of each segment in order, e.g. `["text", "image", "image"]`."""
    return ["image" if isinstance(s, Image) else "text" for s in segments]


def image_segments(segments: Iterable[Segment]) -> list[PIL.Image.Image]:
    """The PIL images of a segment list, in order. Latent-only images cannot be scored and are refused."""
    out = []
    for seg in segments:
        if isinstance(seg, Image):
            if seg.image is None:
                raise ValueError("Image segment holds only a latent; decode it to pixels before evaluation")
            out.append(seg.image)
    return out


def text_segments(segments: Iterable[Segment]) -> list[str]:
    """The texts of a segment list, in order."""
    return [s.text for s in segments if isinstance(s, Text)]


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(sample_id: str) -> str:
    """A file-name-safe version of a sample id. Ids that had to be changed get a short hash so that
    two different ids never map to the same file name."""
    cleaned = _UNSAFE.sub("_", sample_id)
    if cleaned == sample_id and cleaned not in (".", ".."):
        return cleaned
    digest = hashlib.sha1(sample_id.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned[:80]}-{digest}"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see either the old or the new content, never a torn file
    (temporary file in the same folder, fsync, then `os.replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_png(image: PIL.Image.Image, path: str | os.PathLike) -> None:
    """Save an image as PNG through a temporary file, so a killed run never leaves a torn PNG behind."""
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"save_png needs a PIL image, got {type(image).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_image(
    path: str | os.PathLike, base_dir: str | os.PathLike | None, sample_id: str
) -> PIL.Image.Image:
    """Load an image referenced by a data file, resolved against `base_dir` unless absolute.

    Images are converted to RGB (transparency onto white) and fully read, so no file handle stays open.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"sample {sample_id!r}: image path must be a non-empty string, got {path!r}")
    resolved = Path(path)
    if not resolved.is_absolute() and base_dir is not None:
        resolved = Path(base_dir) / resolved
    if not resolved.is_file():
        raise ValueError(f"sample {sample_id!r}: image not found: {resolved}")
    try:
        return open_image(resolved)  # the size is checked before decoding: a bomb is refused
    except ValueError as e:
        raise ValueError(f"sample {sample_id!r}: {e}") from None


def segments_to_json(
    segments: Sequence[Segment], base_dir: str | os.PathLike, image_stem: str
) -> list[dict[str, str]]:
    """Turn segments into `[{"type", "content"}]`, saving each image as `<base_dir>/<image_stem><k>.png`.

    `image_stem` may contain a sub-folder (`"images/0001_o"`); contents are POSIX paths relative to
    `base_dir`.
    """
    base_dir = Path(base_dir)
    items: list[dict[str, str]] = []
    k = 0
    for seg in segments:
        if isinstance(seg, Text):
            items.append({"type": "text", "content": seg.text})
        elif isinstance(seg, Image):
            if seg.image is None:
                raise ValueError("Image segment holds only a latent; decode it to pixels before saving")
            rel = f"{image_stem}{k}.png"
            save_png(seg.image, base_dir / rel)
            items.append({"type": "image", "content": rel})
            k += 1
        else:
            raise TypeError(f"expected Text or Image segments, got {type(seg).__name__}")
    return items


def segments_from_json(
    items: Any, base_dir: str | os.PathLike | None, sample_id: str, what: str = "segments"
) -> list[Segment]:
    """Inverse of `segments_to_json`: `[{"type": "text"|"image", "content": str}]` to segments."""
    if not isinstance(items, list):
        raise ValueError(
            f"sample {sample_id!r}: {what} must be a list of {{type, content}} items, got {type(items).__name__}"
        )
    out: list[Segment] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "type" not in item or "content" not in item:
            raise ValueError(
                f"sample {sample_id!r}: {what}[{i}] must be a dict with 'type' and 'content', got {item!r}"
            )
        kind, content = item["type"], item["content"]
        if not isinstance(content, str):
            raise ValueError(
                f"sample {sample_id!r}: {what}[{i}] content must be a string, got {type(content).__name__}"
            )
        if kind == "text":
            out.append(Text(content))
        elif kind == "image":
            out.append(Image(load_image(content, base_dir, sample_id)))
        else:
            raise ValueError(
                f"sample {sample_id!r}: {what}[{i}] has unknown type {kind!r} (expected 'text' or 'image')"
            )
    return out

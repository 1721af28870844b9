"""The conversation behind the demo: chat messages ⇄ interleaved prompts, and the streamed answer.

A chat is a list of messages in Gradio's format (`{"role", "content", "metadata"}`, the content a list of
text and file items). The whole conversation, user and assistant turns with their images, becomes one
interleaved prompt, written in the ShapesWorld convention the default model was trained on: the first
text has no leading space and every later text starts with one, so turns concatenate into plain text.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from gradio.utils import get_upload_folder

from mmgen.pipelines import (
    GUIDANCE_SCALE,
    IMAGE_GUIDANCE_SCALE,
    NUM_INFERENCE_STEPS,
    GenerationStats,
    MMGenPipeline,
)
from mmgen.segments import Image, Segment, Text

from .uploads import UploadRejected, open_image

logger = logging.getLogger(__name__)

# Messages with this title report a failed turn. They are shown, but they and the turn they answer are
# left out of the next prompt.
ERROR_TITLE = "⚠️ No answer"
DRAFTER_OFF = "off"


@dataclass
class GenerationSettings:
    """The demo's controls, as the pipeline's arguments."""

    max_new_tokens: int = 128
    num_inference_steps: int = NUM_INFERENCE_STEPS
    guidance_scale: float = GUIDANCE_SCALE
    image_guidance_scale: float = IMAGE_GUIDANCE_SCALE
    seed: int = 0
    max_images: int = 4
    compression: str = "none"
    drafter: str = DRAFTER_OFF
    temperature: float = 0.0

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments of `MMGenPipeline.stream`; bad values are left for the pipeline to reject."""
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, float)) or not (
            math.isfinite(self.seed) and float(self.seed).is_integer() and 0 <= self.seed < 2**63
        ):
            raise ValueError(f"seed must be a whole number from 0 to 2^63-1, got {self.seed!r}")
        return dict(
            max_new_tokens=_whole(self.max_new_tokens),
            num_inference_steps=_whole(self.num_inference_steps),
            guidance_scale=self.guidance_scale,
            image_guidance_scale=self.image_guidance_scale,
            max_images=_whole(self.max_images),
            compression=self.compression,
            drafter=None if self.drafter in (None, DRAFTER_OFF) else self.drafter,
            temperature=self.temperature,
            generator=torch.Generator().manual_seed(int(self.seed)),
        )

    @property
    def drafting(self) -> bool:
        return self.drafter not in (None, DRAFTER_OFF)


def _whole(value):
    """Sliders and JSON clients send 4.0 for 4; the pipeline wants an int and rejects anything else."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# -- chat messages → prompt segments ------------------------------------------------------------------
def _items(message: dict) -> list:
    content = message.get("content")
    return content if isinstance(content, list) else [content]


def _item_segment(item) -> Segment | None:
    """One content item of a chat message as a segment: text, or an image file (checked and opened)."""
    if isinstance(item, str):
        return Text(item) if item.strip() else None
    if isinstance(item, dict):
        if item.get("type") == "text":
            text = item.get("text")
            if not isinstance(text, str):
                raise ValueError(f"a text item of the chat history must hold a string, got {text!r}")
            return Text(text) if text.strip() else None
        file = item.get("file") if item.get("type") == "file" else item
        if isinstance(file, dict) and file.get("path"):
            return Image(open_image(file["path"]))
    if isinstance(item, (list, tuple)) and item:  # a (path, alt text) pair
        return Image(open_image(item[0]))
    return None  # anything else (a component) carries nothing the model can read


def _is_error(message: dict) -> bool:
    return (message.get("metadata") or {}).get("title") == ERROR_TITLE


def history_segments(history: list[dict]) -> list[Segment]:
    """The conversation so far as segments, leaving out failed turns and status messages."""
    turns: list[list[dict]] = []
    for message in history:
        if message.get("role") == "user" and (not turns or turns[-1][-1].get("role") != "user"):
            turns.append([])
        if turns:
            turns[-1].append(message)
    segments: list[Segment] = []
    for turn in turns:
        if any(_is_error(m) for m in turn):
            continue
        for message in turn:
            if message.get("role") not in ("user", "assistant") or (message.get("metadata") or {}).get("title"):
                continue
            segments.extend(s for s in map(_item_segment, _items(message)) if s is not None)
    return segments


def chat_history(history) -> list[dict]:
    """The chat so far as a list of message dicts; API clients can send anything here."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise ValueError(f"the chat history must be a list of messages, got {type(history).__name__}")
    for n, message in enumerate(history):
        if not isinstance(message, dict):
            raise ValueError(f"chat history item {n} is not a message (a dict with a role and content)")
    return list(history)


def user_message(message) -> dict:
    """The textbox value as `{"text": str, "files": [path, ...]}`. API clients can send anything here, so
    each part is checked; a bare string is taken as the text."""
    if not isinstance(message, dict):
        message = {"text": "" if message is None else str(message)}
    text = message.get("text") or ""
    if not isinstance(text, str):
        raise ValueError(f"the message text must be a string, got {type(text).__name__}")
    files = message.get("files") or []
    if not isinstance(files, (list, tuple)):
        raise ValueError(f"the message's files must be a list of uploaded files, got {type(files).__name__}")
    paths = [f.get("path") if isinstance(f, dict) else f for f in files]
    for path in paths:
        if not isinstance(path, str) or not path:
            raise UploadRejected(f"an attached file must be given by the path of an upload, got {path!r}")
    return {"text": text, "files": paths}


def message_segments(message: dict) -> list[Segment]:
    """A new user message (as `user_message` gives it): its images first, then its text, as in the
    ShapesWorld question and edit prompts."""
    segments: list[Segment] = [Image(open_image(path)) for path in message["files"]]
    if message["text"].strip():
        segments.append(Text(message["text"]))
    return segments


def spaced(segments: list[Segment]) -> list[Segment]:
    """Write texts in the training convention: the first without a leading space, later ones with one."""
    out: list[Segment] = []
    for segment in segments:
        if isinstance(segment, Text):
            body = segment.text.strip()
            segment = Text(body if not out else " " + body)
        out.append(segment)
    return out


# -- the answer ---------------------------------------------------------------------------------------
def stats_line(stats: GenerationStats, drafting: bool) -> str:
    """One line of Markdown about the last answer: speed of text, of images, and context cost."""
    parts = [f"**{stats.text_tokens_per_second:.1f}** text tokens/s"]
    if drafting:
        tau = stats.text_tokens / stats.target_forwards if stats.target_forwards else 0.0
        parts.append(f"τ **{tau:.2f}** tokens per target forward")
    if stats.images:
        parts.append(f"**{stats.seconds_per_image:.2f}** s per image")
    parts.append(f"**{stats.tokens_per_context_image}** tokens per context image")
    return " · ".join(parts)


@contextmanager
def image_folder() -> Iterator[Path]:
    """A folder for one answer's images. Gradio copies every file a handler returns into its cache, so the
    folder is removed afterwards, unless it already lies in that cache (then Gradio serves it in place)."""
    folder = Path(tempfile.mkdtemp(prefix="mmgen-app-"))
    try:
        yield folder
    finally:
        if not folder.resolve().is_relative_to(Path(get_upload_folder()).resolve()):
            shutil.rmtree(folder, ignore_errors=True)


def save_image(image: PIL.Image.Image, folder: Path) -> Path:
    """Write a PNG named by its content, so the same picture is stored once."""
    path = folder / f"{hashlib.sha256(image.tobytes()).hexdigest()[:16]}.png"
    image.save(path, format="PNG")
    return path


class AnswerStream:
    """Runs the pipeline on a prompt and grows the assistant's message content as events arrive.

    `content` is the message's item list: text runs (str) and image files (`{"path": ...}`) in the order
    they were generated. `stats` is this call's `GenerationStats`.
    """

    def __init__(self, pipe: MMGenPipeline, lock: threading.Lock):
        self.pipe = pipe
        self.lock = lock
        self.content: list = []
        self.stats: GenerationStats | None = None

    def run(self, prompt: list[Segment], settings: GenerationSettings, folder: Path) -> Iterator[list]:
        """Yield `content` after every piece of text and every image."""
        events = self.pipe.stream(prompt, **settings.pipeline_kwargs())
        # `stream` puts a fresh GenerationStats on the pipeline before its first event. The lock keeps
        # another conversation from replacing it before this one has taken hold of it.
        with self.lock:
            first = next(events, None)
            self.stats = self.pipe.last_stats
        for event in _chain(first, events):
            if event.kind == "text" and event.text:
                if self.content and isinstance(self.content[-1], str):
                    self.content[-1] += event.text
                else:
                    self.content.append(event.text)
                yield self.content
            elif event.kind == "image" and event.image is not None and event.image.image is not None:
                count = sum(isinstance(c, dict) for c in self.content) + 1
                self.content.append({"path": str(save_image(event.image.image, folder)),
                                     "alt_text": f"generated image {count}"})
                yield self.content


def _chain(first, rest: Iterator) -> Iterator:
    if first is not None:
        yield first
    yield from rest

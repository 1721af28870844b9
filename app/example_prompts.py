"""The demo's three clickable examples, drawn from ShapesWorld with fixed seeds.

The texts are written out here and the pictures are committed as PNG files in `examples/`, so the
examples stay put when ShapesWorld's sampler changes. `write_example_images()` renders the pictures
again from the seeds (`python -m mmgen.app.example_prompts`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .uploads import EXAMPLES_DIR

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One example: the chat card's label, the user's text, and an optional picture under `examples/`."""

    label: str
    text: str
    image: str | None  # file name inside EXAMPLES_DIR
    task: str  # ShapesWorld task and seed it comes from
    seed: int

    @property
    def image_path(self) -> Path | None:
        return EXAMPLES_DIR / self.image if self.image else None

    def as_message(self) -> dict:
        """The textbox value `{"text", "files"}` this example submits."""
        return {"text": self.text, "files": [str(self.image_path)] if self.image else []}


EXAMPLES = (
    Example(
        label="Story in four pictures",
        text="tell this story in four pictures: one purple circle. next, the circle changes to blue. "
        "after that, a green diamond shows up under the circle. next, the circle turns red.",
        image=None, task="story", seed=1,
    ),
    Example(label="Describe a picture", text="describe the image.", image="caption.png", task="i2t", seed=2),
    Example(label="Edit a picture", text="turn the triangle green.", image="edit.png", task="edit", seed=15),
)


def write_example_images(folder: Path = EXAMPLES_DIR) -> list[Path]:
    """Render the examples' pictures from their ShapesWorld seeds into `folder` as PNG files."""
    from mmgen.segments import Image, Text
    from mmgen.shapesworld import ShapesWorld

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for example in EXAMPLES:
        sample = ShapesWorld(example.seed).sample(task=example.task)
        text = "".join(s.text for s in sample.prompt if isinstance(s, Text)).strip()
        if text != example.text:
            logger.warning("ShapesWorld seed %d now gives %r, not %r", example.seed, text, example.text)
        if example.image:
            image = next(s.image for s in sample.prompt if isinstance(s, Image))
            path = folder / example.image
            image.save(path, format="PNG")
            written.append(path)
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    for written_path in write_example_images():
        logger.info("wrote %s", written_path)

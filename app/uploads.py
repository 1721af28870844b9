"""Safe reading of the image files the demo receives.

Every path a handler gets comes from the browser or an API client, so it is checked before it is opened:
it must lie inside Gradio's upload/cache folder or the demo's own `examples/` folder, be small enough,
carry an image extension, hold an image format that matches, and declare a pixel count below a limit
before any pixel is decoded (a decompression bomb is a tiny file that declares a huge image).

Unlike the general `mmgen.image_tokenizer.open_image`, only the decoder named by the extension is tried
(PIL would otherwise sniff any of its formats from the content), and messages name the file, never the
server's path to it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import PIL.Image
from gradio.utils import get_upload_folder

from mmgen.image_tokenizer import MAX_IMAGE_PIXELS, to_pil

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Extension → the PIL format a file with that extension must actually hold.
IMAGE_FORMATS = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".gif": "GIF", ".bmp": "BMP",
}
IMAGE_EXTENSIONS = tuple(IMAGE_FORMATS)


class UploadRejected(ValueError):
    """A file the demo refuses to read; the message is meant for the user."""


def allowed_roots() -> list[Path]:
    """The only folders the demo reads files from: Gradio's upload/cache folder and `app/examples/`."""
    return [Path(get_upload_folder()).resolve(), EXAMPLES_DIR]


def check_path(path: str | Path) -> Path:
    """The resolved path if it lies inside an allowed folder (symlinks and `..` resolved first)."""
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root) for root in allowed_roots()):
        raise UploadRejected(f"{Path(path).name}: not an uploaded file")
    return resolved


def open_image(path: str | Path, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_IMAGE_PIXELS
               ) -> PIL.Image.Image:
    """Read an uploaded image as an RGB PIL image, or raise `UploadRejected` saying why not."""
    resolved = check_path(path)
    name = Path(path).name
    suffix = resolved.suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise UploadRejected(f"{name}: only images can be uploaded ({', '.join(IMAGE_EXTENSIONS)})")
    if not resolved.is_file():
        raise UploadRejected(f"{name}: the file is gone; upload it again")
    size = resolved.stat().st_size
    if size == 0:
        raise UploadRejected(f"{name}: the file is empty (0 bytes)")
    if size > max_bytes:
        raise UploadRejected(f"{name}: {size / 2**20:.1f} MB is over the {max_bytes / 2**20:.0f} MB upload limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(resolved, formats=[IMAGE_FORMATS[suffix]]) as image:
                width, height = image.size  # from the header: nothing is decoded yet
                if width * height > max_pixels:
                    raise UploadRejected(f"{name}: {width}×{height} is over the pixel limit ({max_pixels:,})")
                image.seek(0)  # the first frame of an animation
                image.load()
                return to_pil(image).copy()
    except UploadRejected:
        raise
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning):
        raise UploadRejected(f"{name}: the image declares more than the pixel limit ({max_pixels:,})") from None
    except (PIL.UnidentifiedImageError, OSError, ValueError, EOFError, SyntaxError):
        raise UploadRejected(
            f"{name}: not a readable {IMAGE_FORMATS[suffix]} image (the extension must match the content)"
        ) from None

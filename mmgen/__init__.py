"""mmgen: unified interleaved text-and-image generation."""

from .segments import Image, Segment, Text, as_segments

__version__ = "0.1.0"

__all__ = ["Image", "Segment", "Text", "as_segments", "__version__"]

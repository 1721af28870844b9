"""Training data: ShapesWorld samples or local interleaved jsonl, turned into packed batches.

Every batch is a pure function of (seed, step, micro-step, process), so a resumed run sees exactly the
batches an unbroken run would have seen, and each process of a multi-process run sees its own.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .compression import VisualCompressor
from .config import TrainArguments, text_forms
from .image_tokenizer import ImageTokenizer
from .segments import Image, Segment, Text
from .stream import EncodedSequence, PackedBatch, StreamCodec, pack_sequences

DEFAULT_TASK_WEIGHTS = {"t2i": 5.0, "i2t": 3.0, "story": 2.0, "edit": 1.0}


def batch_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def drop_image_context(prompt: list[Segment], answer: list[Segment]) -> tuple[list[Segment], list[Segment]]:
    """Classifier-free-guidance variant with no image context: only the last answer image is kept."""
    last = max(i for i, s in enumerate(answer) if isinstance(s, Image))
    prompt = [s for s in prompt if isinstance(s, Text)]
    answer = [s for i, s in enumerate(answer) if isinstance(s, Text) or i == last]
    return prompt, answer


class BatchBuilder:
    """Encodes (prompt, answer) pairs with random compression and CFG dropout, and packs them."""

    def __init__(
        self,
        codec: StreamCodec,
        image_tokenizer: ImageTokenizer,
        compressor: VisualCompressor,
        args: TrainArguments,
    ):
        self.codec = codec
        self.image_tokenizer = image_tokenizer
        self.compressor = compressor
        self.args = args
        for level in args.compression_levels:
            compressor.num_tokens(level)  # rejects unknown levels before training starts

    def build(self, pairs: Sequence[tuple[list[Segment], list[Segment]]], rng: random.Random) -> PackedBatch:
        args = self.args
        prepared = []
        for prompt, answer in pairs:
            has_context_image = any(isinstance(s, Image) for s in prompt) or sum(
                isinstance(s, Image) for s in answer
            ) > 1
            if has_context_image and any(isinstance(s, Image) for s in answer) and rng.random() < args.drop_image_prob:
                prompt, answer = drop_image_context(prompt, answer)
            prepared.append((prompt, answer))
        pixels = [s for prompt, answer in prepared for s in prompt + answer if isinstance(s, Image) and s.latent is None]
        if pixels:
            latents = self.image_tokenizer.encode([s.image for s in pixels]).float().cpu()
            for seg, latent in zip(pixels, latents):
                seg.latent = latent
        encoded: list[EncodedSequence] = []
        for prompt, answer in prepared:
            segments = prompt + answer
            levels = [rng.choice(args.compression_levels) for s in segments if isinstance(s, Image)]
            counts = [self.compressor.num_tokens(level) for level in levels]
            enc = self.codec.encode(segments, counts, answer_start=len(prompt), compressions=levels)
            for span in enc.spans:
                if span.num_queries and rng.random() < args.drop_text_prob:
                    span.drop_text = True
            encoded.append(enc)
        return pack_sequences(encoded, args.max_length, self.codec.ids.pad,
                              weigh_samples_equally=args.text_loss_per == "sample")


class ShapesWorldData:
    """An endless, seeded stream of ShapesWorld batches."""

    def __init__(self, builder: BatchBuilder, args: TrainArguments, process_index: int = 0, image_size: int = 64):
        from .shapesworld import ShapesWorld

        self.builder = builder
        self.args = args
        self.process_index = process_index
        self.image_size = image_size
        weights = args.task_weights or DEFAULT_TASK_WEIGHTS
        self.tasks = list(weights)
        self.weights = [float(weights[t]) for t in self.tasks]
        self.world_cls = ShapesWorld
        self.category_weights = args.category_weights
        if self.category_weights:
            ShapesWorld.check_category_weights(self.category_weights)
        # How the world writes its text; plan lookups are trained, not written, so they are no text form.
        self.world_options = {**text_forms(args), "plan_lookups": args.plan_lookups,
                              "story_plan_lookups": args.story_plan_lookups}
        for name, share in self.world_options.items():
            ShapesWorld.check_share(name, share)

    def batch(self, step: int, micro: int = 0) -> PackedBatch:
        seed = batch_seed(self.args.seed, step, micro, self.process_index)
        world = self.world_cls(seed=seed, size=self.image_size, **self.world_options)
        rng = random.Random(seed)
        pairs = []
        for _ in range(self.args.batch_size):
            sample = world.sample(task=rng.choices(self.tasks, self.weights)[0], category_weights=self.category_weights)
            pairs.append((list(sample.prompt), list(sample.answer)))
        batch = self.builder.build(pairs, rng)
        if self.args.patch_label_weight:
            batch.patch_latents, batch.patch_labels = self.labelled_patches(rng)
        return batch

    def labelled_patches(self, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (K, C, h, w) of `patch_label_images` random scenes and the shape under each patch (K, N)."""
        from .shapesworld import random_scene, render
        from .shapesworld.render import patch_shapes

        tokenizer = self.builder.image_tokenizer
        scenes = [random_scene(rng) for _ in range(self.args.patch_label_images)]
        latents = tokenizer.encode([render(scene, self.image_size) for scene in scenes]).float().cpu()
        labels = np.stack([patch_shapes(scene, tokenizer.grid_size, self.image_size) for scene in scenes])
        return latents, torch.from_numpy(labels).long()


class InterleavedJsonlData:
    """OBELICS/MMC4-style rows, `texts` and `images` lists of equal length with null gaps, via `datasets`.

    Image entries are paths relative to `images_dir`. The whole document is the answer: all its text is
    predicted and all its images are generated.
    """

    def __init__(self, builder: BatchBuilder, args: TrainArguments, process_index: int = 0):
        import datasets

        path = Path(args.data)
        if not path.is_file():
            raise ValueError(f"training data file not found: {path}")
        self.rows = datasets.load_dataset("json", data_files=str(path), split="train")
        for column in ("texts", "images"):
            if column not in self.rows.column_names:
                raise ValueError(f"{path} rows need a '{column}' list; found columns {self.rows.column_names}")
        self.images_dir = Path(args.images_dir) if args.images_dir else path.parent
        self.builder = builder
        self.args = args
        self.process_index = process_index

    def segments(self, row: dict) -> list[Segment]:
        texts, images = row["texts"], row["images"]
        if len(texts) != len(images):
            raise ValueError(f"row has {len(texts)} texts but {len(images)} images; the lists must align")
        out: list[Segment] = []
        for text, image in zip(texts, images):
            if text is not None:
                out.append(Text(text))
            elif image is not None:
                image_path = self.images_dir / image
                if not image_path.is_file():
                    raise ValueError(f"image not found: {image_path}")
                with PIL.Image.open(image_path) as im:
                    out.append(Image(im.convert("RGB")))
        return out

    def batch(self, step: int, micro: int = 0) -> PackedBatch:
        seed = batch_seed(self.args.seed, step, micro, self.process_index)
        rng = random.Random(seed)
        picks = [rng.randrange(len(self.rows)) for _ in range(self.args.batch_size)]
        return self.builder.build([([], self.segments(self.rows[i])) for i in picks], rng)



class BatchStream(torch.utils.data.IterableDataset):
    """The batches of steps `start`, `start + 1`, ... in order, as (step, micro, batch).

    Run through a DataLoader with a worker process, sampling, rendering and VAE encoding overlap with the
    training step; the batches are the same as without the worker.
    """

    def __init__(self, source, start: int, accumulation: int):
        self.source = source
        self.start = start
        self.accumulation = accumulation

    def __iter__(self) -> Iterator[tuple[int, int, PackedBatch]]:
        if torch.utils.data.get_worker_info() is not None:
            torch.set_num_threads(1)
        for step in itertools.count(self.start):
            for micro in range(self.accumulation):
                yield step, micro, self.source.batch(step, micro)


def batch_loader(source, start: int, accumulation: int, workers: int) -> Iterator[tuple[int, int, PackedBatch]]:
    stream = BatchStream(source, start, accumulation)
    if workers == 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=2)
    return iter(loader)

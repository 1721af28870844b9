"""Build the ShapesWorld text tokenizer: byte-level BPE trained on ShapesWorld text.

    python tokenizers/build_text_tokenizer.py --out mmgen/default_model/tokenizer

Byte-level BPE decodes any string back exactly, which the stream's round trip relies on. The special
tokens of the stream are added here and by `mmgen.stream.add_special_tokens` for any other tokenizer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from mmgen.segments import Text
from mmgen.shapesworld import ShapesWorld
from mmgen.stream import DEFAULT_EOS, DEFAULT_PAD, IMAGE_END, IMAGE_PAD, IMAGE_START, add_special_tokens
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def shapesworld_text(n_samples: int, seed: int) -> list[str]:
    """The text of `n_samples` ShapesWorld samples of every task, prompt and answer."""
    world = ShapesWorld(seed=seed)
    texts = []
    for _ in range(n_samples):
        sample = world.sample()
        texts.extend(s.text for s in sample.prompt + sample.answer if isinstance(s, Text))
    return texts


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[DEFAULT_EOS, DEFAULT_PAD, IMAGE_START, IMAGE_END, IMAGE_PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=DEFAULT_EOS, pad_token=DEFAULT_PAD, clean_up_tokenization_spaces=False
    )
    add_special_tokens(tokenizer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="mmgen/default_model/tokenizer")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    texts = shapesworld_text(args.samples, args.seed)
    tokenizer = build_tokenizer(texts, args.vocab_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    lengths = [len(tokenizer(t).input_ids) for t in texts[:2000]]
    print(f"vocab {len(tokenizer)}; mean tokens per text segment {sum(lengths) / len(lengths):.1f}; saved to {out}")


if __name__ == "__main__":
    main()

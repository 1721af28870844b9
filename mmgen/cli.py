"""The `mmgen` command: generate, train, train-drafter, eval, bench, demo, info."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("mmgen")


DTYPE_HELP = "float32 (default) or bfloat16, faster on CPUs with AVX-512 BF16; drafting is exact in float32 only"


def _load_pipeline(model: str | None, dtype: str = "float32"):
    from .pipelines import MMGenPipeline

    return MMGenPipeline.from_pretrained(None if model in (None, "default") else model, dtype=dtype)


def _read_image(path: str):
    from .image_tokenizer import open_image

    return open_image(path)


def add_guidance_options(parser: argparse.ArgumentParser) -> None:
    """Flow steps, guidance and candidates per image; left out, they are the pipeline's defaults."""
    parser.add_argument("--steps", type=int, default=None, help="flow steps per image (default: the pipeline's)")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--image-guidance-scale", type=float, default=None)
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="the range of t (1 = noise) where guidance applies")
    parser.add_argument("--image-candidates", type=int, default=None, metavar="K",
                        help="draw each image K times and keep the one the model reads its text from best "
                             "(default: 1)")


def guidance_options(args: argparse.Namespace) -> dict:
    """The pipeline arguments of the options `add_guidance_options` added, those given only."""
    given = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                 image_guidance_scale=args.image_guidance_scale,
                 cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None,
                 image_candidates=args.image_candidates)
    return {key: value for key, value in given.items() if value is not None}


def cmd_generate(args) -> int:
    import torch

    from .segments import Image, Text

    if not args.prompt.strip() and not args.image:
        raise ValueError("prompt is empty: give some text or an --image")
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is a file")
    images = [_read_image(p) for p in args.image or []]
    prompt = [*images, args.prompt] if args.prompt.strip() else images
    pipe = _load_pipeline(args.model, args.dtype)
    out = pipe(
        prompt,
        max_new_tokens=args.max_new_tokens,
        **guidance_options(args),
        max_images=args.max_images,
        compression=args.compression,
        drafter=args.drafter,
        temperature=args.temperature,
        generator=torch.Generator().manual_seed(args.seed),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    lines, written, k = [], [], 0
    for segment in out.segments[0]:
        if isinstance(segment, Text):
            lines.append(segment.text)
        elif isinstance(segment, Image):
            k += 1
            name = f"image_{k}.png"
            segment.image.save(out_dir / name)
            written.append(out_dir / name)
            lines.append(f"\n\n![image {k}]({name})\n\n")
    markdown = out_dir / "output.md"
    markdown.write_text("".join(lines).strip() + "\n")
    print(f"text: {markdown}")
    for path in written:
        print(f"image: {path}")
    return 0


def cmd_train(args, rest: list[str]) -> int:
    from .config import ModelArguments, TrainArguments, parse_config
    from .training import Trainer

    model_args, train_args = parse_config((ModelArguments, TrainArguments), args.config, rest)
    train_args.recipe = train_args.recipe or args.config
    rows = Trainer(model_args, train_args).train()
    if rows:
        print(json.dumps(rows[-1]))
    return 0


def cmd_train_drafter(args, rest: list[str]) -> int:
    from .draft_training import main as train_drafter_main

    return train_drafter_main(args.config, rest)


def cmd_eval(args, rest: list[str]) -> int:
    if args.suite == "shapesbench":
        from .evals.shapesbench import main as shapesbench_main

        return shapesbench_main(rest)
    from .evals.interleaved import main as interleaved_main

    return interleaved_main(rest)


def cmd_bench(args, rest: list[str]) -> int:
    from .evals.bench import main as bench_main

    return bench_main(rest)


def cmd_demo(args) -> int:
    from .app import launch

    launch(model=args.model, host=args.host, port=args.port, dtype=args.dtype)
    return 0


def cmd_info(args) -> int:
    from .model import count_parameters

    pipe = _load_pipeline(args.model)
    unified = pipe.unified
    info = {
        "backbone": type(pipe.backbone).__name__,
        "backbone_parameters": count_parameters(pipe.backbone),
        "image_modules_parameters": count_parameters(pipe.model),
        "vae": type(pipe.vae).__name__,
        "vae_parameters": count_parameters(pipe.vae),
        "drafter": type(pipe.drafter).__name__ if pipe.drafter is not None else None,
        "vocab_size": len(pipe.tokenizer),
        "image_size": pipe.model.config.image_size,
        "tokens_per_image": unified.image_modules.compressor.num_tokens("none"),
        "num_queries": pipe.model.config.num_queries,
        "context_length": pipe.context_length,
    }
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmgen", description="Unified interleaved text-and-image generation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate interleaved text and images from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--image", action="append", help="an input image (repeatable); images precede the text")
    gen.add_argument("-o", "--output", default="outputs")
    gen.add_argument("--model", default=None, help="a pipeline folder; default: the embedded model")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    add_guidance_options(gen)
    gen.add_argument("--max-images", type=int, default=4)
    gen.add_argument("--compression", default="none")
    gen.add_argument("--drafter", default=None)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", help=DTYPE_HELP)

    train = sub.add_parser("train", help="train a unified model from a YAML config; extra --flags override it")
    train.add_argument("config")

    drafter = sub.add_parser(
        "train-drafter", help="distil a drafter (vision head or draft LM) from the target; extra --flags override"
    )
    drafter.add_argument("config")

    ev = sub.add_parser("eval", help="run an evaluation: shapesbench or interleaved", add_help=False)
    ev.add_argument("suite", choices=["shapesbench", "interleaved"])

    sub.add_parser("bench", help="run the performance benchmark", add_help=False)

    demo = sub.add_parser("demo", help="start the Gradio demo")
    demo.add_argument("--model", default=None)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--dtype", default="float32", help=DTYPE_HELP)

    info = sub.add_parser("info", help="describe a model folder")
    info.add_argument("--model", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Sub-commands with their own parsers (and their own --help) take the remaining arguments unparsed.
    own_parser = {"bench": 1, "eval": 2}
    if argv and argv[0] in own_parser and len(argv) >= own_parser[argv[0]]:
        split = own_parser[argv[0]]
        args, rest = parser.parse_known_args(argv[:split])
        rest = argv[split:]
    else:
        args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "train-drafter", "eval", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = {
        "generate": lambda: cmd_generate(args),
        "train": lambda: cmd_train(args, rest),
        "train-drafter": lambda: cmd_train_drafter(args, rest),
        "eval": lambda: cmd_eval(args, rest),
        "bench": lambda: cmd_bench(args, rest),
        "demo": lambda: cmd_demo(args),
        "info": lambda: cmd_info(args),
    }
    name = f"eval {args.suite}" if args.command == "eval" else args.command
    try:
        return handlers[args.command]()
    except (ValueError, TypeError, OSError) as err:  # bad input, and files or disks that fail
        print(f"mmgen {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmgen {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: one line for users, the traceback with -v
        if args.verbose:
            raise
        print(f"mmgen {name}: internal error: {type(err).__name__}: {err} (run with -v for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

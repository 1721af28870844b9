"""Train the ShapesWorld image tokenizer: a small diffusers AutoencoderKL with a 4× downsampling.

    python tokenizers/train_vae.py --out mmgen/default_model/vae          # train (resumes if interrupted)
    python tokenizers/train_vae.py --out mmgen/default_model/vae --eval   # print PSNR and parser accuracy

A 64×64 RGB image becomes an 8×16×16 latent. The latents are normalised with the scaling and shift
factors stored in the VAE config, so the flow head sees unit-variance targets. The evaluation reports
reconstruction PSNR on held-out scenes and how often the ShapesBench parser reads a reconstruction
exactly as it reads the clean render's scene.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from mmgen.image_tokenizer import ImageTokenizer
from mmgen.shapesworld import parse_image, random_scene, render, scene_matches

IMAGE_SIZE = 64


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def has_small_star(scene) -> bool:
    return any(o.shape == "star" and o.size == "small" for o in scene.objects)


def scenes_and_pixels(n: int, seed: int, small_star_share: float = 0.0) -> tuple[list, torch.Tensor]:
    """`n` random scenes and their renders; `small_star_share` of them hold a small star, the finest
    detail of the world, which a VAE blurs first."""
    rng = random.Random(seed)
    scenes = []
    while len(scenes) < n:
        scene = random_scene(rng)
        if len(scenes) < small_star_share * n and not has_small_star(scene):
            continue
        scenes.append(scene)
    rng.shuffle(scenes)
    arrays = np.stack([np.asarray(render(s, size=IMAGE_SIZE), dtype=np.float32) for s in scenes])
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0
    return scenes, pixels


def edge_weights(pixels: torch.Tensor, strength: float = 8.0) -> torch.Tensor:
    """Per-pixel loss weights that grow with the target's local contrast, so edges are not averaged away."""
    gray = pixels.mean(1, keepdim=True)
    dx = F.pad((gray[..., :, 1:] - gray[..., :, :-1]).abs(), (0, 1, 0, 0))
    dy = F.pad((gray[..., 1:, :] - gray[..., :-1, :]).abs(), (0, 0, 0, 1))
    weights = 1.0 + strength * (dx + dy)
    return weights / weights.mean(dim=(1, 2, 3), keepdim=True)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image, for pixels in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.clamp(-1, 1) - b) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


@torch.no_grad()
def evaluate(vae: AutoencoderKL, n: int = 1000, seed: int = 987654) -> dict:
    """PSNR and parser accuracy of reconstructions on held-out scenes, through the ImageTokenizer path."""
    tokenizer = ImageTokenizer(vae.eval(), image_size=IMAGE_SIZE)
    scenes, pixels = scenes_and_pixels(n, seed)
    psnrs, correct = [], 0
    for start in range(0, n, 100):
        batch = pixels[start : start + 100]
        images = tokenizer.postprocess(batch)
        recon = tokenizer.decode(tokenizer.encode(images))
        psnrs.append(psnr(recon, batch))
        for scene, image in zip(scenes[start : start + 100], tokenizer.postprocess(recon)):
            correct += scene_matches(parse_image(image), scene)
    values = torch.cat(psnrs)
    return {"psnr_db": float(values.mean()), "psnr_db_p5": float(values.quantile(0.05)),
            "parser_accuracy": correct / n, "n": n}


def latent_statistics(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        z = torch.cat([vae.encode(pixels[i : i + 200]).latent_dist.mode() for i in range(0, len(pixels), 200)])
    return float(z.mean()), float(z.std())


def save_atomic(vae: AutoencoderKL, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    vae.save_pretrained(str(tmp), safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def train(args) -> None:
    torch.manual_seed(args.seed)
    out = Path(args.out)
    state_dir = Path(args.work_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    vae = make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    step = 0
    if args.init and not (state_dir / "state.json").is_file():
        # Warm start: every tensor whose shape still matches (all but the latent bottleneck convs).
        own = vae.state_dict()
        loaded = {k: v for k, v in load_file(args.init).items() if k in own and own[k].shape == v.shape}
        vae.load_state_dict(loaded, strict=False)
        print(f"warm start from {args.init}: {len(loaded)}/{len(own)} tensors")
    if (state_dir / "state.json").is_file():
        vae.load_state_dict(load_file(state_dir / "vae.safetensors"))
        step = json.loads((state_dir / "state.json").read_text())["step"]
        opt = load_file(state_dir / "optimizer.safetensors")
        optimizer.load_state_dict(_unflatten_optimizer(optimizer, opt))
        print(f"resumed at step {step}")
    _, pixels = scenes_and_pixels(args.train_images, args.seed, small_star_share=args.small_star_share)
    rng = torch.Generator().manual_seed(args.seed + step)
    started = time.time()
    vae.train()
    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = pixels[torch.randint(len(pixels), (args.batch_size,), generator=rng)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=rng)).sample
        weights = edge_weights(batch)
        rec_loss = (weights * ((recon - batch) ** 2 + 0.5 * (recon - batch).abs())).mean()
        kl = posterior.kl().mean() / batch[0].numel()
        loss = rec_loss + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 50 == 0:
            batch_psnr = float(psnr(recon.detach(), batch).mean())
            print(f"step {step} loss {loss.item():.5f} psnr {batch_psnr:.2f} dB lr {lr:.2e} "
                  f"{(time.time() - started) / 50:.2f}s/step", flush=True)
            started = time.time()
        if step % args.save_every == 0 or step == args.steps:
            save_file(vae.state_dict(), state_dir / "vae.safetensors.tmp")
            os.replace(state_dir / "vae.safetensors.tmp", state_dir / "vae.safetensors")
            save_file(_flatten_optimizer(optimizer), state_dir / "optimizer.safetensors.tmp")
            os.replace(state_dir / "optimizer.safetensors.tmp", state_dir / "optimizer.safetensors")
            (state_dir / "state.json").write_text(json.dumps({"step": step}))
    vae.eval()
    shift, std = latent_statistics(vae, pixels[:2000])
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=shift)
    save_atomic(vae, out)
    print(json.dumps(evaluate(vae)))


def _flatten_optimizer(optimizer) -> dict:
    flat = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            flat[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat


def _unflatten_optimizer(optimizer, flat: dict) -> dict:
    template = optimizer.state_dict()
    state: dict = {}
    for name, value in flat.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    template["state"] = state
    return template


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="mmgen/default_model/vae")
    parser.add_argument("--work-dir", default="runs/vae")
    parser.add_argument("--eval", action="store_true", help="only evaluate the VAE at --out")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small-star-share", type=float, default=0.3)
    parser.add_argument("--init", default=None, help="safetensors weights to warm-start from")
    args = parser.parse_args()
    if args.eval:
        vae = AutoencoderKL.from_pretrained(args.out, use_safetensors=True)
        print(json.dumps(evaluate(vae)))
    else:
        train(args)


if __name__ == "__main__":
    main()

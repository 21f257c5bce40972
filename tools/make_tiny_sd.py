"""Write a tiny Stable-Diffusion-style pipeline folder and captioned images, to try text-to-image training offline.

    python tools/make_tiny_sd.py tiny-sd --images captioned              # pipeline + 32 PNGs with .txt captions
    python tools/make_tiny_sd.py tiny-sd --images captioned --metadata   # captions in metadata.jsonl instead
    python tools/make_tiny_sd.py tiny-sdxl --xl                          # SDXL's layout

The pipeline has SD-1.x's layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) with
components small enough for a CPU; every pase command that takes a real SD checkpoint folder takes it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pase.models.tiny_pipeline import save_captioned_shapes, save_tiny_pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", type=Path, help="folder to write the pipeline to")
    parser.add_argument("--images", type=Path, help="also write captioned images to this folder")
    parser.add_argument("--count", type=int, default=32, help="number of images (default 32)")
    parser.add_argument("--size", type=int, default=16, help="image side in pixels (default 16, the UNet's 8 x 2)")
    parser.add_argument("--metadata", action="store_true", help="captions in metadata.jsonl, not .txt files")
    parser.add_argument("--xl", action="store_true", help="SDXL's layout: two text encoders, pooled embeddings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.pipeline.exists() and any(args.pipeline.iterdir()):
        parser.error(f"{args.pipeline} exists and is not empty; choose another folder")
    save_tiny_pipeline(args.pipeline, seed=args.seed, xl=args.xl)
    parts = "unet, vae, text_encoder, tokenizer, " + ("text_encoder_2, tokenizer_2, " if args.xl else "")
    print(f"wrote {args.pipeline}/ (model_index.json, {parts}scheduler)")
    if args.images is not None:
        save_captioned_shapes(args.images, args.count, args.size, args.seed, args.metadata)
        print(f"wrote {args.count} captioned images to {args.images}/")


if __name__ == "__main__":
    main()

"""The `lampq` command."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _cmd_layers(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from lampq_jax.layers import find_layers, layers_table
    from lampq_jax.models import create_vit

    model = create_vit(args.variant, args.num_classes)
    images = jnp.zeros([1, args.image_size, args.image_size, 3], jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    layers = find_layers(model, variables, images, train=False)
    print(layers_table(layers))
    total = sum(l.num_weights for l in layers)
    print(f"\n{len(layers)} quantizable layers, {total:,} weights, ViT-{args.variant} at {args.image_size}px")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lampq",
        description="LampQ: layer-wise mixed-precision post-training quantization of Vision Transformers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    layers = sub.add_parser("layers", help="build a ViT variant and list its quantizable layers")
    layers.add_argument("--variant", default="S/16", help="ViT variant, e.g. Ti/16, S/16, B/16 (default S/16)")
    layers.add_argument("--num-classes", type=int, default=1000)
    layers.add_argument("--image-size", type=int, default=224)
    layers.set_defaults(func=_cmd_layers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"lampq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

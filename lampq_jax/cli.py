"""The `lampq` command: demo, quantize, evaluate, layers."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


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


def _config(args: argparse.Namespace):
    from lampq_jax.config import LampQConfig

    return LampQConfig(
        candidates=tuple(args.candidates), budget_kind=args.budget_kind, granularity=args.granularity,
        alpha=args.alpha, iterations=args.iterations, probes=args.probes, calibration=args.calibration,
        separate_weight_act_bits=args.separate_wa, seed=args.seed, progress=not args.no_progress,
        metric_check=not args.no_metric_check)


class _Staging:
    """Writes outputs into a temporary folder that replaces `target` only when everything succeeded."""

    def __init__(self, target: Path, overwrite: bool):
        if target.exists() and not overwrite:
            raise FileExistsError(f"output folder {target} exists; pass --overwrite to replace it")
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.target.exists():
            shutil.rmtree(self.target)
        os.replace(self.tmp, self.target)
        return False


def _write_outputs(folder: Path, result, summary_rows) -> None:
    from lampq_jax.report import plot_bits, report_markdown

    result.save(folder / "result")
    allocation = {"method": result.method, "bits": {p: list(b) for p, b in result.bits.items()},
                  "attention_bits": result.attention_bits, "budget": result.report.get("budget"),
                  "avg_weight_bits_allocated": result.report["avg_weight_bits_allocated"]}
    (folder / "allocation.json").write_text(json.dumps(allocation, indent=1))
    (folder / "report.md").write_text(report_markdown(result, summary_rows))
    plot_bits(result, folder / "bits.png")


def _row(name: str, acc: float, report: Optional[dict], seconds: float, fp_bytes: float) -> list[str]:
    if report is None:
        return [name, f"{acc:.2f}", "32", "32", f"{fp_bytes:,.0f}", f"{seconds:.1f}"]
    return [name, f"{acc:.2f}", f"{report['avg_weight_bits_allocated']:.2f}", f"{report['avg_act_bits_allocated']:.2f}",
            f"{report['model_bytes']:,.0f}", f"{seconds:.1f}"]


def _print_table(rows: list[list[str]]) -> None:
    header = ["model", "accuracy %", "avg W bits", "avg A bits", "model bytes", "time s"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def _cmd_demo(args: argparse.Namespace) -> int:
    import jax

    import lampq_jax
    from lampq_jax.data.embedded import load_embedded_model, load_embedded_subset
    from lampq_jax.report import accuracy

    model, variables, config = load_embedded_model()
    data = load_embedded_subset()
    calib = data["calib_images"][: args.num_calib]
    test_x, test_y = data["test_images"], data["test_labels"]
    print(f"embedded model: ViT {config['overrides']} on Fashion-MNIST; {len(calib)} calibration images, "
          f"{len(test_x)} test images; budget {args.budget} bits (weights and activations)")
    fp_apply = jax.jit(lambda x: model.apply(variables, x, train=False))
    start = time.perf_counter()
    fp_acc = accuracy(fp_apply, test_x, test_y)
    fp_time = time.perf_counter() - start
    fp_bytes = 4.0 * sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(variables))
    rows = [_row("full precision", fp_acc, None, fp_time, fp_bytes)]
    uniform_bits = int(round(args.budget))
    start = time.perf_counter()
    uniform = lampq_jax.quantize_uniform(model, variables, calib, uniform_bits, train=False)
    uniform_acc = accuracy(uniform.apply, test_x, test_y)
    rows.append(_row(f"uniform W{uniform_bits}A{uniform_bits}", uniform_acc, uniform.report,
                     time.perf_counter() - start, fp_bytes))
    start = time.perf_counter()
    result = lampq_jax.quantize(model, variables, calib, budget=args.budget, config=_config(args), train=False)
    lampq_acc = accuracy(result.apply, test_x, test_y)
    rows.append(_row(f"LampQ {args.budget:g}MP/{args.budget:g}MP", lampq_acc, result.report,
                     time.perf_counter() - start, fp_bytes))
    print()
    _print_table(rows)
    with _Staging(Path(args.out), overwrite=True) as folder:
        _write_outputs(folder, result, rows)
    print(f"\nwrote {args.out}/report.md, bits.png, allocation.json and the saved result ({args.out}/result)")
    return 0


def load_calibration(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Images [N, H, W, C] float32 (and labels) from an .npz ('images', optional 'labels') or a folder of .npy/.png."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"calibration data {path} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".npy", ".png"))
        if not files:
            raise ValueError(f"calibration folder {path} holds no .npy or .png image")
        images = []
        for f in files:
            if f.suffix.lower() == ".npy":
                images.append(np.load(f))
            else:
                import matplotlib.image as mpimg

                images.append(mpimg.imread(f))
        shapes = {np.shape(i) for i in images}
        if len(shapes) != 1:
            raise ValueError(f"images in {path} have different shapes {sorted(shapes)}")
        arr = np.stack(images).astype(np.float32)
        return (arr[..., None] if arr.ndim == 3 else arr), None
    try:
        with np.load(p) as npz:
            if "images" not in npz.files:
                raise ValueError(f"{path} has no 'images' array (it has {npz.files})")
            images, labels = npz["images"], npz["labels"] if "labels" in npz.files else None
    except (OSError, EOFError, ValueError) as err:
        if "images" in str(err):
            raise
        raise ValueError(f"{path} is not a readable .npz file: {err}") from None
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"{path}: 'images' must be [N, H, W] or [N, H, W, C], got shape {images.shape}")
    return images, labels


def load_model(args: argparse.Namespace):
    """(model, variables) from a Scenic-layout checkpoint (+ model config) or the converters."""
    import flax.serialization

    from lampq_jax.models import create_vit
    from lampq_jax.models import convert

    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    if args.format in ("timm", "huggingface"):
        import torch

        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if args.format == "timm":
            variables, config = convert.from_timm(state, num_heads=args.num_heads)
        else:
            if not args.hf_config:
                raise ValueError("--format huggingface needs --hf-config (the model's config.json)")
            variables, config = convert.from_huggingface(state, json.loads(Path(args.hf_config).read_text()))
        return convert.build_model(config), variables
    if not args.model_config:
        raise ValueError("a Scenic-layout checkpoint needs --model-config (JSON of create_vit / ViT arguments)")
    cfg = json.loads(Path(args.model_config).read_text())
    if "variant" in cfg:
        model = create_vit(cfg["variant"], cfg.get("num_classes"), **cfg.get("overrides", {}))
    else:
        model = convert.build_model(cfg)
    if ckpt.suffix == ".npz":
        variables, _ = convert.from_augreg_npz(str(ckpt))
    else:
        raw = flax.serialization.msgpack_restore(ckpt.read_bytes())
        variables = raw if "params" in raw else {"params": raw}
    return model, variables


def _cmd_quantize(args: argparse.Namespace) -> int:
    import lampq_jax

    images, labels = load_calibration(args.calib)
    images = images[: args.num_calib]
    labels = None if labels is None or not args.use_labels else labels[: args.num_calib]
    model, variables = load_model(args)
    with _Staging(Path(args.out), overwrite=args.overwrite) as folder:
        result = lampq_jax.quantize(model, variables, images, budget=args.budget, labels=labels,
                                    config=_config(args), train=False)
        _write_outputs(folder, result, ())
    print(f"bits per layer (avg {result.report['avg_weight_bits_allocated']:.3f} on allocated layers):")
    for path, (wb, ab) in result.bits.items():
        print(f"  W{wb}A{ab}  {path}")
    print(f"wrote {args.out}/allocation.json, report.md, bits.png, result/")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import lampq_jax
    from lampq_jax.report import accuracy

    images, labels = load_calibration(args.data)
    if labels is None:
        raise ValueError(f"{args.data} has no 'labels' array to evaluate against")
    result = lampq_jax.load_result(args.result)
    print(f"accuracy of {args.result} on {len(images)} images: {accuracy(result.apply, images, labels):.2f} %")
    return 0


def _add_method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=float, default=4.0, help="average bits (default 4)")
    p.add_argument("--budget-kind", default="avg_bits", choices=["avg_bits", "bops", "model_bytes"])
    p.add_argument("--candidates", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    p.add_argument("--granularity", default="layer", choices=["layer", "module"])
    p.add_argument("--alpha", default="probe", choices=["probe", "mean", "none"])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--calibration", default="mse", choices=["mse", "percentile", "minmax"])
    p.add_argument("--separate-wa", action="store_true", help="separate weight and activation bits")
    p.add_argument("--num-calib", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-metric-check", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lampq",
        description="LampQ: layer-wise mixed-precision post-training quantization of Vision Transformers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="quantize the embedded Fashion-MNIST ViT: FP vs uniform vs LampQ")
    _add_method_options(demo)
    demo.add_argument("--out", default="lampq_demo", help="output folder (replaced)")
    demo.set_defaults(func=_cmd_demo)

    quant = sub.add_parser("quantize", help="quantize a Scenic-layout / timm / Hugging Face checkpoint")
    quant.add_argument("--checkpoint", required=True, help=".msgpack or .npz (Scenic layout), or a torch file")
    quant.add_argument("--format", default="scenic", choices=["scenic", "timm", "huggingface"])
    quant.add_argument("--model-config", help="JSON: {'variant', 'num_classes', 'overrides'} or ViT fields")
    quant.add_argument("--num-heads", type=int, help="attention heads (timm)")
    quant.add_argument("--hf-config", help="config.json of a Hugging Face model")
    quant.add_argument("--calib", required=True, help=".npz with 'images' (and 'labels'), or a folder of images")
    quant.add_argument("--use-labels", action="store_true", help="empirical Fisher and cross-entropy objective")
    quant.add_argument("--out", required=True)
    quant.add_argument("--overwrite", action="store_true")
    _add_method_options(quant)
    quant.set_defaults(func=_cmd_quantize)

    ev = sub.add_parser("evaluate", help="accuracy of a saved result on a labelled .npz")
    ev.add_argument("--result", required=True, help="folder written by quantize (…/result)")
    ev.add_argument("--data", required=True, help=".npz with 'images' and 'labels'")
    ev.set_defaults(func=_cmd_evaluate)

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
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"lampq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Human-readable outputs of a run: a markdown report, a bits-per-layer plot, accuracy evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from lampq_jax.apply.calibration import batches
from lampq_jax.apply.data_parallel import resolve_mesh
from lampq_jax.layers.coverage import coverage_lines
from lampq_jax.layers.types import LAYER_TYPES
from lampq_jax.result import QuantizationResult

TYPE_COLOURS = {
    "qkv": "#4C72B0",
    "proj": "#55A868",
    "fc1": "#C44E52",
    "fc2": "#8172B2",
    "embed": "#937860",
    "head": "#DA8BC3",
    "other": "#8C8C8C",
}


def accuracy(
    apply_fn: Callable[[jax.Array], jax.Array],
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int = 500,
    mesh: Optional[Mesh] = None,
) -> float:
    """Top-1 accuracy in percent of `apply_fn(images [B, ...]) -> logits [B, classes]`, each batch split over
    `mesh` (None: all of `jax.devices()`; `lampq_jax.apply.data_parallel`)."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    correct = 0
    for start, batch in zip(
        range(0, len(images), batch_size), batches(np.asarray(images), batch_size, resolve_mesh(mesh))
    ):
        logits = apply_fn(batch)
        correct += int(np.sum(np.argmax(np.asarray(logits), -1) == labels[start : start + batch_size]))
    return 100.0 * correct / len(images)


def short_path(path: str) -> str:
    """'Transformer/encoderblock_3/MlpBlock_0/Dense_0' → 'b3/MlpBlock_0/Dense_0'."""
    return path.replace("Transformer/encoderblock_", "b").replace("MultiHeadDotProductAttention_0", "attn")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _bits_range(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}–{high}"


def type_rows(result: QuantizationResult) -> list[list[str]]:
    """One row per layer type present: type, layers, |W|, weight bits and activation bits (min–max)."""
    rows = []
    for t in LAYER_TYPES:
        layers = [l for l in result.quantized.layers if l.type == t]
        if layers:
            bits = [result.bits[l.path] for l in layers]
            rows.append(
                [
                    t,
                    str(len(layers)),
                    f"{sum(l.num_weights for l in layers):,}",
                    _bits_range([b[0] for b in bits]),
                    _bits_range([b[1] for b in bits]),
                ]
            )
    return rows


def coverage_markdown(result: QuantizationResult) -> list[str]:
    """The 'What was quantized' section: layers by type with their bits, 'other' layers, attention, rules."""
    parts = [
        "## What was quantized",
        "",
        markdown_table(["type", "layers", "\\|W\\|", "weight bits", "activation bits"], type_rows(result)),
        "",
    ]
    coverage = result.report.get("coverage")
    if coverage is not None:
        parts += [f"- {line}" for line in coverage_lines(coverage)]
        if coverage["attention_sites"]:
            bits = sorted(set(result.attention_bits.values()))
            parts.append(
                f"- attention matmul inputs at {', '.join(map(str, bits))} bits (softmax output: log quantizer)"
            )
    if "preprocessing" in result.report:
        parts.append(f"- preprocessing of the calibration images: {result.report['preprocessing']}")
    return parts + [""]


def zero_shot_markdown(settings: dict) -> list[str]:
    """The 'Zero-shot calibration' section: how the images were synthesized, and their grid."""
    keys = (
        "num_images",
        "image_shape",
        "steps",
        "lr",
        "entropy_weight",
        "ce_weight",
        "tv_weight",
        "jitter",
        "flip",
        "pixel_range",
        "output",
        "seed",
    )
    return [
        "## Zero-shot calibration",
        "",
        f"The calibration images were synthesized from the full-precision model in {settings['seconds']:.1f} s "
        "(METHOD.md §7): " + ", ".join(f"{k} {settings[k]}" for k in keys if k in settings) + ".",
        "",
        "![synthesized calibration images](zero_shot_images.png)",
        "",
    ]


def qat_markdown(qat: dict) -> list[str]:
    """The 'Quantization-aware fine-tuning' section: steps, optimizer, data, loss before and after."""
    line = f"{qat['steps']} steps"
    if "optimizer" in qat:
        line += (
            f" of {qat['optimizer']}, batch {qat['batch_size']} of {qat['images']} images, distillation loss "
            f"{qat['loss_first']:.4g} → {qat['loss_last']:.4g}, {qat['seconds']:.1f} s"
        )
    if "best_step" in qat:
        line += (
            f"; kept the weights of step {qat['best_step']} (lowest distillation loss on "
            f"{qat['validation_images']} validation images; step 0 is the PTQ model)"
        )
    return [
        "## Quantization-aware fine-tuning",
        "",
        f"After allocation, the weights were fine-tuned on their fixed grids with straight-through gradients "
        f"(`lampq_jax.qat`): {line}. Bits and activation ranges are unchanged.",
        "",
    ]


def report_markdown(result: QuantizationResult, summary_rows: Sequence[Sequence[Any]] = ()) -> str:
    """The run's report (METHOD.md §9): summary, what was quantized, per-layer table, iterations, timings."""
    r = result.report
    parts = [f"# LampQ report ({result.method})", ""]
    if summary_rows:
        parts += [
            markdown_table(["model", "accuracy %", "avg W bits", "avg A bits", "model bytes", "time s"], summary_rows),
            "",
        ]
    parts += [
        f"- average weight bits: {r['avg_weight_bits']:.3f} (allocated layers {r['avg_weight_bits_allocated']:.3f})",
        f"- average activation bits: {r['avg_act_bits']:.3f} (allocated layers {r['avg_act_bits_allocated']:.3f})",
        f"- model bytes: {r['model_bytes']:,.0f} of {r['fp32_bytes']:,.0f} in float32 "
        f"({r['model_bytes'] / r['fp32_bytes']:.3f})",
        f"- BOPs per example: {r['bops']:.4g} ({r['bops'] / r['fp_bops']:.4f} of 32-bit)",
    ]
    if "alpha" in r:
        objective = f" {r['objective']}" if "objective" in r else ""
        split = r.get("J_images")
        held = (
            f" on {split['J']} held-out images, fitted on {split['fit']}"
            if split and r["config"].get("holdout")
            else ""
        )
        parts.append(
            f"- budget: {r['budget']} ({r['budget_kind']}); Fisher: {r['fisher']}; calibration objective"
            f"{objective} J = {r['J']:.5f} (round {r['best_round']}){held}"
        )
        probed_at = f" (probes at {r['probe_bits']} bits)" if r.get("probe_bits") else ""
        parts.append("- α per type" + probed_at + ": " + ", ".join(f"{t} {a:.3g}" for t, a in r["alpha"].items()))
        if r.get("spearman"):
            parts.append(
                "- metric check, Spearman(Ω(b_low), measured ΔL): "
                + ", ".join(f"α={m}: {v:.3f}" for m, v in r["spearman"].items())
            )
    parts += ["", *coverage_markdown(result)]
    if "zero_shot" in r:
        parts += zero_shot_markdown(r["zero_shot"])
    if "qat" in r:
        parts += qat_markdown(r["qat"])
    if "alpha" in r:
        cands = list(r["layers"][0]["omega"]) if r["layers"] else []
        rows = [
            [
                short_path(l["path"]),
                l["type"],
                f"{l['num_weights']:,}",
                f"{l['macs']:,}",
                f"{l['fisher_w']:.3g}",
                f"{l['fisher_a']:.3g}",
                f"{l['alpha']:.3g}",
                *[f"{l['omega'][c]:.3g}" for c in cands],
                "W{}A{}".format(*l["bits"]),
            ]
            for l in r["layers"]
        ]
        parts += [
            "## Layers",
            "",
            markdown_table(
                ["layer", "type", "\\|W\\|", "MACs", "tr F^W", "tr F^A", "α", *[f"Ω({c})" for c in cands], "bits"], rows
            ),
        ]
        hist = [
            [
                h["round"],
                f"{h['J']:.5f}",
                h["ilp_status"],
                "—" if h["ilp_objective"] is None else f"{h['ilp_objective']:.4g}",
                " ".join(str(b[0]) for b in h["bits"].values()),
            ]
            for h in r["history"]
        ]
        parts += [
            "",
            "## Iterations",
            "",
            markdown_table(["round", "J", "ILP", "objective", "bits in layer order"], hist),
        ]
    parts += [
        "",
        "## Timings (s)",
        "",
        markdown_table(["stage", "seconds"], [[k, f"{v:.2f}"] for k, v in result.timings.items()]),
    ]
    return "\n".join(parts) + "\n"


def plot_bits(result: QuantizationResult, path: str | Path) -> Path:
    """Saves a PNG: bits per layer coloured by type (top) and the Fisher metric Ω at the lowest candidate per layer (bottom)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'lampq_jax[plot]'") from err
    layers = [l for l in result.quantized.layers]
    bits = [result.bits[l.path][0] for l in layers]
    colours = [TYPE_COLOURS.get(l.type, "#8C8C8C") for l in layers]
    rows = {row["path"]: row for row in result.report.get("layers", [])}
    fig, axes = plt.subplots(
        2 if rows else 1, 1, figsize=(max(8, 0.22 * len(layers)), 6 if rows else 3.5), sharex=True, squeeze=False
    )
    ax = axes[0, 0]
    ax.bar(range(len(layers)), bits, color=colours)
    ax.set_ylabel("weight / activation bits")
    ax.set_yticks([2, 3, 4, 5, 6, 8])
    ax.set_title(
        f"{result.method}: bits per layer (avg {result.report['avg_weight_bits_allocated']:.2f} on allocated layers)"
    )
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=c) for t, c in TYPE_COLOURS.items() if any(l.type == t for l in layers)
    ]
    ax.legend(
        handles, [t for t in TYPE_COLOURS if any(l.type == t for l in layers)], ncol=7, fontsize=8, loc="upper right"
    )
    if rows:
        ax2 = axes[1, 0]
        low = min(int(c) for c in next(iter(rows.values()))["omega"])
        omega = [rows[l.path]["omega"][str(low)] if l.path in rows else np.nan for l in layers]
        ax2.bar(range(len(layers)), omega, color=colours)
        ax2.set_yscale("log")
        ax2.set_ylabel(f"Ω at {low} bits")
    last = axes[-1, 0]
    last.set_xticks(range(len(layers)))
    last.set_xticklabels([short_path(l.path) for l in layers], rotation=90, fontsize=6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
    """[rows·H, columns·W, C] mosaic of images [N, H, W, C], each scaled to [0, 1] by its own min and max."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {images.shape}")
    low = images.min(axis=(1, 2, 3), keepdims=True)
    high = images.max(axis=(1, 2, 3), keepdims=True)
    images = (images - low) / np.maximum(high - low, 1e-12)
    n, h, w, c = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = np.ones([rows * h, columns * w, c], np.float32)
    for i, image in enumerate(images):
        r, k = divmod(i, columns)
        grid[r * h : (r + 1) * h, k * w : (k + 1) * w] = image
    return grid


def plot_image_grid(images: np.ndarray, path: str | Path, columns: int = 8) -> Path:
    """Saves the `image_grid` of images [N, H, W, C] as a PNG (e.g. the zero-shot calibration images)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'lampq_jax[plot]'") from err
    grid = image_grid(images, columns)
    fig, ax = plt.subplots(
        figsize=(min(12, 1.2 * grid.shape[1] / images.shape[2]), min(12, 1.2 * grid.shape[0] / images.shape[1]))
    )
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray" if grid.shape[-1] == 1 else None)
    ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

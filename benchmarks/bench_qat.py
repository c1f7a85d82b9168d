"""Quantization-aware fine-tuning after LampQ (`lampq_jax.qat`) against PTQ LampQ, on the embedded ViT.

For each budget (average weight bits, W/A tied) and seed: LampQ on 32 calibration images drawn by the
seed from the 256 embedded ones (PTQ), then `qat.finetune` of that result: distillation (KL to the FP
logits) on `--train` Fashion-MNIST training images (no labels), Adam, keeping the weights with the
lowest distillation loss on the first 500 embedded validation images (step 0 = PTQ among them).
Test accuracy on the 2,000 embedded test images (disjoint from both).

    python benchmarks/bench_qat.py [--budgets 4 3 2.5] [--seeds 0 1 2] [--steps 300] [--lr 1e-4] [--batch 32]
        [--train 4096]
    python benchmarks/bench_qat.py --parts real_vit [--vit-budget 3 --vit-steps 30 --vit-batch 8 --vit-train 240]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import batched, write_json, write_section  # noqa: E402

import lampq_jax  # noqa: E402
from lampq_jax.data.embedded import load_embedded_model, load_embedded_subset, normalize_embedded  # noqa: E402
from lampq_jax.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from lampq_jax.qat import finetune  # noqa: E402
from lampq_jax.sensitivity.objective import kl_objective  # noqa: E402


def logits_of(result, images: np.ndarray) -> np.ndarray:
    return batched(lambda x: result.apply(x, train=False), images, 500)


def accuracy(result, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits_of(result, images).argmax(-1) == labels) * 100)


def rows_for(args) -> tuple[list[dict], float]:
    model, variables, _ = load_embedded_model()
    data = load_embedded_subset()
    pool, test_x, test_y = data["calib_images"], data["test_images"], data["test_labels"]
    validation = data["val_images"][:500]
    train = normalize_embedded(load_fashion_mnist("train")[0][: args.train])
    fp = float(np.mean(np.asarray(model.apply(variables, test_x, train=False)).argmax(-1) == test_y) * 100)
    config = lampq_jax.LampQConfig(metric_check=False, progress=False)
    teacher = np.asarray(model.apply(variables, train[:1024], train=False))
    rows = []
    for budget in args.budgets:
        for seed in args.seeds:
            calib = pool[np.sort(np.random.default_rng(seed).choice(len(pool), 32, replace=False))]
            start = time.perf_counter()
            ptq = lampq_jax.quantize(model, variables, calib, budget=budget, config=config, train=False)
            ptq_seconds = time.perf_counter() - start
            schedule = {"steps": args.steps, "batch_size": args.batch, "learning_rate": args.lr, "seed": seed}
            tuned = finetune(ptq, variables, train, **schedule, validation=validation, progress=False, train=False)
            rows.append(
                {
                    "budget": budget,
                    "seed": seed,
                    "ptq": accuracy(ptq, test_x, test_y),
                    "qat": accuracy(tuned, test_x, test_y),
                    "ptq_seconds": ptq_seconds,
                    "qat_seconds": tuned.report["qat"]["seconds"],
                    "best_step": tuned.report["qat"]["best_step"],
                    "kl_ptq": float(kl_objective(logits_of(ptq, train[:1024]), teacher)),
                    "kl_qat": float(kl_objective(logits_of(tuned, train[:1024]), teacher)),
                }
            )
            print(rows[-1], flush=True)
    return rows, fp


def real_vit_part(args) -> dict:
    """DINOv2-S/14 at `--vit-budget`: LampQ (features, cosine) on 16 photo crops (PTQ), then QAT by 1 − cos
    distillation to the FP tokens on `--vit-train` Fashion-MNIST training images at 224² (unlabelled; the
    probe's domain, disjoint from its test images), keeping the best step on the 16 calibration crops.
    Class-token cosine on 32 held-out crops and the linear probe's accuracy on `--probe-test` test images."""
    import jax

    from bench_real_vit import PROBE_FILE, fmnist_224, probe_accuracy
    from lampq_jax.data.photos import photo_crops
    from lampq_jax.models.dinov2_onnx import load_dinov2_s14, normalize_imagenet
    from lampq_jax.sensitivity.objective import cosine_objective

    model, variables = load_dinov2_s14()
    fp_fn = jax.jit(lambda x: model.apply(variables, x, train=False))
    evaluation = normalize_imagenet(photo_crops("evaluation", 32, 224))
    calib = normalize_imagenet(photo_crops("calibration", 16, 224))
    with np.load(PROBE_FILE) as f:
        probe = {k: f[k] for k in f.files}
    train = fmnist_224(load_fashion_mnist("train")[0][-args.vit_train :])
    test_x, test_y = load_fashion_mnist("test")
    test_x, test_y = fmnist_224(test_x[: args.probe_test]), test_y[: args.probe_test]

    def figures(fn):
        return {
            "cosine": 1 - float(cosine_objective(batched(fn, evaluation, 16), batched(fp_fn, evaluation, 16))),
            "probe": probe_accuracy(probe, batched(fn, test_x, 16), test_y),
        }

    config = lampq_jax.LampQConfig(output="features", metric_check=False, progress=False)
    start = time.perf_counter()
    ptq = lampq_jax.quantize(
        model, variables, calib, budget=args.vit_budget, config=config, objective="cosine", train=False
    )
    ptq_seconds = time.perf_counter() - start
    schedule = {"steps": args.vit_steps, "batch_size": args.vit_batch, "learning_rate": args.lr, "eval_every": 10}
    tuned = finetune(ptq, variables, train, **schedule, validation=calib, progress=True, train=False)
    record = {
        "budget": args.vit_budget,
        "fp_probe": probe_accuracy(probe, batched(fp_fn, test_x), test_y),
        "ptq": figures(jax.jit(lambda x: ptq.apply(x, train=False))),
        "qat": figures(jax.jit(lambda x: tuned.apply(x, train=False))),
        "ptq_seconds": ptq_seconds,
        "qat_seconds": tuned.report["qat"]["seconds"],
        "best_step": tuned.report["qat"]["best_step"],
        "validation_loss": tuned.report["qat"]["validation_loss"],
    }
    print(record, flush=True)
    return record


def real_vit_section(r: dict, args) -> str:
    return (
        f"## Quantization-aware fine-tuning after LampQ, real ViT DINOv2-S/14 at {r['budget']:g}MP\n\n"
        "PTQ: LampQ (features, cosine objective, metric check off) on 16 photo crops. QAT: "
        f"`lampq_jax.qat.finetune`, {args.vit_steps} steps of optax.adam({args.lr:g}), batch {args.vit_batch}, "
        f"1 − cos distillation to the FP tokens on {args.vit_train} Fashion-MNIST training images at 224² "
        f"(no labels), keeping the step (0 = PTQ, then every 10) with the lowest loss on the 16 calibration "
        f"crops (kept: step {r['best_step']}). One seed: a CPU allows no more.\n\n"
        "| model | class-token cosine to FP (32 held-out crops) | linear-probe accuracy % "
        f"({args.probe_test} test images; FP {r['fp_probe']:.2f}) | seconds |\n|---|---:|---:|---:|\n"
        f"| PTQ LampQ | {r['ptq']['cosine']:.4f} | {r['ptq']['probe']:.2f} | {r['ptq_seconds']:.0f} |\n"
        f"| LampQ + QAT | {r['qat']['cosine']:.4f} | {r['qat']['probe']:.2f} | {r['qat_seconds']:.0f} (QAT) |"
    )


def table(rows: list[dict], budgets: list[float]) -> list[str]:
    """Per budget: PTQ and QAT accuracy (mean ± std over seeds), their difference, and the goal."""
    lines = [
        "| budget | PTQ LampQ | LampQ + QAT | QAT − PTQ (per seed) | goal | kept step (per seed) "
        "| KL to FP, 1,024 training images, PTQ → QAT | QAT s |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for budget in budgets:
        sel = [r for r in rows if r["budget"] == budget]
        ptq, qat = np.array([r["ptq"] for r in sel]), np.array([r["qat"] for r in sel])
        diff = qat - ptq
        goal_min = 1.0 if budget < 4 else 0.0
        verdict = "met" if diff.mean() >= goal_min else "not met"
        goal = f"≥ +{goal_min:g} ({verdict})" if budget < 4 else f"≥ 0 ({verdict})"
        kl = f"{np.mean([r['kl_ptq'] for r in sel]):.4f} → {np.mean([r['kl_qat'] for r in sel]):.4f}"
        lines.append(
            f"| {budget:g} | {ptq.mean():.2f} ± {ptq.std():.2f} | {qat.mean():.2f} ± {qat.std():.2f} | "
            f"{diff.mean():+.2f} ({', '.join(f'{d:+.2f}' for d in diff)}) | {goal} | "
            f"{', '.join(str(r['best_step']) for r in sel)} | {kl} | "
            f"{np.mean([r['qat_seconds'] for r in sel]):.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[4.0, 3.0, 2.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train", type=int, default=4096, help="Fashion-MNIST training images to distil on")
    parser.add_argument("--parts", nargs="+", default=["embedded"], choices=["embedded", "real_vit"])
    parser.add_argument("--vit-budget", type=float, default=3.0)
    parser.add_argument("--vit-steps", type=int, default=30)
    parser.add_argument("--vit-batch", type=int, default=8)
    parser.add_argument("--vit-train", type=int, default=240)
    parser.add_argument("--probe-test", type=int, default=300)
    args = parser.parse_args()
    command = " ".join(["python benchmarks/bench_qat.py", *sys.argv[1:]])
    if "real_vit" in args.parts:
        start = time.perf_counter()
        record = real_vit_part(args)
        total = time.perf_counter() - start
        write_section("bench_qat_real_vit", real_vit_section(record, args) + f"\n\nWhole part: {total:.0f} s.", command)
        write_json("qat_real_vit.json", {**record, "seconds": total, "args": vars(args)})
    if "embedded" not in args.parts:
        return
    start = time.perf_counter()
    rows, fp = rows_for(args)
    total = time.perf_counter() - start
    body = (
        f"## Quantization-aware fine-tuning after LampQ, embedded Fashion-MNIST ViT: test accuracy (%), "
        f"2,000 images; FP {fp:.2f} %\n\n"
        f"PTQ: LampQ (metric check off) on 32 calibration images drawn per seed. QAT: `lampq_jax.qat.finetune`, "
        f"{args.steps} steps of optax.adam({args.lr:g}), batch {args.batch}, distillation (KL to the FP logits) "
        f"on {args.train} Fashion-MNIST training images, no labels; weights on their fixed PTQ grids, "
        f"activation ranges unchanged; the weights kept are those of the step (0 = PTQ, then every 50) with "
        f"the lowest KL on 500 embedded validation images. {len(args.seeds)} seeds (mean ± std).\n\n"
        + "\n".join(table(rows, args.budgets))
        + f"\n\nWhole run: {total:.0f} s."
    )
    write_section("bench_qat", body, command)
    write_json("qat.json", {"rows": rows, "fp_accuracy": fp, "seconds": total, "args": vars(args)})


if __name__ == "__main__":
    main()

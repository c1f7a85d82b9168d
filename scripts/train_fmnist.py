"""Trains the embedded default model: a small Scenic-layout ViT on Fashion-MNIST (CPU-friendly).

The last 5,000 training images are held out (never trained on); the calibration set (256) and a
validation split (2,000) are drawn from them. Writes, into --out (default: the package's assets):

    fmnist_vit.msgpack   flax.serialization.to_bytes({"params": params})
    fmnist_vit.json      architecture, normalisation, accuracy, training settings, class names
    fmnist_subset.npz    uint8 calib/val (held-out train) and test (2,000) images with labels

Usage:
    python scripts/train_fmnist.py --epochs 12 --batch-size 128 --lr 2e-3 --seed 0   # the shipped model
    python scripts/train_fmnist.py --epochs 1 --max-steps 50 --out /tmp/fmnist   # timing run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lampq_jax.data.fashion_mnist import CLASS_NAMES, MEAN, STD, load_fashion_mnist
from lampq_jax.models import create_vit

ASSETS = Path(__file__).resolve().parents[1] / "lampq_jax" / "assets"
HOLDOUT = 5000
N_CALIB = 256
N_VAL = 2000
N_TEST_SUBSET = 2000


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of AdamW")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--variant", default="Ti/7")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--mlp-dim", type=int, default=256)
    p.add_argument("--patch", type=int, default=7)
    p.add_argument("--pad", type=int, default=0, help="random-crop padding in pixels (0: no crop)")
    p.add_argument("--no-flip", action="store_true", help="disable random horizontal flips")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (timing runs)")
    p.add_argument("--eval-batch", type=int, default=1000)
    return p.parse_args()


def augment(images: jax.Array, rng: jax.Array, pad: int, flip: bool) -> jax.Array:
    """Random crop with zero padding (in normalised space: the background value) and h-flip.

    images: [batch, 28, 28, 1] float32, normalised.
    """
    n, h, w, c = images.shape
    crop_rng, flip_rng = jax.random.split(rng)
    if pad > 0:
        background = (0.0 - MEAN) / STD
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=background)
        offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * pad + 1)
        images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
    if flip:
        do_flip = jax.random.bernoulli(flip_rng, 0.5, (n, 1, 1, 1))
        images = jnp.where(do_flip, images[:, :, ::-1, :], images)
    return images


def to_float(images_uint8: jax.Array) -> jax.Array:
    return (images_uint8.astype(jnp.float32) / 255.0 - MEAN) / STD


def main() -> None:
    args = parse_args()
    t_start = time.time()
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    fit_x, fit_y = train_x[:-HOLDOUT], train_y[:-HOLDOUT]
    hold_x, hold_y = train_x[-HOLDOUT:], train_y[-HOLDOUT:]

    overrides = dict(
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        mlp_dim=args.mlp_dim,
        patch_size=[args.patch, args.patch],
    )
    model = create_vit(args.variant, 10, **{**overrides, "patch_size": tuple(overrides["patch_size"])})
    rng = jax.random.key(args.seed)
    init_rng, rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros([1, 28, 28, 1]), train=False)["params"]
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    print(f"model {args.variant} {overrides}: {n_params:,} parameters", flush=True)

    steps_per_epoch = len(fit_x) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = max(1, min(int(args.warmup_epochs * steps_per_epoch), total_steps // 2))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=args.lr,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=args.lr * 1e-3,
    )
    # No weight decay on biases, LayerNorm scales, cls and position embeddings.
    decay_mask = jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and "pos_embedding" not in jax.tree_util.keystr(path), params
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=args.weight_decay, mask=decay_mask),
    )
    opt_state = tx.init(params)
    flip = not args.no_flip

    @jax.jit
    def train_step(params, opt_state, images_u8, labels, step_rng):
        images = augment(to_float(images_u8), step_rng, args.pad, flip)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, 10), args.label_smoothing)

        def loss_fn(p):
            logits = model.apply({"params": p}, images, train=True)
            return optax.softmax_cross_entropy(logits, targets).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def predict(params, images_u8):
        return jnp.argmax(model.apply({"params": params}, to_float(images_u8), train=False), -1)

    def accuracy(params, x, y) -> float:
        preds = np.concatenate(
            [np.asarray(predict(params, x[i : i + args.eval_batch])) for i in range(0, len(x), args.eval_batch)]
        )
        return float(np.mean(preds == y))

    # Calibration and validation from the held-out training images; a fixed test subset.
    sub_rng = np.random.default_rng(1234)
    hold_perm = sub_rng.permutation(HOLDOUT)
    calib_idx = np.sort(hold_perm[:N_CALIB])
    val_idx = np.sort(hold_perm[N_CALIB : N_CALIB + N_VAL])
    test_idx = np.sort(sub_rng.permutation(len(test_x))[:N_TEST_SUBSET])

    def save(params, test_acc: float, epochs_completed: int, seconds: float) -> None:
        """Writes checkpoint, config and subset (after every epoch, so a stopped run leaves a usable model)."""
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fmnist_vit.msgpack").write_bytes(flax.serialization.to_bytes({"params": jax.device_get(params)}))
        config = {
            "variant": args.variant,
            "num_classes": 10,
            "overrides": overrides,
            "image_shape": [28, 28, 1],
            "normalization": {"mean": MEAN, "std": STD},
            "test_accuracy": test_acc,
            "num_parameters": n_params,
            "train": {
                "epochs": args.epochs,
                "batch": args.batch_size,
                "lr": args.lr,
                "seed": args.seed,
                "epochs_completed": epochs_completed,
                "seconds": round(seconds, 1),
                "weight_decay": args.weight_decay,
                "label_smoothing": args.label_smoothing,
                "warmup_epochs": args.warmup_epochs,
                "augmentation": {"crop_pad": args.pad, "hflip": flip},
                "train_images": f"train[:{len(fit_x)}]",
                "held_out": f"train[{len(fit_x)}:]",
            },
            "class_names": list(CLASS_NAMES),
        }
        (args.out / "fmnist_vit.json").write_text(json.dumps(config, indent=2) + "\n")

        np.savez_compressed(
            args.out / "fmnist_subset.npz",
            calib_images=hold_x[calib_idx],
            calib_labels=hold_y[calib_idx].astype(np.uint8),
            val_images=hold_x[val_idx],
            val_labels=hold_y[val_idx].astype(np.uint8),
            test_images=test_x[test_idx],
            test_labels=test_y[test_idx].astype(np.uint8),
            calib_indices=(len(fit_x) + calib_idx).astype(np.int32),
            val_indices=(len(fit_x) + val_idx).astype(np.int32),
            test_indices=test_idx.astype(np.int32),
        )

    np_rng = np.random.default_rng(args.seed)
    step = 0
    t_train = time.time()
    test_acc = float("nan")
    for epoch in range(args.epochs):
        t_epoch = time.time()
        perm = np_rng.permutation(len(fit_x))
        losses = []
        for i in range(steps_per_epoch):
            idx = np.sort(perm[i * args.batch_size : (i + 1) * args.batch_size])
            rng, step_rng = jax.random.split(rng)
            params, opt_state, loss = train_step(params, opt_state, fit_x[idx], fit_y[idx], step_rng)
            losses.append(loss)
            step += 1
            if step == 5:
                jax.block_until_ready(loss)
                t5 = time.time()
            if args.max_steps and step >= args.max_steps:
                break
        mean_loss = float(np.mean(jax.device_get(losses)))
        train_seconds = time.time() - t_epoch
        if args.max_steps and step >= args.max_steps:
            per_step = (time.time() - t5) / max(1, step - 5)
            print(
                f"timing: {per_step * 1000:.0f} ms/step at batch {args.batch_size} -> "
                f"{per_step * steps_per_epoch:.0f} s/epoch ({steps_per_epoch} steps)",
                flush=True,
            )
        t_eval = time.time()
        test_acc = accuracy(params, test_x, test_y)
        val_acc = accuracy(params, hold_x, hold_y)
        print(
            f"epoch {epoch + 1}/{args.epochs}  loss {mean_loss:.4f}  test acc {test_acc:.4f}  "
            f"held-out acc {val_acc:.4f}  train {train_seconds:.0f}s  eval {time.time() - t_eval:.0f}s  "
            f"elapsed {time.time() - t_train:.0f}s",
            flush=True,
        )
        save(params, test_acc, epoch + 1, time.time() - t_train)
        if args.max_steps and step >= args.max_steps:
            break
    seconds = time.time() - t_train
    subset_acc = accuracy(params, test_x[test_idx], test_y[test_idx])
    print(
        f"done: test acc (10k) {test_acc:.4f}, test subset (2k) {subset_acc:.4f}, "
        f"training {seconds:.0f}s, total {time.time() - t_start:.0f}s; wrote {args.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()

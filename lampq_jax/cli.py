"""The `lampq` command: demo, quantize, evaluate, layers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def parse_type_rule(text: str) -> tuple[str, str]:
    """'REGEX=TYPE' → (regex, type), split at the last '=' (a regex may hold '=', a type never does).

    Raises:
      ValueError: naming `text` when it has no '=', or the regex / type when they are invalid.
    """
    from lampq_jax.layers import check_rules

    if "=" not in text:
        raise ValueError(f"--type-rule must be REGEX=TYPE, e.g. 'layer_[0-9]+/fc1$=fc1', got {text!r}")
    pattern, layer_type = text.rsplit("=", 1)
    check_rules([(pattern, layer_type)])
    return pattern, layer_type


COMPILE_CACHE_ENV = "LAMPQ_COMPILE_CACHE"  # a folder, or 'off'


def compile_cache_dir(flag: Optional[str]) -> Optional[Path]:
    """Where the command keeps jax's compiled programs between runs: `--compile-cache DIR`, else
    $LAMPQ_COMPILE_CACHE; None (no cache, the default) when neither is set, or for 'off' (or '')."""
    value = flag if flag is not None else os.environ.get(COMPILE_CACHE_ENV, "off")
    return None if value.strip().lower() in ("", "off") else Path(value).expanduser()


def use_compile_cache(directory: Optional[Path]) -> Optional[Path]:
    """Turns on jax's persistent compilation cache in `directory` (made if missing): a later run reuses the
    programs that took jax more than a second to compile. On the embedded model LampQ at 4MP took 28 s in a
    second process against 36 s in the first; on DINOv2-S/14 there was no gain (benchmarks/RESULTS.md,
    bench_compile_cache). A cache the user set in jax's own config wins; returns the folder in use, or None."""
    import jax

    if directory is None or jax.config.jax_compilation_cache_dir:
        return None if directory is None else Path(jax.config.jax_compilation_cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    return directory


def _type_rules(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return tuple(parse_type_rule(r) for r in (args.type_rule or ()))


def _apply_kwargs(args: argparse.Namespace) -> dict:
    try:
        kwargs = json.loads(args.apply_kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--apply-kwargs must be a JSON object, got {args.apply_kwargs!r}: {err}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--apply-kwargs must be a JSON object, got {args.apply_kwargs!r}")
    return kwargs


def user_model(spec: str, kwargs: Optional[dict] = None):
    """The flax.linen module that `spec` ('package.module:function' or 'path/file.py:function') returns.

    The function is called with `kwargs` (the --model-config JSON) as keyword arguments, or with none.
    """
    import importlib
    import importlib.util

    import flax.linen as nn

    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"--model-fn must be MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"--model-fn file {path} does not exist")
        loader_spec = importlib.util.spec_from_file_location(f"lampq_user_model_{path.stem}", path)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"--model-fn {spec!r}: {module_name} has no function {function_name!r}")
    model = function(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model-fn {spec!r} returned {type(model).__name__}, not a flax.linen Module")
    return model


def _model_config_without_fn(args: argparse.Namespace) -> None:
    if args.model_config and not args.model_fn:
        raise ValueError(
            f"--model-config {args.model_config} without --model-fn: here it gives the keyword "
            "arguments of --model-fn's function"
        )


def _cmd_layers(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from lampq_jax.apply import find_attention_paths
    from lampq_jax.layers import coverage_lines, find_layers, layers_table, quantization_coverage
    from lampq_jax.models import create_vit

    rules = _type_rules(args)
    apply_kwargs = _apply_kwargs(args)
    _model_config_without_fn(args)
    if args.model_fn:
        config = json.loads(Path(args.model_config).read_text()) if args.model_config else None
        model, name = user_model(args.model_fn, config), args.model_fn
    else:
        model, name = create_vit(args.variant, args.num_classes), f"ViT-{args.variant}"
    images = jnp.zeros([1, args.image_size, args.image_size, args.channels or 3], jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, **apply_kwargs))
    layers = find_layers(model, variables, images, rules=rules, **apply_kwargs)
    attention = find_attention_paths(model, variables, images, **apply_kwargs)
    print(layers_table(layers))
    total = sum(l.num_weights for l in layers)
    print(f"\n{len(layers)} quantizable layers, {total:,} weights, {name} at {args.image_size}px")
    for line in coverage_lines(quantization_coverage(layers, attention, rules)):
        print(line)
    return 0


# CLI flags that set a LampQConfig field: {flag: field}; the default, type and choices are the field's.
CONFIG_FLAGS = {
    "--candidates": "candidates",
    "--budget-kind": "budget_kind",
    "--granularity": "granularity",
    "--alpha": "alpha",
    "--iterations": "iterations",
    "--probes": "probes",
    "--probe-bits": "probe_bits",
    "--calibration": "calibration",
    "--fisher-method": "fisher_method",
    "--holdout": "holdout",
    "--seed": "seed",
}
# Switches that set a boolean field: {flag: (field, the value the switch sets)}.
CONFIG_SWITCHES = {
    "--separate-wa": ("separate_weight_act_bits", True),
    "--no-progress": ("progress", False),
    "--metric-check": ("metric_check", True),
    "--no-keep-uniform": ("keep_uniform", False),
}


def _dest(flag: str) -> str:
    """argparse's attribute name of a flag: '--budget-kind' → 'budget_kind'."""
    return flag.lstrip("-").replace("-", "_")


def _config(args: argparse.Namespace):
    """The LampQConfig of the parsed flags (`CONFIG_FLAGS`, `CONFIG_SWITCHES` and a command's --output)."""
    from lampq_jax.config import LampQConfig

    fields = {field: getattr(args, _dest(flag)) for flag, field in CONFIG_FLAGS.items()}
    fields.update(
        {field: value if getattr(args, _dest(flag)) else not value for flag, (field, value) in CONFIG_SWITCHES.items()}
    )
    fields["candidates"] = tuple(fields["candidates"])
    return LampQConfig(**fields, output=getattr(args, "output", "logits"))


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
    from lampq_jax.report import plot_bits, plot_image_grid, report_markdown

    result.save(folder / "result")
    allocation = {
        "method": result.method,
        "bits": {p: list(b) for p, b in result.bits.items()},
        "attention_bits": result.attention_bits,
        "budget": result.report.get("budget"),
        "avg_weight_bits_allocated": result.report["avg_weight_bits_allocated"],
    }
    (folder / "allocation.json").write_text(json.dumps(allocation, indent=1))
    if result.synthetic_images is not None:
        np.savez(folder / "zero_shot_images.npz", images=result.synthetic_images)
        plot_image_grid(result.synthetic_images, folder / "zero_shot_images.png")
    (folder / "report.md").write_text(report_markdown(result, summary_rows))
    plot_bits(result, folder / "bits.png")


def _row(name: str, acc: float, report: Optional[dict], seconds: float, fp_bytes: float) -> list[str]:
    if report is None:
        return [name, f"{acc:.2f}", "32", "32", f"{fp_bytes:,.0f}", f"{seconds:.1f}"]
    return [
        name,
        f"{acc:.2f}",
        f"{report['avg_weight_bits_allocated']:.2f}",
        f"{report['avg_act_bits_allocated']:.2f}",
        f"{report['model_bytes']:,.0f}",
        f"{seconds:.1f}",
    ]


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

    _check_finetune_options(args)
    model, variables, config = load_embedded_model()
    data = load_embedded_subset()
    calib = data["calib_images"][: args.num_calib]
    test_x, test_y = data["test_images"], data["test_labels"]
    print(
        f"embedded model: ViT {config['overrides']} on Fashion-MNIST; {len(calib)} calibration images, "
        f"{len(test_x)} test images; budget {args.budget} bits (weights and activations)"
    )
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
    rows.append(
        _row(
            f"uniform W{uniform_bits}A{uniform_bits}",
            uniform_acc,
            uniform.report,
            time.perf_counter() - start,
            fp_bytes,
        )
    )
    start = time.perf_counter()
    result = lampq_jax.quantize(model, variables, calib, budget=args.budget, config=_config(args), train=False)
    lampq_acc = accuracy(result.apply, test_x, test_y)
    rows.append(
        _row(
            f"LampQ {args.budget:g}MP/{args.budget:g}MP",
            lampq_acc,
            result.report,
            time.perf_counter() - start,
            fp_bytes,
        )
    )
    if args.finetune_steps:
        start = time.perf_counter()
        result = _finetune(
            args, result, variables, data["calib_images"], {"train": False}, validation=data["val_images"][:500]
        )
        rows.append(
            _row(
                f"LampQ + QAT ({args.finetune_steps} steps, {len(data['calib_images'])} images)",
                accuracy(result.apply, test_x, test_y),
                result.report,
                time.perf_counter() - start,
                fp_bytes,
            )
        )
    print()
    _print_table(rows)
    with _Staging(Path(args.out), overwrite=True) as folder:
        _write_outputs(folder, result, rows)
    print(f"\nwrote {args.out}/report.md, bits.png, allocation.json and the saved result ({args.out}/result)")
    return 0


def load_calibration(
    path: str,
    *,
    image_size: Optional[int] = None,
    normalization: Optional[str] = None,
    channels: Optional[int] = None,
    limit: Optional[int] = None,
) -> tuple[np.ndarray, Optional[np.ndarray], str]:
    """Images [N, H, W, C] float32, labels (or None) and a sentence naming the preprocessing.

    Sources:
      - an .npz with 'images' (and optional 'labels'): used as they are;
      - a folder of .npy arrays: used as they are;
      - a folder of JPEG / PNG files (any size): read with Pillow, shorter side resized to `image_size`,
        center-cropped, normalized with the preset `normalization` (`lampq_jax.data.image_folder`), as RGB
        (`channels` 3 or None) or grayscale (1); `image_size` and `normalization` are required for images.
    `image_size`, `normalization` or `channels` with arrays are an error (arrays are used as they are).
    `limit` reads at most that many images of a folder.
    """
    from lampq_jax.data.image_folder import describe_preprocessing, image_files, load_image_folder

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"calibration data {path} does not exist")
    photos = image_files(p) if p.is_dir() else []
    if photos:
        npy = sorted(f.name for f in p.iterdir() if f.suffix.lower() == ".npy")
        if npy:
            raise ValueError(
                f"calibration folder {path} mixes {len(photos)} JPEG/PNG image(s) and {len(npy)} .npy "
                f"array(s) (e.g. {npy[0]}); keep one kind"
            )
        missing = [flag for flag, v in (("--image-size", image_size), ("--normalize", normalization)) if v is None]
        if missing:
            raise ValueError(
                f"calibration folder {path} holds JPEG/PNG images; give {' and '.join(missing)} (the "
                "model's input side, and one of imagenet: timm / Hugging Face, minus1_1: big_vision / "
                "Scenic, unit: [0, 1])"
            )
        channels = channels or 3
        images, files = load_image_folder(
            p, size=image_size, normalization=normalization, channels=channels, limit=limit
        )
        return (
            images,
            None,
            describe_preprocessing(path, len(files), size=image_size, normalization=normalization, channels=channels),
        )
    given = [
        flag
        for flag, v in (("--image-size", image_size), ("--normalize", normalization), ("--channels", channels))
        if v is not None
    ]
    if given:
        raise ValueError(
            f"{' and '.join(given)}: only for folders of JPEG/PNG images; {path} holds arrays, "
            "which are used as they are"
        )
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".npy")
        if not files:
            raise ValueError(f"calibration folder {path} holds no .jpg, .jpeg, .png or .npy file")
        files = files[:limit] if limit else files
        images = [np.load(f) for f in files]
        shapes = {np.shape(i) for i in images}
        if len(shapes) != 1:
            raise ValueError(f"arrays in {path} have different shapes {sorted(shapes)}")
        arr = np.stack(images).astype(np.float32)
        arr = arr[..., None] if arr.ndim == 3 else arr
        return arr, None, f"{len(files)} .npy array(s) from {path} used as they are (no resize, no normalization)"
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
    return images, labels, f"'images' of {path} used as they are (no resize, no normalization)"


TRAIN_STATE_KEYS = ("opt_state", "global_step", "optimizer", "model_state")


def checkpoint_file(path: Path) -> Path:
    """`path`, or for a training workdir the `checkpoint_<step>` file in it with the largest step (the layout
    of `flax.training.checkpoints.save_checkpoint`, which Scenic's trainers use)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    steps = {
        int(p.name.rsplit("_", 1)[1]): p
        for p in path.glob("checkpoint_*")
        if p.is_file() and p.name.rsplit("_", 1)[1].isdigit()
    }
    if not steps:
        raise FileNotFoundError(f"checkpoint folder {path} holds no checkpoint_<step> file")
    return steps[max(steps)]


def variables_from_state(raw: dict) -> dict:
    """Model variables from a restored flax msgpack: a train state (Scenic's TrainState: `params` and
    `model_state` kept, `opt_state`, `global_step`, `rng`, `metadata` dropped; a legacy flax Optimizer's
    `optimizer.target`), a variables dict with 'params', or a bare params tree."""
    if not isinstance(raw, dict):
        raise ValueError(f"the checkpoint holds a {type(raw).__name__}, not a dict of variables or a train state")
    if any(k in raw for k in TRAIN_STATE_KEYS):
        params = raw.get("params")
        if params is None and isinstance(raw.get("optimizer"), dict):
            params = raw["optimizer"].get("target")
        if not params:
            raise ValueError(f"the checkpoint looks like a train state (keys {sorted(raw)}) but has no params")
        return {"params": params, **dict(raw.get("model_state") or {})}
    return raw if "params" in raw else {"params": raw}


def load_model(args: argparse.Namespace):
    """(model, variables) from a Scenic-layout checkpoint (+ model config) or the converters."""
    import flax.serialization

    from lampq_jax.models import create_vit
    from lampq_jax.models import convert

    ckpt = checkpoint_file(Path(args.checkpoint))
    if args.model_fn:
        if args.format != "scenic" or ckpt.suffix == ".npz":
            raise ValueError(
                "--model-fn takes a flax msgpack checkpoint of that model's variables "
                f"(--format scenic, not .npz), got --format {args.format} and {ckpt.name}"
            )
        config = json.loads(Path(args.model_config).read_text()) if args.model_config else None
        raw = flax.serialization.msgpack_restore(ckpt.read_bytes())
        return user_model(args.model_fn, config), variables_from_state(raw)
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
        variables = variables_from_state(flax.serialization.msgpack_restore(ckpt.read_bytes()))
    return model, variables


def _cmd_quantize(args: argparse.Namespace) -> int:
    import lampq_jax
    from lampq_jax.layers import coverage_lines

    rules = _type_rules(args)
    apply_kwargs = _apply_kwargs(args)
    config = _config(args)
    zero_shot = _zero_shot_config(args)
    _check_finetune_options(args)
    images = labels = None
    if zero_shot is None:
        images, labels, preprocessing = load_calibration(
            args.calib,
            image_size=args.image_size,
            normalization=args.normalize,
            channels=args.channels,
            limit=args.num_calib,
        )
        images = images[: args.num_calib]
        labels = None if labels is None or not args.use_labels else labels[: args.num_calib]
    else:
        preprocessing = (
            f"zero-shot: {zero_shot.num_images} images {zero_shot.image_shape} synthesized in "
            f"{zero_shot.steps} steps, pixels in {zero_shot.pixel_range} ({args.normalize})"
        )
    model, variables = load_model(args)
    with _Staging(Path(args.out), overwrite=args.overwrite) as folder:
        result = lampq_jax.quantize(
            model,
            variables,
            images,
            budget=args.budget,
            labels=labels,
            objective=args.objective,
            config=config,
            rules=rules,
            zero_shot=zero_shot,
            **apply_kwargs,
        )
        result.report["preprocessing"] = preprocessing
        if args.finetune_steps:
            result = _finetune(
                args, result, variables, images if zero_shot is None else result.synthetic_images, apply_kwargs
            )
        _write_outputs(folder, result, ())
    print(f"calibration: {preprocessing}")
    for line in coverage_lines(result.report["coverage"]):
        print(line)
    print(f"bits per layer (avg {result.report['avg_weight_bits_allocated']:.3f} on allocated layers):")
    for path, (wb, ab) in result.bits.items():
        print(f"  W{wb}A{ab}  {path}")
    extra = ", zero_shot_images.npz, zero_shot_images.png" if zero_shot is not None else ""
    print(f"wrote {args.out}/allocation.json, report.md, bits.png{extra}, result/")
    return 0


def _check_finetune_options(args: argparse.Namespace) -> None:
    """Fails before any work when a --finetune-* option is out of range."""
    if args.finetune_steps < 0 or args.finetune_batch < 1 or not args.finetune_lr > 0:
        raise ValueError(
            f"--finetune-steps must be >= 0, --finetune-batch >= 1 and --finetune-lr > 0; got "
            f"{args.finetune_steps}, {args.finetune_batch} and {args.finetune_lr}"
        )


def _finetune(args: argparse.Namespace, result, variables, images, apply_kwargs: dict, validation=None):
    """`qat.finetune` of `result` with the --finetune-* options, distilling from the FP `variables`
    (keeping the best step on `validation` images when given)."""
    from lampq_jax.qat import finetune

    tuned = finetune(
        result,
        variables,
        images,
        steps=args.finetune_steps,
        batch_size=args.finetune_batch,
        learning_rate=args.finetune_lr,
        output=getattr(args, "output", None),
        validation=validation,
        seed=args.seed,
        progress=not args.no_progress,
        **apply_kwargs,
    )
    qat = tuned.report["qat"]
    print(
        f"QAT: {qat['steps']} steps of {qat['optimizer']}, batch {qat['batch_size']} of {qat['images']} images, "
        f"loss {qat['loss_first']:.4g} -> {qat['loss_last']:.4g} in {qat['seconds']:.1f} s"
    )
    return tuned


def _zero_shot_config(args: argparse.Namespace):
    """The ZeroShotConfig of `--zero-shot N`, or None with `--calib`; exactly one of the two is given."""
    from lampq_jax.data.image_folder import get_normalization
    from lampq_jax.data.zero_shot import ZeroShotConfig

    if (args.calib is None) == (args.zero_shot is None):
        raise ValueError("give exactly one of --calib PATH and --zero-shot N")
    if args.zero_shot is None:
        return None
    if args.zero_shot < 1 or args.zero_shot_steps < 1:
        raise ValueError(
            f"--zero-shot and --zero-shot-steps must be >= 1, got {args.zero_shot} and {args.zero_shot_steps}"
        )
    if args.image_size is None or args.normalize is None:
        raise ValueError(
            "--zero-shot needs --image-size (the model's input size) and --normalize "
            "(the model's input normalization, which bounds the synthesized pixels)"
        )
    return ZeroShotConfig(
        image_shape=(args.image_size, args.image_size, args.channels or 3),
        num_images=args.zero_shot,
        steps=args.zero_shot_steps,
        pixel_range=get_normalization(args.normalize).pixel_range(),
        seed=args.seed,
        progress=not args.no_progress,
    )


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import lampq_jax
    from lampq_jax.report import accuracy

    images, labels, _ = load_calibration(args.data)
    if labels is None:
        raise ValueError(f"{args.data} has no 'labels' array to evaluate against")
    _model_config_without_fn(args)
    model = None
    if args.model_fn:
        model = user_model(
            args.model_fn, json.loads(Path(args.model_config).read_text()) if args.model_config else None
        )
    result = lampq_jax.load_result(args.result, model)
    print(f"accuracy of {args.result} on {len(images)} images: {accuracy(result.apply, images, labels):.2f} %")
    return 0


def _add_method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=float, default=4.0, help="average bits (default 4)")
    from lampq_jax.config import FIELD_CHOICES, LampQConfig

    defaults = {f.name: f.default for f in dataclasses.fields(LampQConfig)}
    for flag, field in CONFIG_FLAGS.items():
        default = defaults[field]
        if field in FIELD_CHOICES:
            p.add_argument(flag, default=default, choices=FIELD_CHOICES[field], help=f"LampQConfig.{field}")
        elif default is None:  # an optional int (probe_bits)
            p.add_argument(flag, type=int, default=None, help=f"LampQConfig.{field} (default: see its docstring)")
        elif isinstance(default, tuple):
            p.add_argument(flag, type=int, nargs="+", default=list(default), help=f"LampQConfig.{field}")
        else:
            p.add_argument(flag, type=type(default), default=default, help=f"LampQConfig.{field} (default {default})")
    for flag, (field, value) in CONFIG_SWITCHES.items():
        p.add_argument(flag, action="store_true", help=f"LampQConfig.{field}={value}")
    p.add_argument("--num-calib", type=int, default=32)
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="quantization-aware fine-tuning after allocation: Adam steps of distillation to the FP "
        "model on the calibration images (default 0: none)",
    )
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="Adam learning rate of the fine-tuning")
    p.add_argument("--finetune-batch", type=int, default=32, help="images per fine-tuning step")


def _add_model_fn_options(p: argparse.ArgumentParser, *, config_help: str) -> None:
    p.add_argument(
        "--model-fn",
        metavar="MODULE:FUNCTION",
        help="your own flax.linen model: 'package.module:function' or 'file.py:function' returning it "
        "(called with the --model-config JSON as keyword arguments, if given)",
    )
    p.add_argument("--model-config", help=config_help)


def _add_discovery_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--type-rule",
        action="append",
        metavar="REGEX=TYPE",
        help="layer type rule, tried before the built-in ones (repeatable), e.g. "
        "'layer_[0-9]+/(query|key|value)$=qkv'; types: qkv, proj, fc1, fc2, embed, head, other",
    )
    p.add_argument(
        "--apply-kwargs",
        default='{"train": false}',
        help="JSON keyword arguments of model.apply (default {\"train\": false}; '{}' for none)",
    )
    p.add_argument(
        "--channels", type=int, choices=[1, 3], help="input channels of the model (3: RGB, the default; 1: grayscale)"
    )


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
    quant.add_argument(
        "--checkpoint",
        required=True,
        help="flax msgpack of variables or of a train state, a training workdir (its latest "
        "checkpoint_<step>), an AugReg .npz (Scenic layout), or a torch file",
    )
    quant.add_argument("--format", default="scenic", choices=["scenic", "timm", "huggingface"])
    _add_model_fn_options(
        quant,
        config_help="JSON: {'variant', 'num_classes', 'overrides'} or ViT fields; with "
        "--model-fn: the keyword arguments of that function",
    )
    quant.add_argument("--num-heads", type=int, help="attention heads (timm)")
    quant.add_argument("--hf-config", help="config.json of a Hugging Face model")
    quant.add_argument(
        "--zero-shot",
        type=int,
        metavar="N",
        help="data-free: synthesize N calibration images from the model instead of --calib "
        "(needs --image-size and --normalize)",
    )
    quant.add_argument("--zero-shot-steps", type=int, default=200, help="Adam steps of the synthesis (default 200)")
    quant.add_argument(
        "--calib",
        help=".npz with 'images' (and 'labels'), a folder of .npy arrays (used as they are), or a "
        "folder of JPEG/PNG photos of any size (needs --image-size and --normalize)",
    )
    quant.add_argument("--image-size", type=int, help="JPEG/PNG: resize the shorter side to this and center-crop")
    quant.add_argument(
        "--normalize",
        choices=["imagenet", "minus1_1", "unit"],
        help="JPEG/PNG: imagenet = ImageNet mean/std (timm, Hugging Face, DINOv2); "
        "minus1_1 = [-1, 1] (big_vision, Scenic); unit = [0, 1]",
    )
    quant.add_argument(
        "--output",
        default="logits",
        choices=["logits", "features"],
        help="what the model returns: logits (true Fisher: categorical; default objective kl) or "
        "features, e.g. a DINOv2 backbone (Gaussian; default objective cosine)",
    )
    quant.add_argument(
        "--objective",
        choices=["kl", "cross_entropy", "cosine"],
        help="calibration objective J (default: cosine for features, else cross_entropy with --use-labels, else kl)",
    )
    _add_discovery_options(quant)
    quant.add_argument("--use-labels", action="store_true", help="empirical Fisher and cross-entropy objective")
    quant.add_argument("--out", required=True)
    quant.add_argument("--overwrite", action="store_true")
    _add_method_options(quant)
    quant.set_defaults(func=_cmd_quantize)

    ev = sub.add_parser("evaluate", help="accuracy of a saved result on a labelled .npz")
    ev.add_argument("--result", required=True, help="folder written by quantize (…/result)")
    ev.add_argument("--data", required=True, help=".npz with 'images' and 'labels'")
    _add_model_fn_options(ev, config_help="with --model-fn: the keyword arguments of that function")
    ev.set_defaults(func=_cmd_evaluate)

    layers = sub.add_parser(
        "layers",
        help="list the quantizable layers of a ViT variant or of your own model, their types and the attention sites",
    )
    layers.add_argument("--variant", default="S/16", help="ViT variant, e.g. Ti/16, S/16, B/16 (default S/16)")
    layers.add_argument("--num-classes", type=int, default=1000)
    layers.add_argument("--image-size", type=int, default=224)
    _add_model_fn_options(layers, config_help="with --model-fn: the keyword arguments of that function")
    _add_discovery_options(layers)
    layers.set_defaults(func=_cmd_layers)
    for command in sub.choices.values():
        command.add_argument(
            "--compile-cache",
            help=f"folder of jax's persistent compilation cache, 'off' for none (default: ${COMPILE_CACHE_ENV}, "
            "else none)",
        )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        use_compile_cache(compile_cache_dir(args.compile_cache))
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"lampq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Speed of the per-sample Fisher pass (METHOD.md §3) against its floor and against PyTorch.

Two models, both built from one set of timm random weights so every framework computes on
identical weights and images (logits are checked to agree first):

* ``vit_s16``: ViT-S/16 at 224², 1000 classes (= ``create_vit("S/16", 1000,
  gelu_approximate=False, layer_norm_epsilon=1e-6)``);
* ``small_vit``: depth 6, width 192, 3 heads, MLP 768, 28×28×1 inputs, patch 4, 10 classes
  (= ``create_vit("Ti/4", 10, num_layers=6, gelu_approximate=False)``).

The lampq_jax model comes from ``lampq_jax.models.convert.from_timm`` + ``build_model``.
N = 32 random images with random labels (empirical Fisher). Ways, all timed in alternation:

* ``jax_batch_grad``: the floor, ``jax.jit(jax.grad(mean loss))`` w.r.t. all params on the
  batch of N (already compiled);
* ``jax_fisher_k{k}``: ``fisher_traces(..., batch_size=k)``, k ∈ {4, 8, 16, 32}, whole calls as
  a user makes them. The trace / lowering / XLA-compile seconds inside every call are read from
  ``jax.monitoring``: the first call of each k ("first call") compiles; the timed calls after it
  show whether later calls compile again (they must not: the pass is jitted once per model, k
  and input shape). "run" = call − those seconds;
* ``torch_vmap_k{k}``: ``torch.func.vmap(torch.func.grad(per-sample ℓ), chunk_size=k)`` through
  ``functional_call`` on the timm model (math attention: SDPA has no vmap rule);
* ``torch_loop``: one forward and ``torch.autograd.grad`` per sample (timm's default fused SDPA);
* ``torch_batch_grad``: PyTorch's own floor, one batched backward of the mean loss.

The torch ways compute the same quantities as ``fisher_traces``: ‖∂ℓ_n/∂W‖² of every
Linear/Conv weight (the fused qkv weight split into its q, k, v rows) and ‖∂ℓ_n/∂A‖² of every
layer input through zero perturbations added by forward pre-hooks; for the fused qkv layer the
perturbation is added to its output and the q/k/v input gradients are g_Y[:, rows] @ W[rows],
which equals a zero perturbation at each of the three inputs of Scenic's separate q, k, v.
The traces must agree with lampq_jax's to relative 1e-3.

PyTorch threads: the brief asked for ``torch.set_num_threads(2)``, but on this shared 2-core
machine (other jobs keep 1-2 cores busy) torch with 2 threads is 3-60× slower than with 1 (its
OpenMP workers wait on descheduled peers at every op), so the torch ways run with 1 thread, its
best setting here, and one interleaved round at 1 and 2 threads on a few images is reported
beside them ("torch threads check"). JAX runs with its defaults, as the library's users get it.

Timing: every JAX way is first called once (compiling; reported as "first call"), then the ways
are timed in interleaved rounds. Small ViT: every way in every round (5 rounds). ViT-S/16 (a
call takes 15-40 s here): round 1 runs every way, the further rounds (3 in all) rerun the floor,
the best k of each framework (from round 1) and the loop. Figures are medians.

Peak memory: each way runs in a fresh subprocess that first builds everything (imports, models,
data); the high-water mark is reset (``echo 5 > /proc/self/clear_refs``) before a call, and the
peak is VmHWM after it minus VmRSS before it. First call (compile included) and, for the small
ViT, a second call (steady; freed-but-kept allocator memory from the first call can hide part of
it).

Linearity: ``fisher_traces`` at the best k against N ∈ {8, 16, 32, 64, 128} (small ViT: steady
calls, median of 3) and {8, 16, 32, 64} (ViT-S/16: run part of the first call of each N, to
stay within the time budget; the first execution carries some one-off cost), least-squares line
and R² of time against N.

Usage (from benchmarks/):
    ../.venv/bin/python bench_fisher.py
    ../.venv/bin/python bench_fisher.py --models small_vit --rounds 3 --no-memory
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.func import functional_call, grad, vmap

from common import interleaved_medians, machine, write_json, write_section
from lampq_jax import create_vit, find_layers
from lampq_jax.models.convert import build_model, from_timm
from lampq_jax.sensitivity import fisher_traces

HERE = Path(__file__).resolve().parent
COMMAND = "cd benchmarks && ../.venv/bin/python bench_fisher.py"
TORCH_THREADS = 1  # see the module docstring: 2 threads collapse on this shared 2-core machine
THREAD_CHECK_N = {"vit_s16": 4, "small_vit": 8}
N_MAIN = 32
JAX_KS = (4, 8, 16, 32)
TORCH_KS = {"vit_s16": (8, 32), "small_vit": (4, 8, 16, 32)}
SCALING_NS = {"vit_s16": (8, 16, 32, 64), "small_vit": (8, 16, 32, 64, 128)}
GOAL_RATIO = 1.2
GOAL_SPEEDUP = {"vit_s16": 1.0, "small_vit": 1.5}
TRACE_RTOL = 1e-3

SPECS: dict[str, dict[str, Any]] = {
    "vit_s16": dict(
        timm=dict(
            img_size=224,
            patch_size=16,
            in_chans=3,
            num_classes=1000,
            embed_dim=384,
            depth=12,
            num_heads=6,
            mlp_ratio=4.0,
        ),
        variant=("S/16", 1000, dict(gelu_approximate=False, layer_norm_epsilon=1e-6)),
        label="ViT-S/16, 224²×3, 1000 classes",
    ),
    "small_vit": dict(
        timm=dict(
            img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0
        ),
        variant=("Ti/4", 10, dict(num_layers=6, gelu_approximate=False, layer_norm_epsilon=1e-6)),
        label="small ViT (depth 6, width 192, 3 heads, MLP 768), 28²×1, patch 4, 10 classes",
    ),
}

# ---------------------------------------------------------------------------------------------
# compile-time accounting from jax.monitoring

COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}
_events: dict[str, float] = defaultdict(float)


def _listener(event: str, duration: float, **_: Any) -> None:
    if event in COMPILE_EVENTS:
        _events[COMPILE_EVENTS[event]] += duration


jax.monitoring.register_event_duration_secs_listener(_listener)


def read_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0])
    return out


# ---------------------------------------------------------------------------------------------
# setup: one timm model, converted to lampq_jax


def setup(name: str, n_max: int) -> dict[str, Any]:
    """timm model with random weights, the converted lampq_jax model, N_max images and labels."""
    spec = SPECS[name]
    torch.manual_seed(0)
    tmodel = VisionTransformer(**spec["timm"]).eval()
    for p in tmodel.parameters():
        p.requires_grad_(False)
    variables, config = from_timm(tmodel.state_dict(), num_heads=spec["timm"]["num_heads"])
    variables = jax.tree.map(jnp.asarray, variables)
    model = build_model(config)
    variant, classes, overrides = spec["variant"]
    reference = create_vit(variant, classes, **overrides)
    fields = (
        "num_classes",
        "hidden_size",
        "num_layers",
        "mlp_dim",
        "num_heads",
        "patch_size",
        "classifier",
        "representation_size",
        "layer_norm_epsilon",
        "gelu_approximate",
    )
    mismatch = {
        f: (getattr(model, f), getattr(reference, f)) for f in fields if getattr(model, f) != getattr(reference, f)
    }
    if mismatch:
        raise SystemExit(f"{name}: converted config differs from create_vit{spec['variant'][:2]}: {mismatch}")
    t = spec["timm"]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((n_max, t["img_size"], t["img_size"], t["in_chans"]), dtype=np.float32)
    labels = rng.integers(0, t["num_classes"], n_max)
    layers = find_layers(model, variables, jnp.asarray(images[:1]), train=False)
    return dict(
        name=name,
        tmodel=tmodel,
        model=model,
        variables=variables,
        layers=layers,
        images=jnp.asarray(images),
        labels=jnp.asarray(labels),
        timages=torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
        tlabels=torch.from_numpy(labels).long(),
        tonehot=torch.nn.functional.one_hot(torch.from_numpy(labels).long(), t["num_classes"]).float(),
    )


def check_logits(s: dict[str, Any], n: int = 4) -> float:
    jl = np.asarray(s["model"].apply(s["variables"], s["images"][:n], train=False))
    with torch.no_grad():
        tl = s["tmodel"](s["timages"][:n]).numpy()
    return float(np.max(np.abs(jl - tl)))


# ---------------------------------------------------------------------------------------------
# PyTorch: the same per-sample Fisher traces


def torch_name(jax_path: str) -> tuple[str, int | None]:
    """timm module name (and q/k/v row block of the fused qkv) of a Scenic layer path."""
    if jax_path == "embedding":
        return "patch_embed.proj", None
    if jax_path == "output_projection":
        return "head", None
    parts = jax_path.split("/")
    block = int(parts[1].split("_")[-1])
    if parts[2].startswith("MultiHeadDotProductAttention"):
        role = parts[3]
        if role == "out":
            return f"blocks.{block}.attn.proj", None
        return f"blocks.{block}.attn.qkv", ("query", "key", "value").index(role)
    if parts[2].startswith("MlpBlock"):
        return f"blocks.{block}.mlp.{'fc1' if parts[3] == 'Dense_0' else 'fc2'}", None
    raise ValueError(f"no timm module for {jax_path!r}")


class TorchFisher:
    """Per-sample ‖∂ℓ/∂W‖² and ‖∂ℓ/∂A‖² of a timm ViT, in the order of lampq_jax's layers."""

    def __init__(self, tmodel: VisionTransformer, jax_paths: list[str], sample: torch.Tensor):
        self.tmodel = tmodel
        self.paths = jax_paths
        self.entries = [torch_name(p) for p in jax_paths]
        self.names = list(dict.fromkeys(n for n, _ in self.entries))
        modules = dict(tmodel.named_modules())
        self.weights = {n: modules[n].weight for n in self.names}
        self.perts: dict[str, torch.Tensor] | None = None
        shapes: dict[str, tuple[int, ...]] = {}
        probes = []
        for n in self.names:
            if n.endswith("attn.qkv"):
                probes.append(
                    modules[n].register_forward_hook(lambda m, a, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
                )
            else:
                probes.append(
                    modules[n].register_forward_pre_hook(lambda m, a, n=n: shapes.__setitem__(n, tuple(a[0].shape)))
                )
        with torch.no_grad():
            tmodel(sample[:1])
        for h in probes:
            h.remove()
        self.shapes = shapes
        for n in self.names:
            if n.endswith("attn.qkv"):
                modules[n].register_forward_hook(self._add_to_output(n))
            else:
                modules[n].register_forward_pre_hook(self._add_to_input(n))

    def _add_to_input(self, name: str):
        def hook(module, args):
            if self.perts is None:
                return None
            return (args[0] + self.perts[name],) + tuple(args[1:])

        return hook

    def _add_to_output(self, name: str):
        def hook(module, args, output):
            if self.perts is None:
                return None
            return output + self.perts[name]

        return hook

    def set_fused_attention(self, fused: bool) -> None:
        for block in self.tmodel.blocks:
            block.attn.fused_attn = fused

    def zeros(self, requires_grad: bool = False) -> dict[str, torch.Tensor]:
        return {n: torch.zeros(self.shapes[n], requires_grad=requires_grad) for n in self.names}

    def norms(self, gw: dict[str, torch.Tensor], gp: dict[str, torch.Tensor], w: dict[str, torch.Tensor]):
        """[layers] squared weight-gradient norms and [layers] squared input-gradient norms."""
        wn, an = [], []
        for name, s in self.entries:
            if s is None:
                wn.append(gw[name].square().sum())
                an.append(gp[name].square().sum())
            else:
                d = w[name].shape[0] // 3
                rows = slice(s * d, (s + 1) * d)
                wn.append(gw[name][rows].square().sum())
                an.append((gp[name][..., rows] @ w[name][rows]).square().sum())
        return torch.stack(wn), torch.stack(an)

    def vmap_traces(self, images: torch.Tensor, onehot: torch.Tensor, chunk: int):
        self.set_fused_attention(False)  # SDPA's CPU kernels have no vmap batching rule
        w = {n: t.detach() for n, t in self.weights.items()}
        model = self.tmodel

        def per_sample(w, perts, x, y):
            def loglik(w, perts):
                self.perts = perts
                try:
                    out = functional_call(model, {f"{n}.weight": t for n, t in w.items()}, (x[None],))
                finally:
                    self.perts = None
                return (torch.log_softmax(out, -1)[0] * y).sum()

            gw, gp = grad(loglik, argnums=(0, 1))(w, perts)
            return self.norms(gw, gp, w)

        wn, an = vmap(per_sample, in_dims=(None, None, 0, 0), chunk_size=chunk)(w, self.zeros(), images, onehot)
        self.set_fused_attention(True)
        return self._result(wn.mean(0), an.mean(0))

    def loop_traces(self, images: torch.Tensor, labels: torch.Tensor):
        self.set_fused_attention(True)
        wl = [self.weights[n] for n in self.names]
        for t in wl:
            t.requires_grad_(True)
        wsum = torch.zeros(len(self.entries))
        asum = torch.zeros(len(self.entries))
        try:
            for i in range(images.shape[0]):
                perts = self.zeros(requires_grad=True)
                self.perts = perts
                try:
                    out = self.tmodel(images[i : i + 1])
                finally:
                    self.perts = None
                loss = torch.log_softmax(out, -1)[0, labels[i]]
                grads = torch.autograd.grad(loss, wl + [perts[n] for n in self.names])
                k = len(wl)
                with torch.no_grad():
                    wn, an = self.norms(
                        dict(zip(self.names, grads[:k])),
                        dict(zip(self.names, grads[k:])),
                        {n: t.detach() for n, t in self.weights.items()},
                    )
                wsum += wn
                asum += an
        finally:
            for t in wl:
                t.requires_grad_(False)
        n = images.shape[0]
        return self._result(wsum / n, asum / n)

    def batch_grad(self, images: torch.Tensor, labels: torch.Tensor):
        params = [p for p in self.tmodel.parameters()]
        for p in params:
            p.requires_grad_(True)
        try:
            loss = torch.nn.functional.cross_entropy(self.tmodel(images), labels)
            return torch.autograd.grad(loss, params)
        finally:
            for p in params:
                p.requires_grad_(False)

    def _result(self, wn: torch.Tensor, an: torch.Tensor):
        wn, an = wn.detach().numpy(), an.detach().numpy()
        return {p: float(v) for p, v in zip(self.paths, wn)}, {p: float(v) for p, v in zip(self.paths, an)}


# ---------------------------------------------------------------------------------------------
# the ways, as zero-argument callables


def jax_batch_grad_fn(s: dict[str, Any], n: int) -> Callable[[], Any]:
    model = s["model"]

    def loss(params, x, y):
        logits = model.apply({"params": params}, x, train=False)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    step = jax.jit(jax.grad(loss))
    params, x, y = s["variables"]["params"], s["images"][:n], s["labels"][:n]
    return lambda: step(params, x, y)


def jax_fisher_fn(
    s: dict[str, Any], n: int, k: int, log: list[dict[str, float]] | None = None, keep: dict | None = None
):
    x, y = s["images"][:n], s["labels"][:n]

    def call():
        _events.clear()
        start = time.perf_counter()
        ft = fisher_traces(s["model"], s["variables"], x, s["layers"], labels=y, rng=None, batch_size=k, train=False)
        total = time.perf_counter() - start
        if log is not None:
            split = {key: _events.get(key, 0.0) for key in ("trace", "lower", "compile")}
            log.append(dict(total=total, **split, run=total - sum(split.values())))
        if keep is not None:
            keep["traces"] = (ft.weight, ft.activation)
        return ft

    return call


def timed(
    fn: Callable[[], Any], log: list[float], keep: dict | None = None, threads: int | None = None
) -> Callable[[], Any]:
    def call():
        if threads is not None:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        log.append(time.perf_counter() - start)
        if keep is not None:
            keep["traces"] = out
        return out

    return call


def make_ways(s: dict[str, Any], tf: TorchFisher, n: int, ks_jax, ks_torch, samples, splits, keeps):
    ways: dict[str, Callable[[], Any]] = {}
    ways["jax_batch_grad"] = timed(jax_batch_grad_fn(s, n), samples["jax_batch_grad"])
    for k in ks_jax:
        name = f"jax_fisher_k{k}"
        inner = jax_fisher_fn(s, n, k, splits[name], keeps.setdefault(name, {}))
        ways[name] = timed(inner, samples[name])
    x, oh, lab = s["timages"][:n], s["tonehot"][:n], s["tlabels"][:n]
    for k in ks_torch:
        name = f"torch_vmap_k{k}"
        ways[name] = timed(
            lambda k=k: tf.vmap_traces(x, oh, k), samples[name], keeps.setdefault(name, {}), TORCH_THREADS
        )
    ways["torch_loop"] = timed(
        lambda: tf.loop_traces(x, lab), samples["torch_loop"], keeps.setdefault("torch_loop", {}), TORCH_THREADS
    )
    ways["torch_batch_grad"] = timed(lambda: tf.batch_grad(x, lab), samples["torch_batch_grad"], None, TORCH_THREADS)
    return ways


def thread_check(s: dict[str, Any], tf: TorchFisher, n: int) -> dict[str, float]:
    """One interleaved round of the torch ways on N = n images at 1 and at 2 threads."""
    x, oh, lab = s["timages"][:n], s["tonehot"][:n], s["tlabels"][:n]
    samples: dict[str, list[float]] = defaultdict(list)
    ways = {}
    for threads in (1, 2):
        ways[f"torch_loop@{threads}t"] = timed(
            lambda: tf.loop_traces(x, lab), samples[f"torch_loop@{threads}t"], None, threads
        )
        ways[f"torch_vmap_k8@{threads}t"] = timed(
            lambda: tf.vmap_traces(x, oh, 8), samples[f"torch_vmap_k8@{threads}t"], None, threads
        )
        ways[f"torch_batch_grad@{threads}t"] = timed(
            lambda: tf.batch_grad(x, lab), samples[f"torch_batch_grad@{threads}t"], None, threads
        )
    interleaved_medians(ways, 1)
    torch.set_num_threads(TORCH_THREADS)
    return {w: v[0] for w, v in samples.items()}


def max_rel(a: dict[str, float], b: dict[str, float]) -> tuple[float, str]:
    worst = max(a, key=lambda p: abs(a[p] - b[p]) / max(abs(b[p]), 1e-30))
    return abs(a[worst] - b[worst]) / max(abs(b[worst]), 1e-30), worst


# ---------------------------------------------------------------------------------------------
# subprocess: peak memory and cold first call of one way


def child(name: str, way: str, calls: int) -> None:
    torch.set_num_threads(TORCH_THREADS)
    s = setup(name, N_MAIN)
    tf = TorchFisher(s["tmodel"], [l.path for l in s["layers"]], s["timages"])
    x, oh, lab = s["timages"], s["tonehot"], s["tlabels"]
    if way == "jax_batch_grad":
        fn = jax_batch_grad_fn(s, N_MAIN)
    elif way.startswith("jax_fisher_k"):
        fn = jax_fisher_fn(s, N_MAIN, int(way.removeprefix("jax_fisher_k")))
    elif way.startswith("torch_vmap_k"):
        fn = lambda: tf.vmap_traces(x, oh, int(way.removeprefix("torch_vmap_k")))
    elif way == "torch_loop":
        fn = lambda: tf.loop_traces(x, lab)
    elif way == "torch_batch_grad":
        fn = lambda: tf.batch_grad(x, lab)
    else:
        raise SystemExit(f"unknown way {way!r}")
    result = {}
    for call in ("first", "second")[:calls]:
        Path("/proc/self/clear_refs").write_text("5")
        before = read_status()["VmRSS"]
        start = time.perf_counter()
        jax.block_until_ready(fn())
        result[f"{call}_call_s"] = time.perf_counter() - start
        result[f"{call}_peak_mb"] = (read_status()["VmHWM"] - before) / 1024
    print("CHILD_RESULT " + json.dumps(result))


def measure_memory(name: str, way: str, calls: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", name, way, str(calls)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=900,
    )
    for line in out.stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            return json.loads(line.removeprefix("CHILD_RESULT "))
    raise RuntimeError(f"child {name}/{way} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------------


def fit_line(ns: list[int], ts: list[float]) -> dict[str, float]:
    x, y = np.asarray(ns, float), np.asarray(ts, float)
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res, ss_tot = float(np.sum((y - pred) ** 2)), float(np.sum((y - y.mean()) ** 2))
    return dict(
        slope_s_per_sample=float(slope), intercept_s=float(intercept), r2=1.0 - ss_res / ss_tot if ss_tot else 1.0
    )


def med(v: list[float]) -> float:
    return float(statistics.median(v))


def compile_s(split: dict[str, float]) -> float:
    return split["trace"] + split["lower"] + split["compile"]


def bench_model(name: str, rounds: int, memory: bool, scaling: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    print(f"\n=== {name}: {SPECS[name]['label']}", flush=True)
    big = name == "vit_s16"
    s = setup(name, max(max(SCALING_NS[name]) if scaling else N_MAIN, N_MAIN))
    diff = check_logits(s)
    print(f"logits jax vs torch: max |Δ| = {diff:.2e} ({'ok' if diff < 1e-4 else 'ABOVE 1e-4'})", flush=True)
    tf = TorchFisher(s["tmodel"], [l.path for l in s["layers"]], s["timages"])
    samples: dict[str, list[float]] = defaultdict(list)
    splits: dict[str, list[dict[str, float]]] = defaultdict(list)
    keeps: dict[str, dict] = {}
    ways = make_ways(s, tf, N_MAIN, JAX_KS, TORCH_KS[name], samples, splits, keeps)

    # first calls: the floor and each k of fisher_traces compile here
    first: dict[str, dict[str, float]] = {}
    ways["jax_batch_grad"]()
    first["jax_batch_grad"] = dict(total=samples["jax_batch_grad"].pop())
    for k in JAX_KS:
        w = f"jax_fisher_k{k}"
        ways[w]()
        samples[w].pop()
        first[w] = splits[w].pop()
        print(
            f"first call {w}: {first[w]['total']:.2f}s = compile {compile_s(first[w]):.2f}s "
            f"(trace {first[w]['trace']:.2f}, lower {first[w]['lower']:.2f}, XLA {first[w]['compile']:.2f}) "
            f"+ run {first[w]['run']:.2f}s",
            flush=True,
        )
    tf.loop_traces(s["timages"][:2], s["tlabels"][:2])  # torch warm-up, cheap
    tf.vmap_traces(s["timages"][:2], s["tonehot"][:2], 2)

    if not big:
        interleaved_medians(ways, rounds)
        jk = min(JAX_KS, key=lambda k: med(samples[f"jax_fisher_k{k}"]))
        tk = min(TORCH_KS[name], key=lambda k: med(samples[f"torch_vmap_k{k}"]))
    else:
        interleaved_medians(ways, 1)
        jk = min(JAX_KS, key=lambda k: samples[f"jax_fisher_k{k}"][0])
        tk = min(TORCH_KS[name], key=lambda k: samples[f"torch_vmap_k{k}"][0])
        print(f"round 1 done ({time.perf_counter() - t0:.0f}s): best jax k={jk}, best torch vmap k={tk}", flush=True)
        final = ["jax_batch_grad", f"jax_fisher_k{jk}", f"torch_vmap_k{tk}", "torch_loop"]
        if rounds > 1:
            interleaved_medians({w: ways[w] for w in final}, rounds - 1)
    times = {w: med(v) for w, v in samples.items() if v}
    steady_split = {w: {key: med([d[key] for d in v]) for key in v[0]} for w, v in splits.items() if v}
    recompiles = {w: max(compile_s(d) for d in v) for w, v in splits.items() if v}

    # trace agreement
    jw, ja = keeps[f"jax_fisher_k{jk}"]["traces"]
    check: dict[str, Any] = {}
    for way in (f"torch_vmap_k{tk}", "torch_loop"):
        tw, ta = keeps[way]["traces"]
        (rw, pw), (ra, pa) = max_rel(tw, jw), max_rel(ta, ja)
        check[way] = dict(
            weight_max_rel=rw,
            weight_worst=pw,
            activation_max_rel=ra,
            activation_worst=pa,
            ok=bool(rw <= TRACE_RTOL and ra <= TRACE_RTOL),
        )
        print(
            f"traces {way} vs lampq_jax k={jk}: weight max rel {rw:.1e} ({pw}), activation max rel {ra:.1e} ({pa}) -> "
            f"{'OK' if check[way]['ok'] else 'MISMATCH'} (rtol {TRACE_RTOL})",
            flush=True,
        )
    for k in JAX_KS:
        if k != jk and keeps.get(f"jax_fisher_k{k}", {}).get("traces"):
            ow, oa = keeps[f"jax_fisher_k{k}"]["traces"]
            check[f"jax_k{k}_vs_k{jk}_max_rel"] = max(max_rel(ow, jw)[0], max_rel(oa, ja)[0])

    fisher = times[f"jax_fisher_k{jk}"]
    torch_ways = {w: t for w, t in times.items() if w.startswith("torch_vmap") or w == "torch_loop"}
    torch_best_way = min(torch_ways, key=torch_ways.get)
    fb = first[f"jax_fisher_k{jk}"]
    result: dict[str, Any] = dict(
        model=SPECS[name]["label"],
        num_samples=N_MAIN,
        num_layers=len(s["layers"]),
        logits_max_abs_diff=diff,
        best_k=jk,
        fisher_over_batch_grad=fisher / times["jax_batch_grad"],
        speedup_vs_torch_best=torch_ways[torch_best_way] / fisher,
        first_call_over_batch_grad=fb["total"] / times["jax_batch_grad"],
        first_call_speedup_vs_torch_best=torch_ways[torch_best_way] / fb["total"],
        torch_best_way=torch_best_way,
        times_s=times,
        samples_per_way={w: len(v) for w, v in samples.items() if v},
        jax_first_call_s=first,
        jax_fisher_steady_split_s=steady_split,
        max_compile_s_in_timed_calls=recompiles,
        recompiles_on_repeated_calls=bool(any(v > 0.05 for v in recompiles.values())),
        trace_check=check,
    )
    goal_speedup = GOAL_SPEEDUP[name]
    result["goals"] = {
        "fisher_over_batch_grad_le_1.2": bool(result["fisher_over_batch_grad"] <= GOAL_RATIO),
        f"speedup_vs_torch_ge_{goal_speedup}": bool(result["speedup_vs_torch_best"] >= goal_speedup),
    }
    print("times (median): " + ", ".join(f"{w} {t:.2f}s" for w, t in times.items()), flush=True)
    print(
        f"fisher/batch_grad {result['fisher_over_batch_grad']:.2f}; speedup vs {torch_best_way} "
        f"{result['speedup_vs_torch_best']:.2f}; compile seconds in timed calls: {recompiles}",
        flush=True,
    )

    if scaling:
        ns = SCALING_NS[name]
        s_samples: dict[str, list[float]] = defaultdict(list)
        s_splits: dict[str, list[dict[str, float]]] = defaultdict(list)
        scale_ways = {}
        for n in ns:
            if n == N_MAIN:
                continue
            w = f"n{n}"
            scale_ways[w] = timed(jax_fisher_fn(s, n, min(jk, n), s_splits[w]), s_samples[w])
            scale_ways[w]()  # first call: compiles for this input shape
        reps = 0 if big else 3
        if reps:
            interleaved_medians(scale_ways, reps)
        rows = []
        for n in ns:
            if n == N_MAIN:
                fc = fb
                steady = None if big else fisher
            else:
                fc = s_splits[f"n{n}"][0]
                steady = None if big else med(s_samples[f"n{n}"][1:])
            run = fc["run"] if big else steady
            rows.append(
                dict(
                    n=n,
                    k=min(jk, n),
                    first_call_s=fc["total"],
                    first_call_compile_s=compile_s(fc),
                    steady_s=steady,
                    run_s=run,
                    run_per_sample_s=run / n,
                )
            )
        result["scaling"] = dict(
            rows=rows,
            repeats=reps,
            run_source="run part of the first call" if big else "steady calls, median",
            fit_run=fit_line([r["n"] for r in rows], [r["run_s"] for r in rows]),
            fit_first_call=fit_line([r["n"] for r in rows], [r["first_call_s"] for r in rows]),
        )
        print(
            f"scaling: R² run {result['scaling']['fit_run']['r2']:.4f}, first call {result['scaling']['fit_first_call']['r2']:.4f}",
            flush=True,
        )

    result["torch_thread_check"] = dict(n=THREAD_CHECK_N[name], times_s=thread_check(s, tf, THREAD_CHECK_N[name]))
    print(
        "torch threads check: "
        + ", ".join(f"{w} {t:.2f}s" for w, t in result["torch_thread_check"]["times_s"].items()),
        flush=True,
    )

    if memory:
        mem_ways = ["jax_batch_grad"] + ([f"jax_fisher_k{jk}"] if big else [f"jax_fisher_k{k}" for k in JAX_KS])
        mem_ways += [f"torch_vmap_k{tk}"] + ([] if big else ["torch_loop", "torch_batch_grad"])
        result["memory"] = {}
        for way in mem_ways:
            m = result["memory"][way] = measure_memory(name, way, 1 if big else 2)
            print(
                f"memory {way}: first call +{m['first_peak_mb']:.0f} MB ({m['first_call_s']:.2f}s)"
                + (
                    f", second call +{m['second_peak_mb']:.0f} MB ({m['second_call_s']:.2f}s)"
                    if "second_peak_mb" in m
                    else ""
                ),
                flush=True,
            )
    result["wall_s"] = time.perf_counter() - t0
    return result


def markdown(results: dict[str, Any]) -> str:
    out = ["## Per-sample Fisher (`fisher_traces`) against the batched gradient and PyTorch", ""]
    out.append(
        f"N = {N_MAIN} random images with random labels (empirical Fisher); identical timm random weights in both "
        "frameworks (lampq_jax model via `from_timm` + `build_model`, exact GELU). *time*: median of steady calls "
        "(whole `fisher_traces` calls, after each k's first call compiled it), timed in interleaved rounds. "
        "*first call*: the same process's first call of that way, compile included; *compile* = trace + lowering + "
        "XLA compile (jax.monitoring), *run* = first call − compile. Peak memory: fresh subprocess per way, VmHWM − VmRSS "
        "around the call with the high-water mark reset before it (first call, compile included / second call). "
        f"torch: {TORCH_THREADS} thread (its best on this shared 2-core machine; with 2 threads it is several times slower, "
        "see the threads check); `torch.func.vmap(grad)` uses math attention (SDPA has no vmap rule), the loop uses "
        "timm's fused SDPA. JAX with its default threading."
    )
    for name, r in results.items():
        out += ["", f"### {r['model']}", ""]
        out.append(
            f"Logits JAX vs torch: max |Δ| = {r['logits_max_abs_diff']:.1e}; {r['num_layers']} layers; "
            f"compile seconds inside the timed (repeated) `fisher_traces` calls: at most "
            f"{max(r['max_compile_s_in_timed_calls'].values()):.2f} s → "
            f"{'RECOMPILES on every call' if r['recompiles_on_repeated_calls'] else 'no recompilation on repeated calls'}."
        )
        out += [
            "",
            "| way | time (s) | × jax batch grad | first call (s) | compile (s) | run (s) | peak MB first / second call |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        floor = r["times_s"]["jax_batch_grad"]
        mem = r.get("memory", {})
        names = list(dict.fromkeys(list(r["jax_first_call_s"]) + list(r["times_s"])))
        for way in names:
            t = r["times_s"].get(way)
            fc = r["jax_first_call_s"].get(way)
            m = mem.get(way)
            mark = " **(best)**" if way in (f"jax_fisher_k{r['best_k']}", r["torch_best_way"]) else ""
            cells = [
                "" if t is None else f"{t:.2f} (n={r['samples_per_way'][way]})",
                "" if t is None else f"{t / floor:.2f}",
                "" if fc is None else f"{fc['total']:.2f}",
                "" if fc is None or "trace" not in fc else f"{compile_s(fc):.2f}",
                "" if fc is None or "run" not in fc else f"{fc['run']:.2f}",
                ""
                if m is None
                else f"{m['first_peak_mb']:.0f} / " + (f"{m['second_peak_mb']:.0f}" if "second_peak_mb" in m else "–"),
            ]
            out.append(f"| `{way}`{mark} | " + " | ".join(cells) + " |")
        g = list(r["goals"].values())
        out += [
            "",
            f"- fisher / batch grad = **{r['fisher_over_batch_grad']:.2f}** (goal ≤ {GOAL_RATIO}: "
            f"{'met' if g[0] else 'NOT met'}); first call (compile included) / batch grad = {r['first_call_over_batch_grad']:.2f}.",
            f"- speedup vs PyTorch's best (`{r['torch_best_way']}`) = **{r['speedup_vs_torch_best']:.2f}×** (goal ≥ "
            f"{GOAL_SPEEDUP[name]}: {'met' if g[1] else 'NOT met'}); first call (compile included): "
            f"{r['first_call_speedup_vs_torch_best']:.2f}×.",
        ]
        for way, c in r["trace_check"].items():
            if isinstance(c, dict):
                out.append(
                    f"- traces `{way}` vs lampq_jax: weight max rel {c['weight_max_rel']:.1e}, activation max rel "
                    f"{c['activation_max_rel']:.1e} → {'agree' if c['ok'] else 'DISAGREE'} (rtol {TRACE_RTOL})."
                )
        others = {w: c for w, c in r["trace_check"].items() if not isinstance(c, dict)}
        if others:
            out.append(
                "- other k vs best k (max rel): "
                + ", ".join(f"{w.split('_vs')[0]} {c:.1e}" for w, c in others.items())
                + "."
            )
        tc = r.get("torch_thread_check")
        if tc:
            out.append(
                f"- torch threads check (N = {tc['n']}, one round): "
                + ", ".join(f"`{w}` {t:.2f} s" for w, t in tc["times_s"].items())
                + "."
            )
        if "scaling" in r:
            sc = r["scaling"]
            out += [
                "",
                f"Time against N (k = min(best k, N); run = {sc['run_source']}):",
                "",
                "| N | k | first call (s) | its compile (s) | steady (s) | run (s) | run / N (s) |",
                "|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for row in sc["rows"]:
                steady = "" if row["steady_s"] is None else f"{row['steady_s']:.2f}"
                out.append(
                    f"| {row['n']} | {row['k']} | {row['first_call_s']:.2f} | {row['first_call_compile_s']:.2f} | "
                    f"{steady} | {row['run_s']:.2f} | {row['run_per_sample_s']:.4f} |"
                )
            fr, ff = sc["fit_run"], sc["fit_first_call"]
            out.append(
                f"\nLine fit of run: {fr['intercept_s']:.2f} s + {fr['slope_s_per_sample']:.4f} s·N, R² = {fr['r2']:.4f}; "
                f"of the first call: {ff['intercept_s']:.2f} s + {ff['slope_s_per_sample']:.4f} s·N, R² = {ff['r2']:.4f}."
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["small_vit", "vit_s16"], choices=list(SPECS))
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default: small ViT 5, ViT-S/16 3)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "WAY", "CALLS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(TORCH_THREADS)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    start = time.perf_counter()
    results = {}
    for name in args.models:
        rounds = args.rounds or (3 if name == "vit_s16" else 5)
        results[name] = bench_model(name, rounds, not args.no_memory, not args.no_scaling)
    wall = time.perf_counter() - start
    print(f"\ntotal wall time {wall:.0f}s", flush=True)
    command = COMMAND + ("" if not sys.argv[1:] else " " + " ".join(sys.argv[1:]))
    body = markdown(results) + f"\n\nWhole benchmark: {wall / 60:.1f} min."
    write_section("bench_fisher", body, command)
    write_json(
        "fisher_speed.json",
        dict(
            machine=machine(),
            command=command,
            wall_s=wall,
            torch=torch.__version__,
            torch_threads=TORCH_THREADS,
            **results,
        ),
    )
    print(body)


if __name__ == "__main__":
    main()

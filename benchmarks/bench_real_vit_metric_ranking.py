"""How well the Fisher metric ranks the real ViT's units, and how well any ranking can: DINOv2-S/14.

`bench_real_vit_ceiling.py` measured ΔJ_i(b) (J = mean 1 − class-token cosine) of each of the 48 units (qkv,
proj, fc1, fc2 of each block) quantized alone at 3–6 bits, W/A tied, weights only and inputs only, on 16
calibration crops of draw 0 and on 16 evaluation crops of other photos (its results json,
`real_vit_ceiling.json`). This benchmark computes the metric on the 32 calibration crops with the same base
quantizers (`prepared_dinov2`) and ranks the units by it:

    ΔL̂_i(b) = ½ [tr(F^W_i)/|W_i| · ‖Q_b(W_i) − W_i‖²  +  A-term]            (METHOD.md §4)

with four estimates of the activation term, each from the same per-sample gradients g_{n,t,c} of the input
perturbation (n: sample, t: token, c: channel) and input errors e_{n,t,c}(b) = Q_b(A) − A:
- 'trace' (LampQ's): tr(F^A)/|A| · mean_n ‖e_n‖², the Gaussian feature likelihood (`fisher_traces`);
- 'trace, cosine likelihood': the same with the likelihood whose Fisher is the Gauss-Newton matrix of 1 − cos
  (ℓ = −½ ‖P (f − y)‖² / ‖f‖, P = I − f̂f̂ᵀ, f and P held fixed), which puts α near 1;
- 'per channel': Σ_c mean_{n,t} g²_{ntc} · mean_n Σ_t e²_{ntc};
- 'per element': mean_n Σ_{t,c} g²_{ntc} e²_{ntc}.
Columns: Spearman of the activation term against the measured inputs-only ΔJ; of the tied Ω against the
measured tied ΔJ with α = none, α = probe (P = 4 units per type, as LampQ), α = probe fitted apart for the
weights and the inputs (from the same units' weights-only and inputs-only ΔJ), and the best α per type (fitted
on every unit, what no per-type scale can beat); and of α = probe's Ω (and the apart one's) against the tied
ΔJ measured on the evaluation crops. The last row ranks by the tied ΔJ measured on the calibration crops themselves: how well
the measured costs of 16 crops reproduce on other photos.

    python benchmarks/bench_real_vit_metric_ranking.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_vit_ceiling import prepared_dinov2  # noqa: E402
from common import RESULTS_DIR, write_json, write_section  # noqa: E402

from lampq_jax.apply.dynamic import dynamic_bits, dynamic_interceptor  # noqa: E402
from lampq_jax.config import LampQConfig  # noqa: E402
from lampq_jax.quant.uniform import UniformParams, fake_quant  # noqa: E402
from lampq_jax.sensitivity.fisher import fisher_traces, gaussian_log_likelihood, sample_targets  # noqa: E402
from lampq_jax.sensitivity.metric import (  # noqa: E402
    alpha_by_type,
    predicted_increase,
    probe_indices,
    spearman,
    weight_errors,
)

CANDIDATES = LampQConfig().candidates
BITS = (3, 4)  # probe bits of the rows; the ceiling measured (3, 4, 5, 6)
TYPES = ("qkv", "proj", "fc1", "fc2")


def cosine_log_likelihood(output: jax.Array, target: jax.Array) -> jax.Array:
    """−½ ‖P (f − y)‖² / ‖f‖ with f = `output` [1, D], P = I − f̂f̂ᵀ, and f in P and ‖f‖ held fixed: its
    per-sample Fisher at y ~ N(f, I) is P / ‖f‖², the Hessian of 1 − cos(f', f) at f' = f."""
    f = output.reshape(-1)
    fixed = jax.lax.stop_gradient(f)
    norm = jnp.linalg.norm(fixed)
    unit = fixed / norm
    r = f - target.reshape(-1)
    return -0.5 * jnp.sum(jnp.square(r - unit * jnp.dot(unit, r))) / norm


def activation_terms(model, prep, layers, targets, images, chunk=4) -> dict[str, np.ndarray]:
    """{'per channel', 'per element': [layers, candidates]} activation halves of ΔL̂ (see the module docstring),
    from one backward per chunk of the Gaussian log-likelihood at `targets` [N, D]; every site in float."""
    attention = sorted({s.rsplit("/", 1)[0] for s in prep.act_params if s.endswith("/q")})
    state = jax.tree.map(jnp.asarray, dynamic_bits(prep.act_params, attention, {}))
    tables = {l.path: jnp.asarray(prep.act_params[l.path]) for l in layers}

    @jax.jit
    def sums(x, y):  # {path: (Σ_{n,t} g² [C], Σ_{n,t} e² [C, m], Σ_{n,t,c} g² e² [m])} of one chunk
        zeros = {l.path: jnp.zeros((x.shape[0], *l.input_shape[1:]), jnp.float32) for l in layers}

        def log_likelihood(perturbations):
            errors = {}

            def on_input(site, value):
                if site not in tables:
                    return value
                v, t = jax.lax.stop_gradient(value), tables[site]
                errors[site] = jnp.stack(
                    [jnp.square(fake_quant(v, UniformParams(t[b, 0], t[b, 1]), b) - v) for b in CANDIDATES], -1
                )
                return value + perturbations[site].astype(value.dtype)

            with nn.intercept_methods(dynamic_interceptor(state, ste=True, on_input=on_input)):
                out = model.apply(prep.variables, x, train=False)
            return jnp.sum(jax.vmap(lambda o, t: gaussian_log_likelihood(o[None], t))(out, y)), errors

        grads, errors = jax.grad(log_likelihood, has_aux=True)(zeros)
        out = {}
        for path, g in grads.items():
            g2 = jnp.square(g).reshape(x.shape[0], -1, g.shape[-1])
            e2 = errors[path].reshape(*g2.shape, len(CANDIDATES))
            out[path] = (g2.sum((0, 1)), e2.sum((0, 1)), jnp.einsum("ntc,ntcm->m", g2, e2))
        return out

    total = None
    for start in range(0, len(images), chunk):
        part = jax.device_get(sums(images[start : start + chunk], targets[start : start + chunk]))
        total = part if total is None else jax.tree.map(np.add, total, part)
    n = len(images)
    channel, element = [], []
    for l in layers:
        g2, e2, ge = (np.asarray(a, np.float64) for a in total[l.path])
        tokens = int(np.prod(l.input_shape[1:-1]))
        channel.append(0.5 * ((g2 / (n * tokens))[:, None] * (e2 / n)).sum(0))
        element.append(0.5 * ge / n)
    return {"per channel": np.array(channel), "per element": np.array(element)}


def by_unit(term: np.ndarray, layers, units: list[str], bits: int) -> np.ndarray:
    """[units] Σ over each unit's layers of `term` [layers, candidates] at `bits`."""
    col = CANDIDATES.index(bits)
    return np.array([sum(term[j, col] for j, l in enumerate(layers) if l.group == u) for u in units])


def type_alpha(predicted: np.ndarray, measured: np.ndarray, types: list[str], fitted_on) -> dict[str, float]:
    """α_t = Σ ΔJ / Σ ΔL̂ over the units `fitted_on` of each type: LampQ's `alpha_by_type('probe', ...)`."""
    return alpha_by_type("probe", types, predicted, measured_low={k: float(measured[k]) for k in fitted_on})


def scaled(predicted: np.ndarray, measured: np.ndarray, types: list[str], fitted_on) -> np.ndarray:
    """[units] α_t · predicted, α_t from `type_alpha`."""
    alpha = type_alpha(predicted, measured, types, fitted_on)
    return np.array([alpha[t] for t in types]) * predicted


def main() -> None:
    start_all = time.perf_counter()
    ceiling = json.loads((RESULTS_DIR / "real_vit_ceiling.json").read_text())
    model, prep, _, calibration, _, fp_apply = prepared_dinov2()
    config = LampQConfig()
    layers = [l for l in prep.layers if l.type not in config.fixed_types]
    units = list(dict.fromkeys(l.group for l in layers))
    if units != ceiling["units"]:
        raise ValueError("the ceiling json's units differ from this model's; rerun bench_real_vit_ceiling.py")
    types = [next(l.type for l in layers if l.group == u) for u in units]
    probed = sorted(
        members[i]
        for t in TYPES
        for members in [[k for k, tk in enumerate(types) if tk == t]]
        for i in probe_indices(len(members), config.probes)
    )
    rng = jax.random.key(0)
    outputs = fp_apply(calibration)  # the float outputs of the 32 crops, one batch
    w_err = weight_errors(prep.variables, layers, CANDIDATES)
    common = dict(
        rng=rng,
        batch_size=8,
        output="features",
        outputs=outputs,
        act_params=prep.act_params,
        candidates=CANDIDATES,
        train=False,
    )
    estimates = {}
    for name, likelihood in (("trace", None), ("trace, cosine likelihood", cosine_log_likelihood)):
        fisher = fisher_traces(model, prep.variables, calibration, layers, log_likelihood=likelihood, **common)
        errors = np.stack([fisher.input_errors[l.path] for l in layers])
        estimates[name] = predicted_increase(fisher, layers, w_err, errors)
    w_term = estimates["trace"][0]
    targets = np.asarray(sample_targets(outputs, rng, "features"))  # the targets `fisher_traces` drew with rng
    for name, a_term in activation_terms(model, prep, layers, targets, calibration).items():
        estimates[name] = (w_term, a_term)

    rows, within = [], []
    for bits in BITS:
        col = ceiling["probe_bits"].index(bits)
        measured = {
            (domain, kind): np.array([r[col] for r in ceiling["curves"][domain][kind]])
            for domain in ("calibration", "evaluation (oracle)")
            for kind in ("tied", "weights", "activations")
        }
        tied, weights, acts = (measured["calibration", kind] for kind in ("tied", "weights", "activations"))
        held = measured["evaluation (oracle)", "tied"]
        for name, (w, a) in estimates.items():
            w_u, a_u = by_unit(w, layers, units, bits), by_unit(a, layers, units, bits)
            omega = w_u + a_u
            probe = scaled(omega, tied, types, probed)
            apart = scaled(w_u, weights, types, probed) + scaled(a_u, acts, types, probed)
            rows.append(
                {
                    "bits": bits,
                    "ranking": name,
                    "acts": spearman(a_u, acts),
                    "none": spearman(omega, tied),
                    "probe": spearman(probe, tied),
                    "probe_apart": spearman(apart, tied),
                    "input_over_weight_alpha": {
                        t: type_alpha(a_u, acts, types, probed)[t] / type_alpha(w_u, weights, types, probed)[t]
                        for t in TYPES
                    },
                    "best_type_alpha": spearman(scaled(omega, tied, types, range(len(units))), tied),
                    "probe_vs_held_out": spearman(probe, held),
                    "apart_vs_held_out": spearman(apart, held),
                    "alpha": type_alpha(omega, tied, types, probed),
                }
            )
            within.append(
                {
                    "bits": bits,
                    "ranking": name,
                    **{
                        t: spearman(*(v[[k for k in range(len(units)) if types[k] == t]] for v in (omega, tied)))
                        for t in TYPES
                    },
                }
            )
        rows.append(
            {
                "bits": bits,
                "ranking": "measured ΔJ on the 16 calibration crops",
                "acts": None,
                "none": None,
                "probe": None,
                "probe_apart": None,
                "apart_vs_held_out": None,
                "input_over_weight_alpha": None,
                "best_type_alpha": None,
                "probe_vs_held_out": spearman(tied, held),
                "alpha": None,
            }
        )
        within.append(
            {
                "bits": bits,
                "ranking": "measured ΔJ on the 16 calibration crops, against the evaluation crops'",
                **{
                    t: spearman(*(v[[k for k in range(len(units)) if types[k] == t]] for v in (tied, held)))
                    for t in TYPES
                },
            }
        )
        print(bits, rows[-5:], flush=True)

    cell = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "| bits | ranking by | inputs: Ω^A vs inputs-only ΔJ | tied, α = none | tied, α = probe | tied, α = probe "
        "for W and A apart | tied, best α per type | α = probe vs ΔJ on evaluation crops | α apart vs ΔJ on evaluation "
        "crops | α = probe (qkv, proj, "
        "fc1, fc2) | α^A / α^W (qkv, proj, fc1, fc2) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        alphas = "—" if r["alpha"] is None else ", ".join(f"{r['alpha'][t]:.3g}" for t in TYPES)
        ratio = r["input_over_weight_alpha"]
        ratios = "—" if ratio is None else ", ".join(f"{ratio[t]:.3g}" for t in TYPES)
        lines.append(
            f"| {r['bits']} | {r['ranking']} | {cell(r['acts'])} | {cell(r['none'])} | {cell(r['probe'])} "
            f"| {cell(r['probe_apart'])} | {cell(r['best_type_alpha'])} | {cell(r['probe_vs_held_out'])} "
            f"| {cell(r['apart_vs_held_out'])} | {alphas} "
            f"| {ratios} |"
        )
    lines += [
        "",
        "Within each type (12 units): Spearman of Ω (α cancels) against the tied ΔJ on the calibration crops; the "
        "last row of each bit-width: the calibration crops' ΔJ against the evaluation crops'.",
        "",
        "| bits | ranking by | qkv | proj | fc1 | fc2 |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['bits']} | {r['ranking']} | " + " | ".join(f"{r[t]:.2f}" for t in TYPES) + " |" for r in within]
    total = time.perf_counter() - start_all
    body = (
        "## The Fisher metric's ranking of the real ViT's units (DINOv2-S/14, calibration draw 0)\n\n"
        "Spearman over the 48 units (qkv, proj, fc1, fc2 of 12 blocks) of the metric at b bits, from 32 calibration "
        "crops, against ΔJ (1 − class-token cosine) of each unit quantized alone at b bits, measured by "
        "`bench_real_vit_ceiling.py` on 16 of those crops (W/A tied, or inputs only) and on 16 evaluation crops of "
        "other photos. The four rankings differ in the activation half of ΔL̂ (module docstring); the weight half "
        "is LampQ's (the cosine likelihood's own weight traces in its row). 'best α per type': each type's α fitted "
        "on all of its units, the most that any per-type scale can reach. LampQ's own metric check measures on all "
        "32 crops, so its figure (0.797 in `bench_real_vit_lampq_spearman`) is not this table's.\n\n"
        + "\n".join(lines)
        + f"\n\nWhole run: {total:.0f} s."
    )
    write_section("bench_real_vit_metric_ranking", body, "python benchmarks/bench_real_vit_metric_ranking.py")
    write_json("real_vit_metric_ranking.json", {"rows": rows, "within_type": within, "seconds": total})


if __name__ == "__main__":
    main()

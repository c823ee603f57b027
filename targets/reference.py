"""Reference samples: generating the project's own MCMC references (``python -m targets.reference --target
lj13 --n 10000``), their physics self-checks, and the manifest written beside each file. Finding, verifying
and loading every source (published splits, exact GMM-40 samples, generated references) is
``targets/reference_data.py``; its API is re-exported here."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from targets import mcmc
from targets.base import ParticleTarget, Target
from targets.reference_data import (  # noqa: F401  (re-exported: the loading API and its constants)
    DATA_ENV,
    EXACT_SEEDS,
    EXACT_SIZES,
    MANIFEST_FORMAT,
    MCMC_SEEDS,
    PUBLISHED_FILES,
    PUBLISHED_SHA256,
    REPO,
    SOURCES,
    ReferenceError,
    ReferenceNotFoundError,
    check_split,
    clear_cache,
    data_dirs,
    default_output_dir,
    generated_dirs,
    load_reference,
    read_manifest,
    reference_info,
    sha256_file,
    verify_generated,
)


# --------------------------------------------------------------------------------------------- physics checks
def physics_checks(target: Target, x: Tensor, tol: float = 0.03) -> dict[str, Any]:
    """Self-checks of equilibrium at kT = 1 on samples x [N, dim] (float64 internally).

    β̂ = E[ΔE] / E[|∇E|²] must be 1 within ``tol``; for particle targets (centred samples) the virial
    E[x·∇E] must equal the degrees of freedom (n − 1)·d within ``tol`` (relative). Standard errors are
    naive (i.i.d.) and indicative only.
    """
    x = x.to(torch.float64)
    if isinstance(target, ParticleTarget):
        x = target.center(x)
    e, g = target.energy_and_grad(x)
    lap = target.laplacian(x)
    g2 = (g * g).sum(-1)
    beta_hat = lap.mean().item() / g2.mean().item()
    # delta-method standard error of a ratio of means
    n = x.shape[0]
    a, b = lap - beta_hat * g2, g2.mean()
    beta_se = (a.std() / math.sqrt(n) / b).item()
    out: dict[str, Any] = {
        "beta_hat": {"value": beta_hat, "se": beta_se, "bounds": [1 - tol, 1 + tol]},
    }
    out["beta_hat"]["passed"] = bool(abs(beta_hat - 1) <= tol)
    if isinstance(target, ParticleTarget):
        v = (x * g).sum(-1)
        dof = target.n_dof
        out["virial"] = {
            "value": v.mean().item(),
            "se": (v.std() / math.sqrt(n)).item(),
            "expected": dof,
            "ratio": v.mean().item() / dof,
            "bounds": [dof * (1 - tol), dof * (1 + tol)],
        }
        out["virial"]["passed"] = bool(abs(v.mean().item() / dof - 1) <= tol)
    out["passed"] = all(v["passed"] for v in out.values() if isinstance(v, dict))
    return out


def energy_summary(target: Target, x: Tensor) -> dict[str, float]:
    e = target.energy(x.to(torch.float64))
    return {
        "energy_mean": e.mean().item(),
        "energy_std": e.std().item(),
        "energy_min": e.min().item(),
        "energy_max": e.max().item(),
    }


# ------------------------------------------------------------------------------------------------ generation
@dataclass
class SamplerSettings:
    """MCMC settings of a generated reference (all recorded in the manifest).

    n_chains: chains at T = 1 (replicas M); n_temps / t_max: geometric temperature ladder (K = 1: no
    tempering); n_burnin: adaptation steps (step sizes frozen afterwards); thin: steps between kept samples;
    surplus: fraction of extra samples drawn so that dropping stuck chains still leaves n.
    """

    kernel: str = "mala"
    n_chains: int = 500
    n_temps: int = 1
    t_max: float = 1.0
    n_burnin: int = 2000
    thin: int = 100
    step_size: float = 0.01
    target_accept: float | None = None
    adapt_rate: float = 0.05
    swap_every: int = 1
    surplus: float = 0.05
    init: str = "lattice"
    init_spacing: float = 1.1
    dtype: str = "float64"
    stuck_accept_fraction: float = 0.25
    check_every: int = 10
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


DEFAULT_SETTINGS: dict[str, SamplerSettings] = {
    # DW-4: pair barrier 4²/(4·0.9) ≈ 4.4 kT between d ≈ 2.5 and d ≈ 5.5 -> replica exchange up to T = 4
    "dw4": SamplerSettings(
        kernel="mala", n_chains=1000, n_temps=6, t_max=4.0, n_burnin=3000, thin=100, step_size=0.1,
        init="gaussian", init_spacing=2.0, check_every=1,
    ),
    # LJ-13 at kT = 1 (ε_eff = 2): a liquid-like cluster; a short ladder helps rearrangements
    "lj13": SamplerSettings(
        kernel="mala", n_chains=1000, n_temps=4, t_max=1.6, n_burnin=3000, thin=150, step_size=0.02,
        check_every=5,
    ),
    # LJ-55: the cluster's density relaxes slowly (from a cubic lattice E and the virial still drift after
    # 3000 MALA steps); start from a dense FCC droplet, which melts to equilibrium (E ≈ −325) in ~4000 steps.
    # τ of the energy ≈ 300 steps at T = 1 (250-chain run), hence thin 300.
    "lj55": SamplerSettings(
        kernel="mala", n_chains=500, n_temps=4, t_max=1.4, n_burnin=5000, thin=300, step_size=0.01,
        init="compact", init_spacing=1.05, check_every=2,
    ),
}


def initial_positions(
    target: Target, n: int, settings: SamplerSettings, generator: torch.Generator, dtype: torch.dtype
) -> Tensor:
    """Starting points [n, dim]: particles on random sites of a cubic lattice (spacing ``init_spacing``)
    with small jitter, or isotropic Gaussians of std ``init_spacing``; centred for particle targets."""
    if settings.init == "gaussian" or not isinstance(target, ParticleTarget):
        x = settings.init_spacing * torch.randn(n, target.dim, generator=generator, dtype=dtype)
    elif settings.init == "compact":
        # the n sites of an FCC lattice (nearest-neighbour distance init_spacing) closest to the origin,
        # randomly rotated per chain, with small jitter: a dense droplet, no vacancies to anneal out
        npart, d = target.n_particles, target.spatial_dim
        if d != 3:
            raise ValueError("init 'compact' is for 3-D particles; use 'lattice' or 'gaussian'")
        k = math.ceil(npart ** (1 / 3)) + 2
        ax = torch.arange(-k, k + 1, dtype=dtype)
        cube = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
        fcc = cube[(cube.sum(-1) % 2) == 0] * (settings.init_spacing / math.sqrt(2))
        order = (fcc - fcc.mean(0)).norm(dim=-1).argsort(stable=True)
        site = fcc[order[:npart]]
        q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=generator, dtype=dtype))
        jitter = 0.05 * torch.randn(n, npart, d, generator=generator, dtype=dtype)
        x = (site.unsqueeze(0) @ q.transpose(-1, -2) + jitter).reshape(n, -1)
    elif settings.init == "lattice":
        npart, d = target.n_particles, target.spatial_dim
        side = math.ceil(npart ** (1 / d) + 1e-9)
        grid = torch.stack(torch.meshgrid(*[torch.arange(side, dtype=dtype)] * d, indexing="ij"), -1)
        grid = grid.reshape(-1, d) * settings.init_spacing
        idx = torch.rand(n, grid.shape[0], generator=generator).argsort(-1)[:, :npart]
        x = grid[idx] + 0.05 * torch.randn(n, npart, d, generator=generator, dtype=dtype)
        x = x.reshape(n, -1)
    else:
        raise ValueError(f"unknown init {settings.init!r}; valid: compact, lattice, gaussian")
    return target.center(x) if isinstance(target, ParticleTarget) else x


def gate_checks(
    target: Target, saved: dict[str, Any], chain: dict[str, Any], stuck_fraction: float, tol: float = 0.03
) -> dict[str, Any]:
    """The pass/fail rule of a generated reference.

    The expectations E_p[ΔE]/E_p[|∇E|²] (β̂) and E_p[x·∇E] (virial) are estimated from the T = 1 chains over
    the whole sampling phase (``chain``: many more states than are saved) and must be within ``tol`` of
    1 and (n − 1)·d. The saved samples' own estimates (``saved``, from ``physics_checks``) must agree with
    the expected values within max(tol, 3 standard errors): the virial is heavy-tailed (per-sample std ≈ 6×
    its mean for DW-4), so n = 10 000 saved samples alone cannot resolve 3 %. At most 10 % of the chains
    may be dropped as stuck.
    """
    out: dict[str, Any] = {"saved_samples": saved, "chain_averages": chain, "rule": gate_checks.__doc__}
    items: list[tuple[str, float, float, float, float]] = []  # name, chain value, expected, saved, saved se
    bh = saved["beta_hat"]
    items.append(("beta_hat", chain["beta_hat"]["value"], 1.0, bh["value"], bh["se"]))
    if "virial" in saved:
        v = saved["virial"]
        items.append(("virial", chain["virial"]["value"], float(v["expected"]), v["value"], v["se"]))
    for name, cval, exp, sval, sse in items:
        out[name] = {
            "chain_value": cval,
            "chain_passed": bool(abs(cval / exp - 1) <= tol),
            "saved_value": sval,
            "saved_se": sse,
            "saved_passed": bool(abs(sval - exp) <= max(tol * abs(exp), 3 * sse)),
            "expected": exp,
        }
        out[name]["passed"] = out[name]["chain_passed"] and out[name]["saved_passed"]
    out["stuck_fraction"] = {"value": stuck_fraction, "bounds": [0.0, 0.1], "passed": stuck_fraction <= 0.1}
    out["passed"] = all(out[k]["passed"] for k in ("stuck_fraction", *(i[0] for i in items)))
    return out


class _RunningChecks:
    """Accumulates E[ΔE], E[|∇E|²], E[x·∇E] and E over the T = 1 chains every ``every`` sampling steps: a
    lower-noise version of ``physics_checks`` over the whole sampling phase (gated by ``gate_checks``)."""

    def __init__(self, target: Target, n_chains: int, every: int) -> None:
        self.target, self.M, self.every = target, n_chains, max(1, every)
        self.lap: list[Tensor] = []
        self.g2: list[Tensor] = []
        self.vir: list[Tensor] = []
        self.e: list[Tensor] = []

    def __call__(self, t: int, state: mcmc.ChainState) -> None:
        if (t + 1) % self.every:
            return
        x = state.x[: self.M]
        g = state.grad[: self.M] if state.grad is not None else self.target.energy_and_grad(x)[1]
        self.lap.append(self.target.laplacian(x).double().cpu())
        self.g2.append((g * g).sum(-1).double().cpu())
        self.vir.append((x * g).sum(-1).double().cpu())
        self.e.append(state.energy[: self.M].double().cpu())

    def result(self) -> dict[str, Any]:
        if not self.lap:
            return {}
        lap, g2, vir = (torch.stack(v) for v in (self.lap, self.g2, self.vir))  # [S, M]
        e = torch.stack(self.e)
        out: dict[str, Any] = {"n_states": int(lap.numel()), "every_steps": self.every}
        e_se = (e.mean(0).std() / math.sqrt(e.shape[1])).item()
        out["energy_mean"] = {"value": e.mean().item(), "se": e_se}
        bh = lap.mean().item() / g2.mean().item()
        # standard errors from the spread of per-chain means (chains are independent)
        M = lap.shape[1]
        bh_chain = lap.mean(0) / g2.mean(0)
        out["beta_hat"] = {"value": bh, "se": (bh_chain.std() / math.sqrt(M)).item()}
        if isinstance(self.target, ParticleTarget):
            vm = vir.mean(0)
            out["virial"] = {
                "value": vir.mean().item(),
                "se": (vm.std() / math.sqrt(M)).item(),
                "expected": self.target.n_dof,
            }
        return out


def _stuck_chains(acc: Tensor, chain_mean_e: Tensor, frac: float) -> tuple[Tensor, dict[str, Any]]:
    """Chains (at T = 1) whose sampling-phase acceptance is below ``frac``·median, or whose mean energy is a
    robust outlier (> 10 MAD-σ from the median over chains). Returns (bad mask [M], report)."""
    med = acc.median()
    low_acc = acc < frac * med
    em = chain_mean_e.median()
    mad = 1.4826 * (chain_mean_e - em).abs().median().clamp_min(1e-12)
    outlier = (chain_mean_e - em).abs() > 10 * mad
    bad = low_acc | outlier
    report = {
        "n_chains": int(acc.numel()),
        "n_low_acceptance": int(low_acc.sum()),
        "n_energy_outliers": int(outlier.sum()),
        "dropped_chains": bad.nonzero().flatten().tolist(),
        "rule": f"acceptance < {frac}·median ({med.item():.3f}) or |chain mean E − median| > 10·MAD-σ",
    }
    return bad, report


def generate_reference(
    target: Target,
    n: int,
    seed: int,
    settings: SamplerSettings | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[Tensor, dict[str, Any]]:
    """Run the reference MCMC; returns (samples [n, dim] float32 centred, manifest without file fields).

    Samples are the T = 1 chains' states every ``thin`` steps after burn-in, stuck chains dropped, shuffled
    with the run's generator (so any prefix mixes all chains), then checked with ``physics_checks``.
    """
    s = settings or DEFAULT_SETTINGS.get(target.name, SamplerSettings())
    dtype = getattr(torch, s.dtype)
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    M = s.n_chains
    per_chain = math.ceil(n * (1 + s.surplus) / M)
    temps = mcmc.geometric_ladder(s.n_temps, s.t_max)
    rex = mcmc.ReplicaExchange(1.0 / temps, M) if s.n_temps > 1 else None
    x0 = initial_positions(target, M * s.n_temps, s, torch.Generator().manual_seed(seed), dtype).to(dev)
    project = target.center if isinstance(target, ParticleTarget) else None
    total = s.n_burnin + per_chain * s.thin
    n_grad_per_step = int(s.extra.get("n_leapfrog", 5)) if s.kernel == "hmc" else 1
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"{target.name} MCMC", unit="step", mininterval=2.0)
    acc_checks = _RunningChecks(target, M, s.check_every)
    t0 = time.perf_counter()
    res = mcmc.run_chains(
        target, x0, gen, kind=s.kernel, n_burnin=s.n_burnin, n_samples=per_chain, thin=s.thin,
        step_size=s.step_size, target_accept=s.target_accept, exchange=rex, swap_every=s.swap_every,
        adapt_rate=s.adapt_rate, project=project, progress=(bar.update if bar is not None else None),
        on_step=acc_checks, n_leapfrog=n_grad_per_step,
    )
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    # T = 1 chains are the first M chain slots
    samples = res.samples[:, :M]  # [S, M, dim]
    energies = res.energies[:, :M]
    acc1 = res.acceptance[:M]
    bad, stuck = _stuck_chains(acc1, res.trace[:, :M].mean(0), s.stuck_accept_fraction)
    keep = ~bad
    xs = samples[:, keep].reshape(-1, target.dim)
    if xs.shape[0] < n:
        raise RuntimeError(
            f"only {xs.shape[0]} samples left after dropping {int(bad.sum())} stuck chains, {n} requested; "
            "raise SamplerSettings.surplus or fix the sampler"
        )
    perm = torch.randperm(xs.shape[0], generator=gen, device=dev)
    xs = xs[perm[:n]].cpu()
    if isinstance(target, ParticleTarget):
        xs = target.center(xs)
    # diagnostics: τ of the energy at every step, and of the radius of gyration at the kept samples
    trace = res.trace[:, :M][:, keep].cpu()
    tau_e = mcmc.integrated_autocorr_time(trace)
    diag: dict[str, Any] = {
        "wall_seconds": wall,
        "device": str(dev),
        # sampler evaluations (energy + gradient) of all temperatures; diagnostics not included
        "energy_evals": int(total * M * s.n_temps * n_grad_per_step),
        "acceptance_T1_mean": acc1.mean().item(),
        "acceptance_T1_min": acc1.min().item(),
        "burnin_acceptance_T1_mean": res.burnin_acceptance[:M].mean().item(),
        "acceptance_per_temperature": res.acceptance.view(s.n_temps, M).mean(-1).tolist(),
        "step_size_per_temperature": res.step_size.view(s.n_temps, M).mean(-1).tolist(),
        "temperatures": temps.tolist(),
        "swap_rates": None if res.swap_rates is None else res.swap_rates.tolist(),
        "iat_energy_steps": tau_e,
        "ess_energy": trace.numel() / tau_e,
        "thin_over_iat": s.thin / tau_e,
        "stuck_chains": stuck,
    }
    if isinstance(target, ParticleTarget):
        p = target.as_particles(samples[:, keep].cpu())
        rg2 = (p - p.mean(-2, keepdim=True)).pow(2).sum((-1, -2))  # [S, M']
        tau_rg = mcmc.integrated_autocorr_time(rg2) if rg2.shape[0] >= 4 else float("nan")
        diag["iat_rg2_samples"] = tau_rg
        diag["ess_rg2"] = rg2.numel() / tau_rg if rg2.shape[0] >= 4 else float("nan")
    diag["iat_energy_samples"] = (
        mcmc.integrated_autocorr_time(energies[:, keep].cpu()) if energies.shape[0] >= 4 else float("nan")
    )
    checks = gate_checks(target, physics_checks(target, xs), acc_checks.result(), float(bad.float().mean()))
    xs32 = xs.to(torch.float32)
    manifest = {
        "format": MANIFEST_FORMAT,
        "target": target.name,
        "display_name": target.display_name,
        "n": n,
        "seed": seed,
        "sampler": asdict(s),
        "diagnostics": diag,
        "checks": checks,
        "summary": energy_summary(target, xs32),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "git_commit": _git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    return xs32, manifest


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def write_reference(x: Tensor, manifest: dict[str, Any], split: str, out_dir: Path, accepted: bool) -> Path:
    """Write ``<target>_<split>.npy`` + ``.json`` (or ``.rejected.*`` when the checks failed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{manifest['target']}_{split}" + ("" if accepted else ".rejected")
    npy = out_dir / f"{stem}.npy"
    tmp = out_dir / f".{stem}.tmp.npy"
    np.save(tmp, x.numpy().astype(np.float32))
    os.replace(tmp, npy)
    man = {
        **manifest,
        "split": split,
        "file": npy.name,
        "sha256": sha256_file(npy),
        "shape": list(x.shape),
        "dtype": "float32",
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(man, indent=1) + "\n")
    clear_cache()
    return npy


def main(argv: list[str] | None = None) -> int:
    import targets

    ap = argparse.ArgumentParser(
        prog="python -m targets.reference",
        description="Generate a reference set with the project's MCMC, check it against physics, cache it.",
    )
    ap.add_argument("--target", required=True, help=f"one of {', '.join(targets.names())}")
    ap.add_argument("--n", type=int, default=10_000, help="samples per split (default 10000)")
    ap.add_argument("--splits", nargs="+", default=["test", "val"], help="splits (default: test val)")
    ap.add_argument("--seed", type=int, default=None, help="seed (default 2000 test, 2001 val, 2002 train)")
    ap.add_argument("--out", type=Path, default=None, help=f"output dir (default {default_output_dir()})")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chains", type=int, default=None, help="chains at T = 1")
    ap.add_argument("--temps", type=int, default=None, help="temperatures in the ladder (1 = no tempering)")
    ap.add_argument("--t-max", type=float, default=None, help="highest temperature")
    ap.add_argument("--burnin", type=int, default=None, help="burn-in (adaptation) steps")
    ap.add_argument("--thin", type=int, default=None, help="steps between kept samples")
    ap.add_argument("--kernel", choices=["rwm", "mala", "hmc"], default=None)
    ap.add_argument("--check-every", type=int, default=None, help="steps between self-check accumulations")
    ap.add_argument("--init", choices=["compact", "lattice", "gaussian"], default=None, help="start points")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        target = targets.get(args.target)
    except KeyError as err:
        ap.error(str(err))
    if not isinstance(target, ParticleTarget):
        ap.error(f"{target.name} has exact samples; nothing to generate")
    for sp in args.splits:
        check_split(target, sp)
    s = DEFAULT_SETTINGS.get(target.name, SamplerSettings())
    over = {
        "n_chains": args.chains, "n_temps": args.temps, "t_max": args.t_max, "n_burnin": args.burnin,
        "thin": args.thin, "kernel": args.kernel, "check_every": args.check_every,
        "init": args.init,
    }
    s = SamplerSettings(**{**asdict(s), **{k: v for k, v in over.items() if v is not None}})
    out = args.out or default_output_dir()
    status = 0
    for sp in args.splits:
        seed = args.seed + list(MCMC_SEEDS).index(sp) if args.seed is not None else MCMC_SEEDS[sp]
        x, man = generate_reference(target, args.n, seed, s, device=args.device, progress=not args.quiet)
        ok = bool(man["checks"]["passed"])
        path = write_reference(x, man, sp, out, accepted=ok)
        c, d, summ = man["checks"], man["diagnostics"], man["summary"]
        print(
            f"{target.name} {sp}: {'PASSED' if ok else 'FAILED'} -> {path}\n"
            f"  E mean {summ['energy_mean']:.3f} std {summ['energy_std']:.3f}; "
            f"beta_hat chains {c['beta_hat']['chain_value']:.4f} saved {c['beta_hat']['saved_value']:.4f} "
            f"± {c['beta_hat']['saved_se']:.4f}; virial chains {c['virial']['chain_value']:.3f} "
            f"saved {c['virial']['saved_value']:.3f} ± {c['virial']['saved_se']:.3f} "
            f"(expect {c['virial']['expected']:.0f}); "
            f"stuck chains {len(d['stuck_chains']['dropped_chains'])}/{d['stuck_chains']['n_chains']}\n"
            f"  acceptance(T=1) {d['acceptance_T1_mean']:.3f}; swaps {d['swap_rates']}; "
            f"tau_E {d['iat_energy_steps']:.1f} steps (thin {s.thin}); ESS_E {d['ess_energy']:.0f}; "
            f"{d['wall_seconds']:.0f} s",
            flush=True,
        )
        status |= 0 if ok else 1
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side timing of the published iDEM code (jarridrb/DEM) and boltzbench, in one process, interleaved.

Nothing of the published code is in this repository: set it up outside (docs/timing.md, "Against the
published code"), then run this script with *that* environment's Python from the DEM checkout (its Hydra
configs and data paths are relative to it); boltzbench is imported from this file's repository.

    cd /tmp/published/DEM && WANDB_MODE=disabled OMP_NUM_THREADS=1 \\
        ../venv/bin/python /work/main/scripts/bench_published.py --target dw4 --parts est,step,sde --rounds 7

Parts, each timed published, ours, published, ours, … after one untimed call of each (ratios per round, so
machine load moves both sides alike):

- ``est``: the MC score estimator on one batch (B × K): ``estimate_grad_Rt`` vs ``IDEM.estimate_score``
  (ours includes the score clipping, the published call does not);
- ``step``: one optimiser step: buffer sample, noising, ``DEMLitModule.get_loss``, backward, gradient-norm
  clip 0.5 and Adam (what Lightning's ``training_step`` + ``gradient_clip_val`` do, without Lightning's
  logging) vs ``IDEM.train_step`` (no buffer refresh inside);
- ``sde``: one reverse-SDE step of a buffer refresh (``--sde-n`` samples, default 1000) at t = 0.5:
  ``euler_maruyama_step`` + ``remove_mean`` vs ``methods.sde.reverse_sde_step``.

Prints one line per round and a ``RESULT`` line per part (minimum, median, ratio of minima, median of the
per-round ratios and their range), in wall-clock and process CPU seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = {"gmm40": "gmm_idem", "dw4": "dw4_idem", "lj13": "lj13_idem", "lj55": "lj55_idem"}


def published(target: str, dem: Path, placeholder: Path) -> tuple[Any, Any]:
    """(energy function, DEMLitModule) of the published experiment config, built as ``dem/train.py`` does."""
    import hydra
    from hydra import compose, initialize_config_dir

    over = [f"experiment={EXPERIMENT[target]}", "trainer=cpu", "logger=csv"]
    if target == "lj55":  # the LJ-55 splits are not in public mirrors; the energy only needs a file to load
        over += [f"energy.data_path_test={placeholder}", f"energy.data_path_val={placeholder}"]
    with initialize_config_dir(config_dir=str(dem / "configs"), version_base="1.3"):
        cfg = compose(config_name="train.yaml", overrides=over)
    energy = hydra.utils.instantiate(cfg.energy)
    return energy, hydra.utils.instantiate(cfg.model, energy_function=energy)


def timed(f: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    f()
    t1, c1 = time.perf_counter(), time.process_time()
    return t1 - t0, c1 - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, choices=sorted(EXPERIMENT))
    ap.add_argument("--parts", default="est,step,sde")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sde-n", type=int, default=1000)
    ap.add_argument("--dem", type=Path, default=Path.cwd(), help="the DEM checkout (default: cwd)")
    ap.add_argument("--inputs", choices=["reference", "prior"], default="reference",
                    help="clean rows behind the noised inputs and in both buffers: the target's reference "
                         "samples (GMM-40: exact ones; what a trained buffer holds) or prior samples")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    T = a.target
    placeholder = Path("/tmp/bench_published_lj55_placeholder.npy")
    if T == "lj55" and not placeholder.exists():
        np.save(placeholder, np.random.default_rng(0).normal(size=(64, 165)))
    energy, pm = published(T, a.dem.resolve(), placeholder)
    from dem.models.components.score_estimator import estimate_grad_Rt
    from dem.models.components.sde_integration import euler_maruyama_step
    from dem.utils.data_utils import remove_mean

    sys.path.insert(0, str(ROOT))
    import targets
    from harness.budget import CountingTarget
    from methods.idem import IDEM, Config
    from methods.sde import reverse_sde_step

    K, B = pm.num_estimator_mc_samples, pm.num_samples_to_sample_from_buffer
    cfg = Config.for_target(T).replace(init_from_prior=True, steps_per_epoch=10**9)
    m = IDEM(CountingTarget(targets.get(T)), cfg, "cpu", torch.Generator().manual_seed(0))
    if (cfg.num_mc_samples, cfg.batch_size) != (K, B):
        raise SystemExit(f"settings differ: ours K={cfg.num_mc_samples} B={cfg.batch_size}, "
                         f"published K={K} B={B}")
    print(f"# {T}: B={B} K={K} threads={torch.get_num_threads()} torch={torch.__version__} published net="
          f"{type(pm.net).__name__}, ours {type(m.net).__name__}; boltzbench {ROOT}", flush=True)
    mol = energy.is_molecule
    shape = (energy.n_particles, energy.n_spatial_dim) if mol else None
    prior = pm.partial_prior(device="cpu", scale=pm.noise_schedule.h(1) ** 0.5)
    parts = a.parts.split(",")
    n_init = pm.num_init_samples
    if a.inputs == "prior":
        clean = prior.sample(n_init)
    else:  # the same clean rows (working coordinates) in both buffers; far-off inputs make exp() denormal
        tgt = targets.get(T)
        ref = tgt.sample(n_init, torch.Generator().manual_seed(0)) if T == "gmm40" else tgt.reference("test")
        clean = ref[:n_init].float() / tgt.length_scale
    popt = None
    if "step" in parts:
        pm.buffer.add(clean, energy(clean))
        popt = pm.hparams.optimizer(params=pm.net.parameters())

    def pub_noised() -> tuple[torch.Tensor, torch.Tensor]:
        x0 = clean[torch.randint(0, clean.shape[0], (B,))]
        t = torch.rand(B)
        xt = x0 + torch.randn_like(x0) * pm.noise_schedule.h(t).sqrt().unsqueeze(-1)
        return t, (remove_mean(xt, *shape) if mol else xt)

    def pub_step() -> None:
        t, xt = pub_noised()
        loss = pm.get_loss(t, xt).mean()
        popt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pm.net.parameters(), 0.5)
        popt.step()

    t_est, xt_est = pub_noised()
    xt_ours, t_ours = xt_est.clone(), t_est.clone()

    def pub_est() -> None:
        estimate_grad_Rt(t_est, xt_est, energy, pm.noise_schedule, K)

    def our_est() -> None:
        with torch.no_grad():
            m.estimate_score(xt_ours, t_ours)

    xs_pub, xs_ours = prior.sample(a.sde_n), m.prior.sample(a.sde_n, m.generator)
    dt, t_half = 1.0 / pm.num_integration_steps, torch.tensor(0.5)

    def pub_sde() -> None:
        with torch.no_grad():
            x, _ = euler_maruyama_step(pm.reverse_sde, t_half, xs_pub, dt, pm.diffusion_scale)
            if mol:
                remove_mean(x, *shape)

    def our_sde() -> None:
        m.net.eval()
        with torch.no_grad():
            reverse_sde_step(m._sampler_score, xs_ours, 0.5, dt, m.schedule, m.config.diffusion_scale,
                             m.generator, m._center if m.particles else None)
        m.net.train()

    m.train_step()  # initialises (prior samples) and warms up; then our buffer holds the same clean rows
    m.buffer = type(m.buffer)(m.dim, m.config.buffer_max_length, m.device)
    m.buffer.add(clean, m._energy(clean))
    pairs = {"est": (pub_est, our_est), "step": (pub_step, m.train_step), "sde": (pub_sde, our_sde)}
    for part in parts:
        pf, of = pairs[part]
        pf()
        of()
        P: list[tuple[float, float]] = []
        O: list[tuple[float, float]] = []  # noqa: E741
        for r in range(a.rounds):
            P.append(timed(pf))
            O.append(timed(of))
            (pw, pc), (ow, oc) = P[-1], O[-1]
            print(f"{T} {part} round {r}: published {pw:.4f} s (cpu {pc:.4f})  ours {ow:.4f} s "
                  f"(cpu {oc:.4f})  ratio {pw / ow:.2f} (cpu {pc / oc:.2f})  load {os.getloadavg()[0]:.1f}",
                  flush=True)
        ratios = [p[0] / o[0] for p, o in zip(P, O)]
        pws, pcs, ows, ocs = ([v[i] for v in s] for s in (P, O) for i in (0, 1))
        print(f"RESULT {T} {part} threads={a.threads} rounds={a.rounds}: published min {min(pws):.4f} med "
              f"{statistics.median(pws):.4f} | ours min {min(ows):.4f} med {statistics.median(ows):.4f} | "
              f"ratio of mins {min(pws) / min(ows):.2f}, median of per-round ratios "
              f"{statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}); CPU s: "
              f"published min {min(pcs):.4f}, ours min {min(ocs):.4f}, ratio {min(pcs) / min(ocs):.2f}",
              flush=True)


if __name__ == "__main__":
    main()

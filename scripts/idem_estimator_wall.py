"""Wall-clock of iDEM's MC score estimator per training step at paper settings, 2 torch threads.

The published code's estimator times (issue 10) were taken with 2 threads on a 2-core CPU, so this is the
like-for-like number. Usage: ``python scripts/idem_estimator_wall.py gmm40 dw4 lj13 lj55``.
"""

import sys
import time

import torch

import targets
from harness.budget import CountingTarget
from methods.idem import IDEM, Config


def main(names: list[str]) -> None:
    torch.set_num_threads(2)
    for name in names:
        cfg = Config.for_target(name).replace(init_from_prior=True, steps_per_epoch=10**9)
        m = IDEM(CountingTarget(targets.get(name)), cfg, "cpu", torch.Generator().manual_seed(0))
        m.train_step()
        B = cfg.batch_size
        x0, _ = m.buffer.sample(B, m.generator)
        t = torch.rand(B, generator=m.generator)
        noise = torch.randn(x0.shape, generator=m.generator)
        xt = m._center(x0 + m.schedule.sigma(t.double()).float()[:, None] * noise)
        ts = []
        with torch.no_grad():
            for _ in range(5):
                t0 = time.perf_counter()
                m.estimate_score(xt, t)
                ts.append(time.perf_counter() - t0)
        ts.sort()
        print(f"{name}: B={B} K={cfg.num_mc_samples} estimator wall s: min {ts[0]:.3f} median {ts[2]:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])

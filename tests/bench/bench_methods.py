"""Micro-benchmarks of the samplers (``make bench``): one training step at each method's ``paper`` settings
and drawing 1000 samples, per target; the whole ``smoke`` grid end to end. (Energy + gradient per
target: bench_targets.py.)

Parametrised at collection time over ``methods.PLANNED`` ∪ the registered methods (unregistered ones are
skipped with a reason) and over the targets chosen by ``--bench-targets`` (default on CPU: gmm40, dw4 —
paper-setting LJ-13 / LJ-55 runs take minutes per call on a 2-core CPU; ``--bench-targets all`` for every
target; on ``--device cuda`` all targets). ``--bench-methods`` restricts the methods.

``paper`` settings: ``M.Config.for_target(t, **M.Config.preset("paper", t))``, exactly what the ``paper`` grid
runs. A training-step benchmark first runs ``WARMUP_STEPS`` steps untimed (initial buffer fills, AIS step-size
adaptation), then times ``--bench-rounds`` single steps: methods with outer-loop work every few steps (buffer
refresh, AIS) show it as spread between rounds, and the timing tables of real runs (``python -m
harness.timing``, ``s / step``) give the amortised cost. A method whose warm-up step takes longer than
``SLOW_STEP_S`` gets one timed round (paper-setting DDS / PIS / iDEM steps on a small CPU); DDS / PIS on
particle targets skip the warm-up on CPU (``SLOW_NO_WARMUP_ON_CPU``). BNEM's 1000-sample draw is NEM's code at
the same settings and is timed once, under NEM (``SHARED_SAMPLER``; checked at run time). Each training step
benchmark records the peak resident memory over its timed steps (``extra_info["peak_rss_mb"]``, the whole
process; ``cuda_peak_mb`` on CUDA). FAB: the warm-up fills its buffer with one AIS batch instead of
``buffer_min / batch_size`` (64 on DW-4), a one-off cost that bench_fab.py times per AIS pass.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from benchutil import peak_rss

import methods
import targets
from harness.budget import CountingTarget

CPU_DEFAULT_TARGETS = ("gmm40", "dw4")
WARMUP_STEPS = 1
N_SAMPLES = 1000
SLOW_STEP_S = 10.0  # a warm-up step slower than this: one timed round instead of --bench-rounds
#: on CPU a paper-setting step of these takes 40-60 s and has no one-off first-step work (no buffer, no AIS
#: adaptation): no warm-up, one timed round (keeps `make bench` within 30 minutes on a 2-core CPU)
SLOW_NO_WARMUP_ON_CPU = frozenset({("pis", "dw4"), ("dds", "dw4"), ("pis", "lj13"), ("dds", "lj13"),
                                   ("pis", "lj55"), ("dds", "lj55")})
#: a method that samples with another's code path at identical sampling settings is timed once, under the
#: other: BNEM.sample is NEM.sample; only these (training-only) fields may differ between their configs
SHARED_SAMPLER = {"bnem": ("nem", frozenset({
    "bootstrap_switch", "bootstrap_mc", "boot_sigma_min", "boot_sigma_max", "bootstrap_start_step",
    "switch_patience", "switch_check_steps", "n_mc", "lambda_eps", "t0_weight", "boot_variance"}))}


def _chosen(
    config: pytest.Config, option: str, available: list[str], cpu_default: tuple[str, ...]
) -> list[str]:
    raw = config.getoption(option, default=None)
    if raw is None:
        on_cpu = config.getoption("device", default="cpu") == "cpu"
        return [k for k in available if k in cpu_default] if on_cpu and cpu_default else list(available)
    if raw.strip() == "all":
        return list(available)
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    unknown = [k for k in keys if k not in available]
    if unknown:
        raise pytest.UsageError(f"{option}: unknown {unknown}; valid: {', '.join(available)} or all")
    return keys


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cfg = metafunc.config
    if "target_name" in metafunc.fixturenames:
        metafunc.parametrize(
            "target_name", _chosen(cfg, "bench_targets", targets.names(), CPU_DEFAULT_TARGETS)
        )
    if "method_name" in metafunc.fixturenames:
        registered = methods.names()
        planned = list(dict.fromkeys([*methods.PLANNED, *registered]))
        keys = _chosen(cfg, "bench_methods", planned, ())
        params = [
            pytest.param(
                k, marks=() if k in registered else pytest.mark.skip(reason=f"method {k!r} not registered")
            )
            for k in keys
        ]
        metafunc.parametrize("method_name", params)


def paper_config(method_name: str, target_name: str) -> Any:
    M = methods.get(method_name)
    cfg = M.Config.for_target(target_name, **M.Config.preset("paper", target_name))
    if method_name == "fab" and getattr(cfg, "use_buffer", False):
        # FAB fills its buffer with buffer_min / batch_size AIS passes before its first step (DW-4: 64, LJ-13:
        # 64 at batch 1024): a one-off cost timed per pass by bench_fab.py. Here the warm-up fills one batch;
        # the timed steps are the paper's (AIS pass every n_updates_per_ais steps, buffer steps between).
        cfg = cfg.replace(buffer_min=cfg.batch_size)
    return cfg


def build(method_name: str, target_name: str, device: torch.device, seed: int = 0) -> Any:
    """A fresh method at its paper settings on a counted target, with a seeded generator on ``device``."""
    M = methods.get(method_name)
    counted = CountingTarget(targets.get(target_name))
    gen = torch.Generator(device=device).manual_seed(seed)
    return M(counted, paper_config(method_name, target_name), device, gen)


def test_train_step(
    method_name: str, target_name: str, bench_device: torch.device, timed: Any, benchmark: Any
) -> None:
    m = build(method_name, target_name, bench_device)
    slow = bench_device.type == "cpu" and (method_name, target_name) in SLOW_NO_WARMUP_ON_CPU
    t0 = time.perf_counter()
    for _ in range(0 if slow else WARMUP_STEPS):
        m.train_step()
    warm_s = time.perf_counter() - t0
    before = m.target.usage.energy_evals
    with peak_rss() as mem:  # peak resident memory over the timed steps
        logs = timed(m.train_step, pedantic=True, warmup_rounds=0,
                     rounds=1 if slow or warm_s / max(WARMUP_STEPS, 1) > SLOW_STEP_S else None)
    assert isinstance(logs, dict)
    rounds = benchmark.stats.stats.rounds if getattr(benchmark, "stats", None) else 1
    benchmark.extra_info.update(
        {
            "energy_evals_per_step": (m.target.usage.energy_evals - before) / max(rounds, 1),
            "warmup_s": warm_s,
            **mem.info(),
            "config": {k: v for k, v in m.config.to_dict().items() if isinstance(v, (int, float, str, bool))},
        }
    )
    print(f"\ntrain_step {method_name} {target_name}: peak RSS {mem.peak / 2**30:.2f} GiB")


def test_sample_1000(
    method_name: str, target_name: str, bench_device: torch.device, timed: Any, benchmark: Any
) -> None:
    if method_name in SHARED_SAMPLER:
        other, train_only = SHARED_SAMPLER[method_name]
        M, O = methods.get(method_name), methods.get(other)
        a = paper_config(method_name, target_name).to_dict()
        b = paper_config(other, target_name).to_dict()
        differ = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
        if M.sample is O.sample and M._generate is O._generate and M.score_fn is O.score_fn \
                and differ <= train_only:
            pytest.skip(f"{method_name} samples with {other}'s code at the same settings (configs differ "
                        f"only in training fields {sorted(differ)}): timed as "
                        f"test_sample_1000[{target_name}-{other}]")
    m = build(method_name, target_name, bench_device)
    m.train_step()  # some methods need one step (buffers, flow initialisation) before sampling
    counted = m.target

    def draw() -> torch.Tensor:
        with counted.sampling():
            return m.sample(N_SAMPLES)

    before = counted.usage.sample_energy_evals
    x = timed(draw, pedantic=True, rounds=1, warmup_rounds=0)
    assert x.shape == (N_SAMPLES, counted.dim)
    benchmark.extra_info["sample_energy_evals"] = counted.usage.sample_energy_evals - before


def test_smoke_grid(tmp_path: Any, benchmark: Any, bench_device: torch.device) -> None:
    """The whole ``smoke`` grid end to end (``python -m harness.run --grid smoke``, local executor, fresh
    results directory): the issue's goal is ≤ 5 minutes on a 2-core CPU. One round; the wall-clock is the
    benchmark's time, the number of cells and their statuses go to ``extra_info``."""
    from harness import run as harness_run
    from harness.records import RunRecord

    root = tmp_path / "runs"
    argv = ["--grid", "smoke", "--executor", "local", "--results", str(root), "--device", bench_device.type]
    rc = benchmark.pedantic(lambda: harness_run.main(argv), rounds=1, iterations=1, warmup_rounds=0)
    records = [RunRecord.read(p) for p in sorted(root.rglob("record.json"))]
    statuses = [r.status for r in records]
    benchmark.extra_info.update(
        {"cells": len(records), "statuses": {s: statuses.count(s) for s in set(statuses)}}
    )
    assert rc == 0 and records

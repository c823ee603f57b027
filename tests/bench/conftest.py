"""pytest-benchmark plumbing for ``tests/bench`` (``make bench``).

- Collects ``bench_*.py`` files in this directory (pytest's default pattern is ``test_*.py``), but only when
  the mark expression selects ``bench`` items (``-m bench``), so a broken or slow benchmark module never
  affects the default test run. Test functions inside are named ``test_*`` as usual; every item collected
  here gets the ``bench`` marker.
- Options (give the ``tests/bench`` path on the command line, as ``make bench`` does, so they are known):
  ``--device {cpu,cuda}`` (default cpu), ``--threads N`` (torch CPU threads; default: torch's),
  ``--bench-targets a,b`` / ``--bench-methods a,b`` (restrict the parametrisations of bench_methods.py;
  ``all`` for every registered one), ``--bench-rounds N`` (rounds of the slow pedantic benchmarks).
- Fixtures: ``bench_device`` (torch.device; CUDA skips when absent), ``bench_sync`` (a no-arg callable that
  waits for the device), ``timed`` (runs a callable under the ``benchmark`` fixture with a device
  synchronisation after every call, so CUDA timings measure the work and not the launch).
- The machine info stored in ``--benchmark-json`` gains torch's version, thread count, the device and the GPU
  name, so ``scripts/bench_compare.py`` can tell when two files come from different set-ups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("boltzbench benchmarks")
    opts: list[tuple[str, dict[str, Any]]] = [
        ("--device", {"default": "cpu", "choices": ["cpu", "cuda"], "help": "device for benchmarks"}),
        ("--threads", {"type": int, "default": None, "help": "torch CPU threads (default: torch's default)"}),
        ("--bench-targets", {"default": None, "help": "comma-separated target keys or 'all'"}),
        ("--bench-methods", {"default": None, "help": "comma-separated method keys or 'all'"}),
        ("--bench-rounds", {"type": int, "default": 3, "help": "rounds of the slow (pedantic) benchmarks"}),
    ]
    for name, kw in opts:
        with contextlib.suppress(ValueError):  # already added by another conftest: theirs wins
            group.addoption(name, **kw)


def _bench_selected(config: pytest.Config) -> bool:
    """Whether the -m expression selects an item carrying only the ``bench`` marker."""
    expr = config.getoption("markexpr", default="") or ""
    if not expr.strip():
        return False  # no -m at all: the project's addopts normally sets one; stay out of the default run
    try:
        from _pytest.mark.expression import Expression

        return bool(Expression.compile(expr).evaluate(lambda name, **kw: name == "bench"))
    except Exception:  # noqa: BLE001 - private API; fall back to a plain reading
        return "bench" in expr and "not bench" not in expr


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_") or file_path.parent != HERE:
        return None
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest's own collector takes it
    if not _bench_selected(parent.config):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents and item.get_closest_marker("bench") is None:
            item.add_marker(pytest.mark.bench)


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("threads", default=None)
    if threads:
        torch.set_num_threads(int(threads))


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    dev = config.getoption("device", default="cpu")
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["bench_device"] = dev
    if dev == "cuda" and torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name(0)


@pytest.fixture(scope="session")
def bench_device(pytestconfig: pytest.Config) -> torch.device:
    dev = pytestconfig.getoption("device", default="cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda given but CUDA is not available")
    return torch.device(dev)


@pytest.fixture(scope="session")
def bench_sync(bench_device: torch.device) -> Callable[[], None]:
    if bench_device.type == "cuda":
        return lambda: torch.cuda.synchronize(bench_device)
    return lambda: None


@pytest.fixture
def timed(benchmark: Any, bench_sync: Callable[[], None], pytestconfig: pytest.Config) -> Callable[..., Any]:
    """``timed(fn, *args, pedantic=False, rounds=None, warmup_rounds=1)``: benchmark ``fn(*args)`` with a
    device synchronisation before timing starts and after every call. ``pedantic=True`` runs a fixed number
    of rounds (``--bench-rounds`` unless given), for calls that take seconds."""

    def run(
        fn: Callable[..., Any],
        *args: Any,
        pedantic: bool = False,
        rounds: int | None = None,
        warmup_rounds: int = 1,
    ) -> Any:
        def call() -> Any:
            out = fn(*args)
            bench_sync()
            return out

        bench_sync()
        if pedantic:
            n = rounds if rounds is not None else int(pytestconfig.getoption("bench_rounds", default=3))
            return benchmark.pedantic(call, rounds=n, iterations=1, warmup_rounds=warmup_rounds)
        return benchmark(call)

    return run

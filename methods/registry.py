"""The method registry. ``PLANNED`` lists every method the benchmark covers, registered or not yet."""

from targets.registry import Registry

METHODS: Registry = Registry("method")

#: every method key the grids expect; ones not (yet) registered are reported as missing by --dry-run
PLANNED: tuple[str, ...] = ("dds", "pis", "fab", "idem", "nem", "bnem", "as", "asbs", "mcmc", "pt")

"""The target registry (keys gmm40, dw4, lj13, lj55)."""

from harness.registry import Registry

TARGETS: Registry = Registry("target")

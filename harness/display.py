"""Display names and orders shared by tables, figures and the release: which metric columns each protocol
shows, their labels, the order of targets and methods, and how a method or target key is displayed."""

from __future__ import annotations

#: metric columns per protocol (lower is better for all of them)
TABLE_METRICS: dict[str, tuple[str, ...]] = {
    "idem": ("x_w2", "e_w2", "tv"),
    "bnem": ("x_w2", "e_w2", "tv"),
    "boltzbench": ("x_w2", "x_w2_aligned", "e_w2", "tv"),
    # the AS / ASBS evaluator: x-W2 is its aligned eq_w2, dist-W2 its W2² of interatomic distances (no TV)
    "asbs": ("x_w2", "e_w2", "dist_w2"),
}
METRIC_LABELS = {
    "x_w2": "x-W2",
    "x_w2_aligned": "x-W2 (aligned)",
    "e_w2": "E-W2",
    "tv": "TV",
    "dist_w2": "dist-W2",
}
METRIC_LATEX = {
    "x_w2": r"$x$-$\mathcal{W}_2$",
    "x_w2_aligned": r"$x$-$\mathcal{W}_2^{\mathrm{al}}$",
    "e_w2": r"$\mathcal{E}$-$\mathcal{W}_2$",
    "tv": "TV",
    "dist_w2": r"$d$-$\mathcal{W}_2$",
}
TARGET_ORDER = ("gmm40", "dw4", "lj13", "lj55")
METHOD_ORDER = ("dds", "pis", "fab", "idem", "nem", "bnem", "as", "asbs", "mcmc", "pt")
#: method keys of samplers scored from saved samples (``python -m harness.score --add-to``)
EXTERNAL_PREFIX = "external:"
EXTERNAL_MARK = " (external)"



def target_display(key: str) -> str:
    """Display name from the target class (``targets.TARGETS``), the key if unknown."""
    try:
        from targets import TARGETS

        return TARGETS.get(key).display_name
    except Exception:
        return key


def is_external(key: str) -> bool:
    """Whether ``key`` is an external sampler's (``external:LABEL``, written by ``harness.score``)."""
    return isinstance(key, str) and key.startswith(EXTERNAL_PREFIX)


def method_display(key: str) -> str:
    """Display name from the method class when registered, ``LABEL (external)`` for an external sampler,
    else the key."""
    if is_external(key):
        return key[len(EXTERNAL_PREFIX):] + EXTERNAL_MARK
    try:
        import methods

        base, variant = methods.split_key(key)
        name = methods.get(base).display_name
        return f"{name} ({variant})" if variant else name
    except Exception:
        return key

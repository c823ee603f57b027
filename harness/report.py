"""``python -m harness.report`` (``make report``): one static page, ``results/index.html``, of the results
release: the headline, each grid's coverage, the tables under every protocol (with their footnotes: sample
sizes, reference provenance, noise floors), the reproduction tables, the timing report (cost and speed-ups)
and every figure. It reads only ``results/tables/*.md`` and ``results/figures/*.png`` (what ``make tables``
wrote), links images relatively, and needs no server or network: it opens from the file system.

The Markdown it renders is the subset ``harness.tables`` / ``harness.timing`` / ``harness.release`` write:
headings, pipe tables, images, numbered and bulleted lists, paragraphs, ``code`` and **bold**.
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from collections.abc import Sequence
from pathlib import Path

#: page sections: (title, file-name patterns in results/tables, in order)
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Headline", ("headline.md",)),
    ("Coverage", ("coverage_*.md",)),
    ("Tables: cpu grid", ("cpu_*.md",)),
    ("Tables: equal-evals-cpu grid", ("equal-evals-cpu_*.md",)),
    ("Reproduction of the published numbers", ("reproduction_*.md",)),
    ("Timing and cost", ("timing_cpu.md", "timing_equal-evals-cpu.md")),
)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.85em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #eee; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.4em 0; }
code { background: #f3f3f3; padding: 0 0.2em; }
nav a { margin-right: 1em; }
.figs { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 0.8em; }
.figs figure { margin: 0; } .figs figcaption { font-size: 0.8em; color: #555; }
"""


def _inline(text: str) -> str:
    """Escape, then ``code``, **bold**, <u>underline</u> (the tables' second best) and [links](url)."""
    out = html.escape(text, quote=False)
    out = re.sub(r"&lt;u&gt;(.*?)&lt;/u&gt;", r"<u>\1</u>", out)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(md: str, image_prefix: str = "") -> str:
    """HTML of the Markdown subset the release writes (see the module docstring)."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()

    while i < len(lines):
        ln = lines[i]
        st = ln.strip()
        if not st:
            flush()
            i += 1
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", st)
        img = re.match(r"^!\[([^\]]*)\]\(([^)]+)\)$", st)
        if m:
            flush()
            level = min(len(m.group(1)) + 1, 6)  # the page's own h1 is the title
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif img:
            flush()
            src = img.group(2)
            src = image_prefix + src.split("figures/", 1)[1] if "figures/" in src else src
            out.append(f'<img src="{html.escape(src)}" alt="{html.escape(img.group(1))}">')
            i += 1
        elif st.startswith("|") and i + 1 < len(lines) and re.match(r"^\|?\s*:?-{3}", lines[i + 1].strip()):
            flush()
            head = _cells(st)
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head)
                       + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</tbody></table>")
        elif re.match(r"^(\d+\.|[-*])\s+", st):
            flush()
            ordered = bool(re.match(r"^\d+\.", st))
            tag = "ol" if ordered else "ul"
            items = []
            while i < len(lines) and re.match(r"^(\d+\.|[-*])\s+", lines[i].strip()):
                items.append(re.sub(r"^(\d+\.|[-*])\s+", "", lines[i].strip()))
                i += 1
            out.append(f"<{tag}>" + "".join(f"<li>{_inline(t)}</li>" for t in items) + f"</{tag}>")
        else:
            para.append(st)
            i += 1
    flush()
    return "\n".join(out)


def build_page(results: Path) -> str:
    """The page's HTML from ``results/tables`` and ``results/figures``."""
    tables, figures = results / "tables", results / "figures"
    body: list[str] = []
    nav: list[str] = []
    used: set[Path] = set()
    for k, (title, patterns) in enumerate(SECTIONS):
        files: list[Path] = []
        for pat in patterns:
            files += sorted(p for p in tables.glob(pat) if p not in used)
        if not files:
            continue
        anchor = f"s{k}"
        nav.append(f'<a href="#{anchor}">{html.escape(title)}</a>')
        body.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')
        for p in files:
            used.add(p)
            body.append(f"<!-- {html.escape(p.name)} -->")
            body.append(markdown_to_html(p.read_text(), image_prefix="figures/"))
    figs = sorted(figures.glob("*.png")) if figures.exists() else []
    if figs:
        nav.append('<a href="#figures">Figures</a>')
        body.append('<h2 id="figures">Figures</h2><div class="figs">')
        body += [f'<figure><img src="figures/{html.escape(f.name)}" alt="{html.escape(f.stem)}">'
                 f"<figcaption>{html.escape(f.name)}</figcaption></figure>" for f in figs]
        body.append("</div>")
    if not body:
        body.append("<p>No release tables yet: run <code>make tables</code> first.</p>")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>boltzbench results</title>", f"<style>{STYLE}</style></head><body>",
        "<h1>boltzbench results</h1>",
        "<p>The results release regenerated from the committed run records (<code>make tables</code>, then "
        "<code>make report</code>). Numbers come from a 2-core CPU without GPU; see docs/results.md for the "
        "settings and their departures from the published ones.</p>",
        "<nav>" + "".join(nav) + "</nav>", *body, "</body></html>", "",
    ])


def write_report(results: str | Path = "results") -> Path:
    """Write ``<results>/index.html`` and return its path."""
    results = Path(results)
    out = results / "index.html"
    out.write_text(build_page(results))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results", help="release directory with tables/ and figures/ "
                    "(default results)")
    a = ap.parse_args(argv)
    if not (Path(a.results) / "tables").is_dir():
        ap.error(f"{a.results}/tables not found: run `make tables` first")
    print(f"wrote {write_report(a.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

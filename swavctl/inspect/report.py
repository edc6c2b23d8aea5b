"""``index.html``: a self-contained report (inline CSS and script, images by relative path).

The page carries its data as one JSON block; a small script renders one section per prototype
grid and re-sorts them by size, confidence or prototype number. Nothing is fetched from the
network; the grid PNGs and the size chart are read from next to the page.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

_CSS = """
:root { --ink:#1e1e1e; --muted:#6e6e6e; --line:#e3e3e3; --accent:#3465a4; --warn:#b5472b; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
       margin: 0 auto; padding: 20px 28px 60px; max-width: 1180px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.sub { color: var(--muted); margin: 0 0 16px; overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(165px, 1fr)); gap: 10px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px; }
.card .v { font-size: 20px; font-weight: 600; } .card .k { color: var(--muted); font-size: 12px; }
.card.warn .v { color: var(--warn); }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.table-wrap { overflow-x: auto; max-height: 480px; }
.controls { padding: 10px 0; border-bottom: 1px solid var(--line);
            z-index: 2; display: flex; gap: 16px; align-items: center; }
section.cluster { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; margin: 12px 0; }
section.cluster h3 { margin: 0 0 4px; font-size: 15px; }
section.cluster .meta { color: var(--muted); font-size: 13px; margin-bottom: 6px; }
section.cluster img { max-width: 100%; image-rendering: pixelated; display: block; }
.chip { display: inline-block; border: 1px solid var(--line); border-radius: 10px; padding: 0 8px;
        margin: 0 4px 4px 0; font-size: 12px; }
.dup { color: var(--warn); }
#js-error { color: var(--warn); font-weight: 600; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const fmt = (x, d) => (x === null || x === undefined) ? "n/a" : Number(x).toFixed(d);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
    '"': "&quot;", "'": "&#39;"})[c]);
  const container = document.getElementById("clusters");
  const sorter = document.getElementById("sort");
  const orders = {
    size: (a, b) => b.size - a.size || a.prototype - b.prototype,
    confidence: (a, b) => b.mean_confidence - a.mean_confidence || a.prototype - b.prototype,
    prototype: (a, b) => a.prototype - b.prototype,
  };
  function section(c) {
    const labels = (c.labels || [])
      .map(([name, n]) => `<span class="chip">${esc(name)}: ${n}</span>`).join("");
    const dup = c.nearest_cosine > data.summary.duplicate_threshold ? ' class="dup"' : "";
    return `<section class="cluster" id="prototype-${c.prototype}" data-prototype="${c.prototype}">
      <h3>prototype ${c.prototype}</h3>
      <div class="meta">${c.size} images (${esc(data.summary.assignment)}),
        ${c.size_other} (${esc(data.other)})
        &middot; mean confidence ${fmt(c.mean_confidence, 3)}
        &middot; nearest prototype <span${dup}>${c.nearest} (cosine ${fmt(c.nearest_cosine, 3)})</span></div>
      ${labels ? `<div>${labels}</div>` : ""}
      <img loading="lazy" src="${esc(c.grid)}" alt="members of prototype ${c.prototype}">
    </section>`;
  }
  function render() {
    const list = data.clusters.slice().sort(orders[sorter.value] || orders.size);
    container.innerHTML = list.map(section).join("");
    const table = document.getElementById("label-table-body");
    if (table && data.label_names) {
      table.innerHTML = list.map((c) => {
        const row = data.table[String(c.prototype)] || [];
        const total = row.reduce((a, b) => a + b, 0) || 1;
        const cells = row.map((n) => {
          const shade = (0.75 * n / total).toFixed(3);
          return `<td style="background: rgba(52,101,164,${shade})">${n || ""}</td>`;
        }).join("");
        const link = `<a href="#prototype-${c.prototype}">${c.prototype}</a>`;
        return `<tr><td>${link}</td>${cells}<td>${c.size}</td></tr>`;
      }).join("");
    }
    document.body.dataset.rendered = String(list.length);
  }
  sorter.addEventListener("change", render);
  render();
})();
"""

_ERROR_TRAP = """window.addEventListener("error", function (e) {
  var box = document.getElementById("js-error"); if (box) { box.textContent = "script error: " + e.message; }
});"""


def _json_for_script(payload: Any) -> str:
    """JSON that cannot end the enclosing <script> element early."""
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _card(value: str, key: str, *, warn: bool = False) -> str:
    return (
        f'<div class="card{" warn" if warn else ""}"><div class="v">{html.escape(value)}</div>'
        f'<div class="k">{html.escape(key)}</div></div>'
    )


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_report(
    summary: dict[str, Any],
    clusters: list[dict[str, Any]],
    *,
    label_names: list[str] | None,
    table: dict[str, list[int]] | None,
    chart: str,
) -> str:
    """The HTML text of the report.

    ``clusters``: one entry per grid (prototype, size, size_other, mean_confidence, nearest,
    nearest_cosine, grid, labels). ``table``: per prototype (as a string), its counts per label.
    """
    primary = summary["assignment"]
    other = "balanced" if primary == "argmax" else "argmax"
    k = summary["num_prototypes"]
    sets = summary.get("prototype_sets", 1)
    which = f" (prototype set {summary['prototype_set']} of {sets})" if sets > 1 else ""
    cards = _cards(summary)
    body = _both_assignments_rows(summary)
    sinkhorn = summary["balanced"]["sinkhorn"]
    dup_html = _duplicates_html(summary["near_duplicates"])
    label_html = _label_table_html(label_names, primary)
    payload = {
        "summary": summary,
        "other": other,
        "clusters": clusters,
        "label_names": label_names,
        "table": table,
    }
    hidden = summary["prototypes_used"] - len(clusters)
    more = f" ({hidden} smaller ones not drawn; raise --max-clusters)" if hidden > 0 else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>swavctl clusters: {html.escape(Path(summary["model"]).name)}</title>
<style>{_CSS}</style>
<script>{_ERROR_TRAP}</script>
</head><body>
<h1>Cluster report</h1>
<p class="sub">model {html.escape(summary["model"])} &middot; data {html.escape(summary["data"])}
 &middot; K = {k} prototypes{which}
 &middot; grids and sorting follow the <b>{html.escape(primary)}</b> assignment</p>
<div id="js-error"></div>
<div class="cards">{"".join(cards)}</div>
<h2>Both assignments</h2>
<p class="sub">argmax: each image goes to its most similar prototype. balanced: the equal-partition
assignment, Sinkhorn-Knopp over the whole dataset (epsilon {sinkhorn["epsilon"]}; Sinkhorn iterations:
{sinkhorn["iterations"]}; largest deviation of a prototype's mass from 1/K:
{_num(100 * sinkhorn["max_marginal_error"], 2)}%).</p>
<table><thead><tr><th></th><th>argmax</th><th>balanced</th></tr></thead><tbody>{body}</tbody></table>
<h2>Cluster sizes</h2>
<img src="{html.escape(chart)}" alt="cluster size chart" style="max-width:100%">
<h2>Near-duplicate prototypes</h2>
{dup_html}
{label_html}
<h2>Clusters</h2>
<p class="sub">{len(clusters)} prototypes with members{more}. Each grid: the most confident members, then
random members; under each image, its confidence (left) and, with labels, its label (right).</p>
<div class="controls"><label>sort by <select id="sort">
<option value="size">size</option><option value="confidence">mean confidence</option>
<option value="prototype">prototype number</option></select></label></div>
<div id="clusters"></div>
<script id="report-data" type="application/json">{_json_for_script(payload)}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def _cards(summary: dict[str, Any]) -> list[str]:
    """The headline numbers of the ``--assignment``, one card each."""
    primary = summary["assignment"]
    stats = summary[primary]
    k = summary["num_prototypes"]
    cards = [
        _card(f"{summary['n_images']}", "images assigned"),
        _card(f"{summary['skipped_images']}", "unreadable files skipped", warn=summary["skipped_images"] > 0),
        _card(f"{stats['prototypes_used']} / {k}", f"prototypes used ({primary})"),
        _card(_num(stats["entropy_ratio"]), "entropy / ln K"),
        _card(_num(stats["largest_over_median"], 2), "largest / median size"),
        _card(_num(stats["gini"]), "Gini of sizes"),
        _card(f"{stats['empty_prototypes']}", "empty prototypes", warn=stats["empty_prototypes"] > 0),
        _card(
            f"{len(summary['near_duplicates'])}",
            f"near-duplicate pairs (cos > {summary['duplicate_threshold']})",
            warn=bool(summary["near_duplicates"]),
        ),
    ]
    if summary.get("nmi") is not None:
        cards.insert(3, _card(_num(summary["nmi"]), f"NMI vs labels ({primary})"))
    return cards


def _both_assignments_rows(summary: dict[str, Any]) -> str:
    """Table rows: each statistic of the argmax and the balanced assignment side by side."""
    rows = [
        ("prototypes used", "prototypes_used", None),
        ("empty prototypes", "empty_prototypes", None),
        ("entropy (nats)", "entropy", 3),
        ("entropy / ln K", "entropy_ratio", 3),
        ("largest / median", "largest_over_median", 2),
        ("Gini", "gini", 3),
        ("mean confidence", "mean_confidence", 3),
    ]
    if summary.get("nmi") is not None:
        rows += [
            ("NMI", "nmi", 3),
            ("ARI", "ari", 3),
            ("purity", "purity", 3),
            ("accuracy (Hungarian)", "accuracy", 3),
        ]

    def cell(value: Any, digits: int | None) -> str:
        return f"<td>{html.escape(str(value) if digits is None else _num(value, digits))}</td>"

    return "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(cell(summary[a].get(key), digits) for a in ("argmax", "balanced"))
        + "</tr>"
        for name, key, digits in rows
    )


def _duplicates_html(dups: list[list[Any]]) -> str:
    """The near-duplicate prototype pairs (the first 200)."""
    if not dups:
        return "<p>none</p>"
    return (
        "<table><tr><th>prototype</th><th>prototype</th><th>cosine</th></tr>"
        + "".join(f"<tr><td>{i}</td><td>{j}</td><td>{c:.4f}</td></tr>" for i, j, c in dups[:200])
        + "</table>"
        + (f"<p>... and {len(dups) - 200} more in summary.json</p>" if len(dups) > 200 else "")
    )


def _label_table_html(label_names: list[str] | None, primary: str) -> str:
    """The label x cluster table's frame (the page's script fills its rows); empty without labels."""
    if not label_names:
        return ""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in label_names)
    return (
        "<h2>Label &times; cluster</h2>"
        f'<p class="sub">Images per label in each shown prototype ({html.escape(primary)}); '
        "the full table is in label_cluster_table.csv.</p>"
        f'<div class="table-wrap"><table><thead><tr><th>prototype</th>{head}<th>total</th></tr></thead>'
        '<tbody id="label-table-body"></tbody></table></div>'
    )

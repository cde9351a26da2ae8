"""One self-contained HTML page: text, tables and PNG panels inlined as base64.

No network: every image is a ``data:`` URL, styles and the one script are inline, and a
Content-Security-Policy forbids fetching anything else. Every string that comes from a
user (run names, labels, config values, finding evidence) goes through :func:`esc`.
The script marks ``<body data-images-ready="N">`` once all N images have decoded
(``data-images-broken`` when one did not), which the browser test reads.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

from stablestep.report import plots

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'")

_STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1500px;
margin:1.5em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;
border-bottom:1px solid #ddd}p.story{font-style:italic;color:#444}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.failing{color:#b00020;font-weight:600}.fix{color:#00695c;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(620px,1fr));gap:.8em}
figure{margin:0;border:1px solid #e3e3e3;padding:.3em;background:#fff}
figure img{width:100%;height:auto;display:block}figcaption{font-size:.85em;color:#555}
.badge{display:inline-block;border-radius:50%;width:1.5em;height:1.5em;text-align:center;
color:#fff;font-size:.8em;line-height:1.5em;font-weight:700}code{background:#f5f5f5;padding:0 .2em}
.incident{border:1px solid #e3e3e3;border-radius:4px;padding:.2em .9em .5em;margin:.8em 0}
.incident p.headline{font-size:1.02em;margin:.5em 0}.incident .badge{margin-right:.3em}
table.evidence td:nth-child(2),table.evidence td:nth-child(3){white-space:nowrap;
font-variant-numeric:tabular-nums}table.evidence td:nth-child(4){color:#555}
p.remedy-head{margin:.4em 0 .1em;font-weight:600}ul.remedies{margin:.1em 0 .4em}
ul.remedies li{margin:.15em 0}details{font-size:.85em;color:#555}
ul.all-evidence{columns:2;margin:.2em 0}code.mech{font-size:.8em;color:#666}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  if (bad.length) { document.body.setAttribute('data-images-broken', String(bad.length)); }
  else { document.body.setAttribute('data-images-ready', String(imgs.length)); }
});
"""


def esc(value: Any) -> str:
    """HTML-escape ``str(value)`` (quotes included), for text and attribute values."""
    return html.escape(str(value), quote=True)


def fmt(x: Any) -> str:
    """A number for tables (3 significant digits, ``NaN`` for non-finite); other values
    as ``str``."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, (int, float)):
        if isinstance(x, float) and not math.isfinite(x):
            return "NaN"
        return f"{x:.3g}" if isinstance(x, float) else str(x)
    return str(x)


def img(png: bytes, alt: str) -> str:
    """An ``<img>`` with ``png`` inlined as a data URL."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def figure(png: bytes | None, caption: str) -> str:
    """A ``<figure>`` holding ``png`` (empty string when there is no panel)."""
    if png is None:
        return ""
    return f"<figure>{img(png, caption)}<figcaption>{esc(caption)}</figcaption></figure>"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, raw: bool = False) -> str:
    """A table; cells are escaped unless ``raw`` (cells already HTML)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for c in row:
            cls = ' class="num"' if isinstance(c, (int, float)) and not isinstance(c, bool) else ""
            cells.append(f"<td{cls}>{c if raw else esc(fmt(c))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def finding_text(f: dict) -> str:
    """One sentence explaining a finding dict (``Finding.to_dict()``): what happened, the
    mechanism in words with its deciding numbers, the confidence
    (:func:`stablestep.report.incidents.headline`)."""
    from stablestep.report.incidents import headline

    return headline(f)


def incidents_for(findings: Sequence[dict], start: int, *, limit: int = 6) -> list[plots.Incident]:
    """Numbered incidents (numbers from ``start``) for the first ``limit`` findings."""
    return [plots.Incident(number=start + i, step=int(f.get("step", 0)), text=finding_text(f),
                           finding=f)
            for i, f in enumerate(list(findings)[:limit])]


def panels(series: Sequence[plots.Series], *, smooth: int = 0) -> list[str]:
    """The standard panels for runs on shared axes, as ``<figure>`` HTML (missing
    quantities are skipped); ``smooth``: running mean for noisy losses."""
    from stablestep.telemetry import names as N

    figs = [
        figure(plots.loss_panel(series, smooth=smooth), "Loss (log axis); numbered circles "
               "are the incidents explained below (same numbers, same colours), a cross marks "
               "a run that stopped on a non-finite loss"
               + (f"; lines are running means of {smooth} steps, raw losses faint."
                  if smooth > 0 else ".")),
        figure(plots.eff_step_panel(series), "Effective per-coordinate step (diagonal of "
               "P^-1): median line, shaded band up to the 99th percentile (dotted edge)."),
        figure(plots.eps_share_panel(series), "Share of coordinates where eps, not "
               "sqrt(v_hat), sets the step."),
        figure(plots.precond_panel(series), "Preconditioned sharpness lam_max(P^-1 H): a "
               "run is stable while it stays under its dashed bound ((2+2 beta1)/(1-beta1) = "
               "38 for Adam with beta1 = 0.9; 2 for plain gradient descent)."),
        figure(plots.lr_sharpness_panel(series), "lr * lam_max(H) of the non-adaptive runs: "
               "gradient descent is stable while it stays under the dashed bound (Adam runs "
               "are left out: their bound is on the preconditioned sharpness above)."),
        figure(plots.line_panel(series, N.GRAD_NORM, title="Gradient norm", ylabel="||g||",
                                logy=True, smooth=smooth), "Global gradient norm"
               + (f" (lines: running mean of {smooth} steps, raw values faint)."
                  if smooth > 0 else ".")),
        figure(plots.line_panel(series, N.LR, title="Learning rate", ylabel="lr",
                                from_zero=True), "Learning rate used at each step."),
    ]
    return [f for f in figs if f]


def incident_list(series: Sequence[plots.Series]) -> str:
    """One block per numbered incident (the numbers of the loss panel's markers, badges
    in the run's colour): headline, evidence table, remedies."""
    from stablestep.report.incidents import incident_html, incidents_html

    blocks = []
    for s, color in zip(series, plots.TAB10 * (len(series) // 10 + 1), strict=False):
        for inc in s.incidents:
            f = inc.finding if inc.finding is not None else {
                "step": inc.step, "kind": "spike", "mechanism": inc.text}
            blocks.append(incident_html(inc.number, s.label, f, color=color))
    return incidents_html(blocks)


def page(title: str, body: str) -> str:
    """A complete HTML document with the style, the CSP and the image-check script."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}<script>{_SCRIPT}</script></body></html>\n"
    )

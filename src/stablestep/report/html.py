"""One self-contained HTML page: text, tables and PNG panels inlined as base64.

Pages are Jinja2 templates (:mod:`stablestep.report.templates`) rendered with autoescape:
every value a template prints is escaped unless it is :class:`markupsafe.Markup` (HTML
this package built from another template). Every printed value also goes through
:func:`stablestep.text.printable` first, so NUL, control and bidi-override
characters from run names or logs show as visible escapes instead of being copied in.

No network: every image is a ``data:`` URL, styles and the one script are inline, and a
Content-Security-Policy forbids fetching anything else. The script marks
``<body data-images-ready="N">`` once all N images have decoded (``data-images-broken``
when one did not), which the browser test reads.

Layout: one column on a phone (390 px), panels two or more abreast from about 1150 px;
wide tables scroll inside their own box, so the page itself never scrolls sideways.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from typing import Any

from stablestep.report import plots
from stablestep.text import fmt, printable  # noqa: F401  (fmt re-exported)

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'")

STYLE = """
*{box-sizing:border-box}
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1500px;
margin:1.5em auto;padding:0 1em;color:#222;line-height:1.45;overflow-wrap:anywhere}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;
border-bottom:1px solid #ddd}p.story{font-style:italic;color:#444}
.scroll{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left;vertical-align:top;
overflow-wrap:normal}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.failing{color:#b00020;font-weight:600}.fix{color:#00695c;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,540px),1fr));
gap:.8em}
figure{margin:0;border:1px solid #e3e3e3;padding:.3em;background:#fff;min-width:0}
img{max-width:100%;height:auto}
figure img{width:100%;height:auto;display:block}figcaption{font-size:.85em;color:#555}
.badge{display:inline-block;border-radius:50%;width:1.5em;height:1.5em;text-align:center;
color:#fff;font-size:.8em;line-height:1.5em;font-weight:700}
code{background:#f5f5f5;padding:0 .2em;overflow-wrap:anywhere}
.incident{border:1px solid #e3e3e3;border-radius:4px;padding:.2em .9em .5em;margin:.8em 0}
.incident p.headline{font-size:1.02em;margin:.5em 0}.incident .badge{margin-right:.3em}
table.evidence td:nth-child(2),table.evidence td:nth-child(3){white-space:nowrap;
font-variant-numeric:tabular-nums}table.evidence td:nth-child(4){color:#555;min-width:16em}
table.evidence td:first-child{min-width:8em}
p.remedy-head{margin:.4em 0 .1em;font-weight:600}ul.remedies{margin:.1em 0 .4em}
ul.remedies li{margin:.15em 0}details{font-size:.85em;color:#555}
ul.all-evidence{columns:2;margin:.2em 0}code.mech{font-size:.8em;color:#666}
p.missing{background:#fff8e1;border:1px solid #f0dca0;padding:.5em .8em}
@media (max-width:600px){body{padding:0 .5em;margin:.8em auto}ul.all-evidence{columns:1}
h1{font-size:1.3em}}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  if (bad.length) { document.body.setAttribute('data-images-broken', String(bad.length)); }
  else { document.body.setAttribute('data-images-ready', String(imgs.length)); }
});
"""


def esc(value: Any) -> str:
    """``str(value)`` made safe for HTML text and attribute values: control and bidi
    characters as visible escapes (:func:`~stablestep.text.printable`), then
    ``& < > " '`` escaped (the same escaping the templates apply)."""
    from markupsafe import escape

    return str(escape(printable(value, newlines=True)))



def render(template: str, /, **context: Any) -> Any:
    """Render ``template`` (a name in :mod:`stablestep.report.templates`) with
    ``context``; returns :class:`markupsafe.Markup` (safe to embed in another template)."""
    from markupsafe import Markup

    from stablestep.report.templates import get

    return Markup(get(template).render(**context))


def safe(html: str) -> Any:
    """Mark HTML that this package built as safe to embed (never user text)."""
    from markupsafe import Markup

    return Markup(html)


def img(png: bytes, alt: str) -> Any:
    """An ``<img>`` with ``png`` inlined as a data URL."""
    data = base64.b64encode(png).decode("ascii")
    return render("img", alt=alt, src=f"data:image/png;base64,{data}")


def figure(png: bytes | None, caption: str) -> Any:
    """A ``<figure>`` holding ``png`` (empty string when there is no panel)."""
    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return render("figure", caption=caption, src=f"data:image/png;base64,{data}")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, raw: bool = False) -> Any:
    """A table in a box that scrolls sideways on narrow screens; cells are formatted with
    :func:`fmt` and escaped, unless ``raw`` (cells are HTML this package built)."""
    body = []
    for row in rows:
        cells = []
        for c in row:
            num = isinstance(c, (int, float)) and not isinstance(c, bool)
            cells.append({"num": num, "text": safe(str(c)) if raw else fmt(c)})
        body.append(cells)
    return render("table", header=list(header), rows=body)


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


def _optimizer_state() -> dict[str, str]:
    from stablestep.telemetry import names as N

    return {"effective per-coordinate step": N.EFF_STEP_P50,
            "share of coordinates eps governs": N.EPS_SHARE,
            "preconditioned sharpness lam_max(P^-1 H)": N.PRECOND_SHARPNESS,
            "gradient norm": N.GRAD_NORM}


def missing_note(series: Sequence[plots.Series]) -> Any:
    """A paragraph naming the panels no run could fill and how to record them (empty
    when every panel has data): a CSV or TensorBoard log usually has only the loss."""
    missing = [what for what, name in _optimizer_state().items()
               if not any(s.has(name) for s in series)]
    if not missing:
        return ""
    curvature = any("sharpness" in m for m in missing)
    return render("missing", missing=missing, curvature=curvature)


def panels(series: Sequence[plots.Series], *, smooth: int = 0) -> list[Any]:
    """The standard panels for runs on shared axes, as ``<figure>`` HTML (missing
    quantities are skipped; :func:`missing_note` says which); ``smooth``: running mean
    for noisy losses."""
    from stablestep.telemetry import names as N

    figs = [
        figure(plots.loss_panel(series, smooth=smooth), "Loss (log axis); numbered circles "
               "are the incidents explained below (same numbers, same colours; circles "
               "of runs at the same place are stacked), a cross marks where a run's loss "
               "or gradients became non-finite (NaN/Inf)"
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


def incident_list(series: Sequence[plots.Series]) -> Any:
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


def page(title: str, body: Any) -> str:
    """A complete HTML document with the style, the CSP and the image-check script;
    ``body`` is HTML built by this package (:class:`markupsafe.Markup` or a ``str`` of
    it)."""
    return str(render("page", title=title, body=safe(str(body)), csp=safe(CSP), style=safe(STYLE),
                      script=safe(SCRIPT))) + "\n"

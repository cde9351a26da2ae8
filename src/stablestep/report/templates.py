"""The report's Jinja2 templates, compiled once with autoescape on.

Every ``{{ value }}`` is passed through :func:`stablestep.text.printable` (the
environment's ``finalize``: control and bidi characters become visible escapes) and then
HTML-escaped, unless it is :class:`markupsafe.Markup` built by another template here.
Templates live in this module, not in package data, so an installed wheel always has them.
"""

from __future__ import annotations

from functools import cache
from typing import Any

TEMPLATES = {
    "page": """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{{ csp }}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title><style>{{ style }}</style></head>
<body>{{ body }}<script>{{ script }}</script></body></html>""",
    "img": '<img alt="{{ alt }}" src="{{ src }}">',
    "figure": '<figure><img alt="{{ caption }}" src="{{ src }}">'
              "<figcaption>{{ caption }}</figcaption></figure>",
    "table": '<div class="scroll"><table><tr>{% for h in header %}<th>{{ h }}</th>'
             "{% endfor %}</tr>{% for row in rows %}<tr>{% for c in row %}"
             '<td{% if c.num %} class="num"{% endif %}>{{ c.text }}</td>{% endfor %}</tr>'
             "{% endfor %}</table></div>",
    "missing": """<p class="missing">Not in this log: {{ missing | join(", ") }}. These panels
need the optimizer's state, which a loss log does not have. Record the run with
<code>stablestep.Monitor(model, opt, store="runs.db", run="NAME")</code> (it records the
effective step, the eps share and the gradient norm every few steps){% if curvature %}; add
<code>curvature_every=50, curvature_loss=lambda: loss_fn(model(x), y)</code> for the
preconditioned sharpness{% endif %}, then <code>stablestep report runs.db -o
report.html</code>.</p>""",
    "incident": """<section class="incident" id="incident-{{ number }}">
<p class="headline"><span class="badge" style="background:{{ color }}">{{ number }}</span>
{{ headline }} <code class="mech">{{ kind }} / {{ mechanism }}</code></p>
{% if rows %}<div class="scroll"><table class="evidence"><tr><th>evidence</th><th>measured</th>
<th>reference</th><th>meaning</th></tr>{% for r in rows %}<tr>{% for c in r %}<td>{{ c }}</td>
{% endfor %}</tr>{% endfor %}</table></div>{% endif %}
{% if remedies %}<p class="remedy-head">Computed remedies:</p><ul class="remedies">
{% for r in remedies %}<li><code>{{ r.action }} = {{ r.value }}</code>{% if r.why %}
&mdash; {{ r.why }}{% endif %}</li>{% endfor %}</ul>{% endif %}
{% if evidence %}<details><summary>all evidence ({{ evidence | length }} values)</summary>
<ul class="all-evidence">{% for k, v in evidence %}<li><code>{{ k }}</code>: {{ v }}</li>
{% endfor %}</ul></details>{% endif %}
</section>""",
    "store_report": """<h1>{{ title }}</h1>
<p>{{ what }} <code>{{ source }}</code>, {{ n_runs }} run(s) on shared axes.</p>
{% for s in skipped %}<p class="missing">Run <code>{{ s[0] }}</code> left out: {{ s[1] }}</p>
{% endfor %}{{ summary }}
<h2>Panels</h2><div class="grid">{% for f in figures %}{{ f }}{% endfor %}</div>{{ missing }}
<h2>Incidents</h2>{{ incidents }}""",
    "scenario_report": """<h1>{{ title }}</h1>
<p class="story">{{ story }}</p><p>{{ explanation }}</p>
<h2>Outcome</h2>{{ outcome }}
<h2>Panels (all variants on shared axes)</h2>
<div class="grid">{% for f in figures %}{{ f }}{% endfor %}</div>
<h2>Incidents</h2>{{ incidents }}
<h2>Settings</h2>{{ settings }}
<p>Reproduce: <code>stablestep lab run {{ name }} --out DIR</code>; runs are stored in
<code>{{ store }}</code>.</p>""",
    "index": """<h1>stablestep lab: {{ stories }}</h1>
{% for s in scenarios %}{% if s.link %}<h2><a href="{{ s.link }}">{{ s.head }}</a></h2>
{% else %}<h2>{{ s.head }}</h2>{% endif %}<p>{{ s.explanation }}</p>{{ s.table }}
{% endfor %}""",
    "sweep": """<h1>{{ title }}</h1>
<p>{{ n_cells }} cells of {{ steps }} steps each. Colour: final loss on the whole data
(log scale); black cells turned NaN.</p>{{ figure }}<h2>Cells</h2>{{ cells }}
<p>Reproduce: <code>{{ command }}</code></p>""",
}


def _finalize(value: Any) -> Any:
    from markupsafe import Markup

    from stablestep.text import printable

    if isinstance(value, Markup) or value is None:
        return "" if value is None else value
    return printable(value, newlines=True)


@cache
def environment() -> Any:
    """The :class:`jinja2.Environment` of the report (autoescape, strict undefined,
    printable finalize)."""
    import jinja2

    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                              finalize=_finalize, keep_trailing_newline=False)


@cache
def get(name: str) -> Any:
    """The compiled template ``name`` (a key of :data:`TEMPLATES`)."""
    return environment().from_string(TEMPLATES[name])

"""The Incidents section: one block per diagnosis finding, readable by a person.

Each finding (``Finding.to_dict()`` of :mod:`stablestep.diagnosis`) becomes

- a headline sentence (:func:`headline`): run, step, what happened and the mechanism in
  words with its deciding numbers, e.g. "Adam's preconditioned sharpness
  lam_max(P^-1 H) reached 37.7, at its bound 38, while the loss rose 1.1x";
- a compact evidence table (:func:`evidence_rows`): the few numbers that decide that
  mechanism, measured next to their threshold, with their meaning; lists (spike steps,
  follow-on alarms) are summarised as a count and a range (:func:`summarise`), and every
  other evidence value sits in a collapsed "all evidence" list;
- the remedies as "action = value -- why" (:func:`remedy_value` formats the value: a
  decay dict reads "decay_rate 0.9 every 16 steps").

Every string that comes from the finding is HTML-escaped by the ``incident`` template
(:func:`incident_html`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

# The wording of a finding is the diagnosis' (the CLI prints the same sentences); the
# report only lays it out.
from stablestep.diagnosis.wording import (  # noqa: F401  (re-exported)
    MECHANISM_WORDS,
    evidence_rows,
    headline,
    remedy_value,
    summarise,
)

_COLOR = re.compile(r"#[0-9a-fA-F]{3,8}")


def incident_html(number: int, label: str, f: dict, *, color: str = "#555") -> Any:
    """One incident block: numbered badge (the loss panel's marker), headline, evidence
    table, remedies and the full evidence collapsed. Rendered by the ``incident``
    template, which escapes every string of the finding."""
    from stablestep.report.html import render
    from stablestep.text import printable

    ev = f.get("evidence") or {}
    color = color if _COLOR.fullmatch(str(color)) else "#555"
    remedies = [{"action": r.get("action"),
                 "value": remedy_value(str(r.get("action")), r.get("value")),
                 "why": r.get("why")} for r in f.get("remedies") or []]
    return render("incident", number=int(number), color=color,
                  headline=headline(f, printable(label, limit=120)),
                  kind=f.get("kind"), mechanism=f.get("mechanism"), rows=evidence_rows(f),
                  remedies=remedies, evidence=[(k, summarise(v)) for k, v in ev.items()])


def incidents_html(blocks: Sequence[Any]) -> Any:
    """The section body: the blocks, or a sentence when there are none."""
    from markupsafe import Markup

    return Markup("").join(blocks) if blocks else Markup("<p>No incidents were found.</p>")

"""In-memory logs: a pandas ``DataFrame`` or ``Series``, a dict, a numpy array, a list.

- ``DataFrame``: columns as in a CSV (a step column, else an index named like one or
  a numeric index, else row numbers); ``df.attrs``/``df.name`` are not needed.
- ``Series``: the loss, its index the steps when numeric.
- ``dict``: ``{"step": [...], "loss": [...]}`` (columns), or ``{step: loss}``.
- ``ndarray``: 1-d = the loss per step from 0; 2-d with two columns = ``(step, loss)``;
  a structured array = named columns.
- ``list``: of numbers (the loss), of ``(step, loss)`` pairs, or of records (dicts).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stablestep.diagnosis.sources._common import (
    STEP_KEYS,
    ReadInfo,
    SourceError,
    norm,
    pick,
)
from stablestep.diagnosis.sources.jsonlogs import json_traces
from stablestep.diagnosis.sources.tabular import read_records
from stablestep.diagnosis.trace import Trace


def _loss_only(values: Any, steps: Any, what: str, source: str, step_name: str | None,
               infos: list[ReadInfo] | None) -> list[Trace]:
    v = np.asarray(values)
    if v.ndim != 1:
        raise SourceError(f"{source}: expected a 1-d series of losses, got shape {v.shape}")
    try:
        v = v.astype(np.float64)
    except (TypeError, ValueError):
        v = np.array([_num(x) for x in v.tolist()], dtype=np.float64)
    s = np.arange(v.size) if steps is None else np.asarray(steps)
    rows = ({"step": st, what: val} for st, val in zip(s.tolist(), v.tolist(), strict=True))
    # one "read ..." line, naming where the steps came from (index, keys, row numbers)
    return read_records(rows, source=source, what="the series", infos=infos,
                        step_label=step_name)


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError):
        return np.nan


def from_object(obj: Any, *, infos: list[ReadInfo] | None = None) -> list[Trace] | None:
    """Traces from an in-memory log (see the module docstring), ``None`` if ``obj`` is
    none of the kinds understood."""
    kind = type(obj).__name__
    mod = type(obj).__module__ or ""
    if mod.startswith("pandas") and kind == "DataFrame":
        return _frame(obj, infos)
    if mod.startswith("pandas") and kind == "Series":
        idx = obj.index
        numeric = idx.dtype.kind in "iuf" and not _is_range(idx)
        return _loss_only(obj.to_numpy(), idx.to_numpy() if numeric else None,
                          str(obj.name) if obj.name is not None else "loss", "<Series>",
                          str(idx.name or "index") if numeric else None, infos)
    if isinstance(obj, np.ndarray):
        if obj.dtype.names:
            return _columns({n: obj[n].tolist() for n in obj.dtype.names}, "<ndarray>", infos)
        if obj.ndim == 1:
            return _loss_only(obj, None, "loss", "<ndarray>", None, infos)
        if obj.ndim == 2 and obj.shape[1] == 2:
            return _loss_only(obj[:, 1], obj[:, 0], "loss", "<ndarray>", "column 0", infos)
        raise SourceError(f"<ndarray>: expected the loss (1-d) or (step, loss) rows, "
                          f"got shape {obj.shape}")
    if isinstance(obj, dict):
        if obj and all(isinstance(k, (int, np.integer)) for k in obj):
            return _loss_only([_plain(v) for v in obj.values()], list(obj.keys()), "loss",
                              "<dict>", "keys",
                              infos)
        return json_traces({str(k): _listify(v) for k, v in obj.items()}, "<dict>", infos=infos)
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise SourceError("<list>: empty")
        obj = [_plain(r) for r in obj]  # losses appended as tensors or numpy scalars
        if all(isinstance(r, dict) for r in obj):
            return json_traces(list(obj), "<list>", infos=infos)
        if all(isinstance(r, (list, tuple)) and len(r) == 2 for r in obj):
            return _loss_only([_plain(r[1]) for r in obj], [_plain(r[0]) for r in obj],
                              "loss", "<list>",
                              "first item", infos)
        return _loss_only(list(obj), None, "loss", "<list>", None, infos)
    return None


def _plain(x: Any) -> Any:
    """A 0-d numpy scalar or torch tensor as a Python number (``losses.append(loss)``
    without ``.item()``, ``list(np.arange(n))``); anything else unchanged."""
    item = getattr(x, "item", None)
    if callable(item) and getattr(x, "ndim", None) == 0:
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            return x
    return x


def _listify(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if type(v).__name__ == "Series":
        return v.tolist()
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _is_range(idx: Any) -> bool:
    return type(idx).__name__ == "RangeIndex"


def _columns(cols: dict[str, list], source: str, infos: list[ReadInfo] | None) -> list[Trace]:
    return json_traces(cols, source, infos=infos)


def _frame(df: Any, infos: list[ReadInfo] | None) -> list[Trace]:
    cols = {str(c): df[c].tolist() for c in df.columns}
    if pick(cols, STEP_KEYS) is None and not _is_range(df.index):
        name = str(df.index.name) if df.index.name is not None else "step"
        if df.index.dtype.kind in "iuf" or norm(name) in STEP_KEYS:
            cols = {name if norm(name) in STEP_KEYS else "step": df.index.tolist(), **cols}
    return json_traces(cols, "<DataFrame>", infos=infos)

"""Read training logs of every supported kind into :class:`~stablestep.diagnosis.trace.Trace`.

Supported sources (``load(source)`` picks by content, not only by extension):

- a stablestep run store (SQLite file) or a ``Run`` object from :func:`stablestep.open_run`;
- a CSV/TSV file with a step column (``step``, ``iter``, ``iteration``, ``global_step``,
  ``epoch``...) and a loss column (``loss``, ``train_loss``, ``lm_loss``...), optional
  ``lr``/``learning_rate``, ``grad_norm``/``norm`` and any stablestep metric name;
  a ``run``/``run_segment`` column splits the file into several runs;
- a TensorBoard log directory (scalars; the training-loss tag is found by name);
- a Keras ``History.history`` JSON (``{"loss": [...], ...}``, one entry per epoch);
- a JSON of parallel arrays (``{"step": [...], "train_loss": [...], ...}``) or a JSON list
  of records (``[{"step": 1, "loss": 2.3}, ...]``);
- text logs with ``key:value`` or ``key=value`` fields per line, such as llm.c's
  ``s:STEP trl:LOSS lr:LR norm:GNORM`` (validation lines ``tel:`` are kept apart).

Unusable input raises :class:`SourceError` with a one-line message naming what is missing.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from stablestep.diagnosis.trace import Trace, from_series
from stablestep.telemetry import names

STEP_KEYS = ("step", "steps", "global_step", "iteration", "iter", "it", "s", "epoch", "epochs")
LOSS_KEYS = (
    "loss", "train_loss", "training_loss", "trl", "lm_loss", "lm loss", "train/loss",
    "loss/train", "train_lm_loss", "micro_batch_loss", "batch_loss", "epoch_loss",
)
LR_KEYS = ("lr", "learning_rate", "learning-rate", "train/lr", "learning rate")
GRAD_KEYS = ("grad_norm", "norm", "gradient_norm", "grad-norm", "grad norm", "train/grad_norm")
RUN_KEYS = ("run", "run_name", "run_segment", "run_id")
_KNOWN_METRICS = {
    v for k, v in vars(names).items() if k.isupper() and isinstance(v, str) and not
    k.startswith("EVENT_")
}
_EXCLUDE_LOSS = re.compile(r"(val|test|eval|valid)", re.IGNORECASE)


class SourceError(ValueError):
    """The input cannot be read as a training log; the message is one line."""


class SourceWarning(UserWarning):
    """Part of the input was unreadable and skipped (e.g. a loss cell that is not a number)."""


def _norm(key: str) -> str:
    return key.strip().lower()


def _pick(columns: Iterable[str], candidates: tuple[str, ...]) -> str | None:
    lookup = {_norm(c): c for c in columns}
    for cand in candidates:
        if cand in lookup:
            return lookup[cand]
    return None


def _pick_loss(columns: Iterable[str]) -> str | None:
    cols = list(columns)
    found = _pick(cols, LOSS_KEYS)
    if found is not None:
        return found
    for c in cols:  # any training-looking column named *loss*
        if "loss" in _norm(c) and not _EXCLUDE_LOSS.search(c):
            return c
    return None


def _to_float(x: Any) -> float | None:
    """Parse a cell; ``None`` for missing, ``nan``/``inf`` kept as non-finite."""
    if x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x)
    text = str(x).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def parse_hyper(text: str) -> dict[str, Any]:
    """Read optimizer hyperparameters from free text such as ``"Adam b1=0.9 eps=1e-8 lr=1e-4"``."""
    out: dict[str, Any] = {}
    low = text.lower()
    if "adam" in low:
        out["kind"] = "adam"
    elif "sgd" in low:
        out["kind"] = "sgd"
    pats = {
        "beta1": r"(?:b1|beta1|beta_1)\s*[=:]\s*([0-9.eE+-]+)",
        "beta2": r"(?:b2|beta2|beta_2)\s*[=:]\s*([0-9.eE+-]+)",
        "eps": r"(?:eps|epsilon)\s*[=:]\s*([0-9.eE+-]+)",
        "lr": r"\blr\s*[=:]\s*([0-9.eE+-]+)",
        "momentum": r"momentum\s*[=:]\s*([0-9.eE+-]+)",
    }
    for key, pat in pats.items():
        m = re.search(pat, low)
        if m:
            val = _to_float(m.group(1).rstrip(".,"))
            if val is not None:
                out[key] = val
    if "amsgrad" in low:
        out["amsgrad"] = True
    return out


def _records_to_traces(
    rows: list[dict[str, Any]], *, source: str, what: str
) -> list[Trace]:
    """Rows of ``column -> cell`` (CSV, JSON records, text-log lines) into traces."""
    if not rows:
        raise SourceError(f"{source}: no rows found in {what}")
    columns: list[str] = []
    for r in rows:
        for c in r:
            if c not in columns:
                columns.append(c)
    step_col = _pick(columns, STEP_KEYS)
    loss_col = _pick_loss(columns)
    if loss_col is None:
        raise SourceError(
            f"{source}: no training-loss column among {', '.join(columns[:12])} "
            f"(expected one of: loss, train_loss, lm_loss, trl)"
        )
    run_col = _pick(columns, RUN_KEYS)
    lr_col = _pick(columns, LR_KEYS)
    grad_col = _pick(columns, GRAD_KEYS)
    extra = [c for c in columns if _norm(c) in _KNOWN_METRICS and c not in (loss_col, lr_col)]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get(run_col, "")) if run_col else "", []).append(r)
    traces = []
    unreadable = 0
    for run, group in groups.items():
        steps, losses, nonfinite = [], [], []
        series: dict[str, tuple[list[int], list[float]]] = {}
        hyper: dict[str, Any] = {}
        for i, r in enumerate(group):
            st = _to_float(r.get(step_col)) if step_col else float(i)
            if st is None or not math.isfinite(st):
                unreadable += step_col is not None and str(r.get(step_col) or "").strip() != ""
                continue
            st_i = int(st)
            loss = _to_float(r.get(loss_col))
            unreadable += loss is None and str(r.get(loss_col) or "").strip() != ""
            for col, key in ((lr_col, names.LR), (grad_col, names.GRAD_NORM)):
                if col is not None:
                    val = _to_float(r.get(col))
                    if val is not None and not (key == names.GRAD_NORM and val <= 0):
                        series.setdefault(key, ([], []))[0].append(st_i)
                        series[key][1].append(val)
            for col in extra:
                val = _to_float(r.get(col))
                if val is not None:
                    series.setdefault(_norm(col), ([], []))[0].append(st_i)
                    series[_norm(col)][1].append(val)
            for col in r:
                if _norm(col) in ("loss_scale", "nan_iters", "skipped_iters"):
                    val = _to_float(r.get(col))
                    if val is not None:
                        series.setdefault(_norm(col), ([], []))[0].append(st_i)
                        series[_norm(col)][1].append(val)
                if _norm(col) in ("optimizer_settings", "optimizer") and not hyper:
                    hyper = parse_hyper(str(r.get(col, "")))
            if loss is None:
                continue
            steps.append(st_i)
            losses.append(loss)
            if not math.isfinite(loss):
                nonfinite.append(st_i)
        nan_iters = series.get("nan_iters")
        if nan_iters:
            nonfinite += [s for s, v in zip(*nan_iters, strict=True) if v and v > 0]
        if not steps:
            continue
        traces.append(
            from_series(
                steps, losses, metrics=series, hyper=hyper, nonfinite_steps=nonfinite,
                name=run, source=source,
            )
        )
    if not traces:
        raise SourceError(f"{source}: column {loss_col!r} has no numeric values")
    if unreadable:
        warnings.warn(f"{source}: skipped {unreadable} record(s) whose step or {loss_col!r} "
                      "is not a number", SourceWarning, stacklevel=2)
    return traces


def read_csv(path: str) -> list[Trace]:
    """A CSV/TSV with a step and a loss column (see module docstring)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        sample = f.read(4096)
        f.seek(0)
        delim = "\t" if sample.count("\t") > sample.count(",") else ","
        rows = list(csv.DictReader(f, delimiter=delim))
    return _records_to_traces(rows, source=path, what="the CSV")


def _json_traces(data: Any, path: str) -> list[Trace]:
    if isinstance(data, dict) and isinstance(data.get("history"), dict):
        data = data["history"]  # {"history": History.history, "params": ...}
    if isinstance(data, list):
        if data and all(isinstance(r, dict) for r in data):
            return _records_to_traces(data, source=path, what="the JSON records")
        raise SourceError(f"{path}: a JSON list must hold objects with step and loss fields")
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object of arrays or a list of records")
    arrays = {k: v for k, v in data.items() if isinstance(v, list)}
    if not arrays:
        raise SourceError(f"{path}: the JSON object holds no arrays")
    loss_col = _pick_loss(arrays)
    if loss_col is None:
        raise SourceError(
            f"{path}: no training-loss array among {', '.join(list(arrays)[:12])} "
            f"(expected one of: loss, train_loss)"
        )
    n = len(arrays[loss_col])
    same = {k: v for k, v in arrays.items() if len(v) == n}
    rows = [{k: v[i] for k, v in same.items()} for i in range(n)]
    # Keras History has no step key: one entry per epoch, counted from 0.
    return _records_to_traces(rows, source=path, what="the JSON arrays")


def read_json(path: str) -> list[Trace]:
    """A Keras ``History.history`` JSON, a JSON of parallel arrays, or JSON records."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return _json_traces(data, path)


_NUMBER = r"[-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?|nan|inf)"
_FIELD = re.compile(r"([A-Za-z_][\w/.-]*)\s*[:=]\s*(" + _NUMBER + ")", re.IGNORECASE)


def read_text_log(path: str) -> list[Trace]:
    """Text logs with ``key:value`` fields per line (llm.c: ``s:12 trl:3.21 lr:6e-4 norm:0.9``).

    Lines without a training loss (llm.c's ``tel:`` validation lines) are ignored.
    """
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = {k: v for k, v in _FIELD.findall(line)}
            if fields and _pick(fields, STEP_KEYS) and _pick_loss(fields):
                rows.append(fields)
    if not rows:
        raise SourceError(
            f"{path}: no line with a step and a training loss "
            f"(expected fields like 's:STEP trl:LOSS' or 'step=N loss=X')"
        )
    return _records_to_traces(rows, source=path, what="the text log")


def read_tensorboard(path: str) -> list[Trace]:
    """Scalars of a TensorBoard log directory; one trace per directory holding event files."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # pragma: no cover - optional extra
        raise SourceError(
            f"{path}: reading TensorBoard logs needs `pip install stablestep[tensorboard]`"
        ) from None
    dirs = sorted({root for root, _, files in os.walk(path)
                   if any("tfevents" in f for f in files)})
    # Keras and Lightning write validation scalars to a sibling 'validation'/'val' run
    # under the same tag ('epoch_loss'): that is not a training loss.
    train_dirs = [d for d in dirs
                  if not _EXCLUDE_LOSS.search(os.path.basename(os.path.relpath(d, path)))]
    dirs = train_dirs or dirs
    traces = []
    for d in dirs:
        acc = EventAccumulator(d, size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags().get("scalars", [])
        loss_tag = _pick_loss(tags)
        if loss_tag is None:
            continue
        ev = acc.Scalars(loss_tag)
        metrics = {}
        for key, cands in ((names.LR, LR_KEYS), (names.GRAD_NORM, GRAD_KEYS)):
            tag = _pick(tags, cands)
            if tag:
                sc = acc.Scalars(tag)
                metrics[key] = ([e.step for e in sc], [e.value for e in sc])
        for tag in tags:
            if _norm(tag) in _KNOWN_METRICS and _norm(tag) not in metrics:
                sc = acc.Scalars(tag)
                metrics[_norm(tag)] = ([e.step for e in sc], [e.value for e in sc])
        losses = [e.value for e in ev]
        traces.append(from_series(
            [e.step for e in ev], losses, metrics=metrics, name=os.path.relpath(d, path),
            nonfinite_steps=[e.step for e in ev if not math.isfinite(e.value)], source=path,
        ))
    if not traces:
        raise SourceError(f"{path}: no TensorBoard scalar whose tag names a training loss")
    if len(traces) == 1:
        traces[0].name = ""
    return traces


def from_run(run: Any, *, source: str = "") -> Trace:
    """A stored run (:func:`stablestep.open_run`) as a trace: every metric, the optimizer's
    hyperparameters from ``run.config["hyper"]`` and the steps of non-finite events."""
    available = list(run.names())
    nonfinite = [int(e.step) for e in run.events if e.kind == names.EVENT_NONFINITE]
    if names.LOSS not in available and not nonfinite:
        raise SourceError(f"{source or run.name}: the run has no '{names.LOSS}' metric")
    if names.LOSS in available:
        steps, loss = run.series(names.LOSS)
    else:
        steps, loss = np.zeros(0, dtype=np.int64), np.zeros(0)
    per_layer = (names.ATTN_LOGIT_MAX + "/",)  # the diagnosis names the layers it blames
    metrics = {n: run.series(n) for n in available
               if n != names.LOSS and ("/" not in n or n.startswith(per_layer))}
    hyper = dict((run.config or {}).get("hyper") or {})
    for key in ("dtypes", "batch_size", "full_batch"):  # what the remedies must fit (#11)
        if (run.config or {}).get(key) is not None:
            hyper[key] = run.config[key]
    events = [{"step": int(e.step), "kind": e.kind, "data": e.data} for e in run.events
              if e.kind != names.EVENT_NONFINITE]
    return from_series(steps, loss, metrics=metrics, hyper=hyper, nonfinite_steps=nonfinite,
                       name=str(getattr(run, "name", "")), source=source, events=events)


def _is_sqlite(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def _read_store(path: str, run: str | None) -> list[Trace]:
    import stablestep

    try:
        runs = [run] if run is not None else list(stablestep.list_runs(path))
    except Exception as exc:  # the store module reports its own errors
        raise SourceError(f"{path}: cannot read the run store ({exc})") from None
    if not runs:
        raise SourceError(f"{path}: the run store holds no runs")
    out = []
    for name in runs:
        try:
            r = stablestep.open_run(path, name)
        except KeyError:
            raise SourceError(f"{path}: no run named {name!r} in the store") from None
        except Exception as exc:
            raise SourceError(f"{path}: cannot open run {name!r} ({exc})") from None
        out.append(from_run(r, source=path))
    return out


def load(source: Any, *, run: str | None = None) -> list[Trace]:
    """Read ``source`` (a path, a ``Run`` or a :class:`Trace`) into one trace per run.

    ``run`` selects one run of a multi-run source (a store, a CSV with a ``run`` column,
    a TensorBoard directory with several runs).
    """
    if isinstance(source, Trace):
        return [source]
    if hasattr(source, "series") and hasattr(source, "names"):
        return [from_run(source)]
    path = os.fspath(source)
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        has_events = any("tfevents" in f for _, _, files in os.walk(path) for f in files)
        traces = read_tensorboard(path) if has_events else _read_store(path, run)
    elif _is_sqlite(path):
        traces = _read_store(path, run)
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext in (".csv", ".tsv"):
            traces = read_csv(path)
        elif ext == ".json":
            traces = read_json(path)
        else:
            with open(path, "rb") as f:
                head = f.read(2048).lstrip()
            if head[:1] in (b"{", b"["):
                traces = read_json(path)
            elif b"," in head.split(b"\n", 1)[0] and b":" not in head.split(b"\n", 1)[0]:
                traces = read_csv(path)
            else:
                traces = read_text_log(path)
    if run is not None and not _is_sqlite(path) and not os.path.isdir(path) or (
        run is not None and os.path.isdir(path) and len(traces) > 1
    ):
        chosen = [t for t in traces if t.name == run]
        if not chosen:
            known = ", ".join(t.name for t in traces if t.name) or "none"
            raise SourceError(f"{path}: no run named {run!r} (runs: {known})")
        traces = chosen
    return traces

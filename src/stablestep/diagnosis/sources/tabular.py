"""CSV/TSV logs, streamed: the dialect found by :class:`csv.Sniffer`, the rows parsed
in blocks (by pandas' C parser when pandas is installed, else the ``csv`` module), and
only the columns a diagnosis uses kept, as typed arrays.

Layouts understood besides a plain ``step,loss,...`` table:

- a ``run``/``run_segment`` column splits the file into several runs;
- a W&B *history* export (``_step``, ``train/loss``, ``train/global_step``...): cells
  of keys not logged at a row are empty, so an empty loss there is "not logged";
- a W&B *chart* export (``Step``, ``<run> - train/loss``, ``<run> - train/loss__MIN``,
  ``<run> - train/loss__MAX``): one trace per run from its value column, never the
  ``__MIN``/``__MAX`` band;
- European spreadsheets: ``;`` separators with decimal commas (``1,25``).
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from stablestep.diagnosis.sources._common import (
    COUNT_KEYS,
    EPOCH_KEYS,
    GRAD_KEYS,
    HYPER_KEYS,
    KNOWN_METRICS,
    LR_KEYS,
    NAN_WORDS,
    RUN_KEYS,
    STEP_KEYS,
    Collector,
    ReadInfo,
    SourceError,
    check_path,
    columns_lookup,
    norm,
    pick,
    pick_loss,
    to_float,
    warn,
)
from stablestep.diagnosis.trace import Trace
from stablestep.telemetry import names

_BLOCK = 200_000  # rows per parsed block: bounds the transient memory of a huge file
_FIELD_LIMIT = 1 << 30  # csv's default 128 KB field limit rejects legal files
_CHART = re.compile(r"^(?P<run>.+?) - (?P<key>.+?)(?P<band>__MIN|__MAX)?$")
_DECIMAL_COMMA = re.compile(r"(?:^|[;\t|])\s*-?\d+,\d+(?:[eE][-+]?\d+)?\s*(?:[;\t|]|$)", re.M)


@contextlib.contextmanager
def _field_limit() -> Iterator[None]:
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, _FIELD_LIMIT))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _sniff(sample: str) -> tuple[Any, bool]:
    """The dialect of ``sample`` (whole lines) and whether numbers use decimal commas."""
    lines = sample[: sample.rfind("\n")] if "\n" in sample else sample
    try:
        dialect = csv.Sniffer().sniff(lines, delimiters=",;\t|")
    except csv.Error:
        first = lines.split("\n", 1)[0]
        counts = {d: first.count(d) for d in ",;\t|"}
        best = max(counts, key=lambda d: counts[d])

        class dialect(csv.excel):  # noqa: N801 - a csv dialect is a class
            delimiter = best if counts[best] else ","
    decimal_comma = dialect.delimiter != "," and bool(_DECIMAL_COMMA.search(lines))
    return dialect, decimal_comma


class _Layout:
    """Which columns (by position) feed which trace: one plain table, or one per W&B run."""

    def __init__(self, header: list[str], source: str) -> None:
        self.header = header
        table = columns_lookup(header)
        self.step = _index(header, pick(table, STEP_KEYS))
        self.wandb = any(k in table for k in ("_step", "_runtime", "_timestamp"))
        # W&B chart export: '<run> - <key>' value columns, with __MIN/__MAX bands
        chart: dict[str, dict[str, int]] = {}
        for i, h in enumerate(header):
            m = _CHART.match(h)
            if m and not m.group("band") and i != self.step:
                chart.setdefault(m.group("run"), {})[m.group("key")] = i
        chart = {r: cols for r, cols in chart.items() if pick_loss(cols) is not None}
        self.groups: dict[str | None, dict[str, int]] = {}
        if chart:
            self.wandb = True
            for run, cols in chart.items():
                self.groups[run] = cols
            loss_keys = {pick_loss(c) for c in chart.values()}
            self.loss_name = " - ".join(["<run>", *sorted(map(str, loss_keys))])
        else:
            self.groups[None] = {}
            for i, h in enumerate(header):
                self.groups[None].setdefault(h, i)
            loss = pick_loss(table)
            if loss is None:
                shown = ", ".join(h[:40] for h in header[:12])
                raise SourceError(
                    f"{source}: no training-loss column among {shown}"
                    f"{' ...' if len(header) > 12 else ''} (expected one of: loss, "
                    "train_loss, lm_loss, trl, train/loss)")
            self.loss_name = loss
        self.run = None if chart else _index(header, pick(table, RUN_KEYS))
        self.hyper = None if chart else _index(header, pick(table, HYPER_KEYS))
        # per group: loss column, metric columns -> stablestep name
        self.plan: dict[str | None, tuple[int, dict[str, int]]] = {}
        for run, cols in self.groups.items():
            ctable = table if run is None else columns_lookup(cols)
            loss_col = cols[pick_loss(ctable)]
            metric: dict[str, int] = {}
            for key, cands in ((names.LR, LR_KEYS), (names.GRAD_NORM, GRAD_KEYS)):
                c = pick(ctable, cands)
                if c is not None:
                    metric[key] = cols[c]
            for n, c in ctable.items():
                i = cols[c]
                if (n in KNOWN_METRICS or n in COUNT_KEYS) and n not in metric \
                        and i != loss_col and n != names.LOSS:
                    metric[n] = i
            self.plan[run] = (loss_col, metric)
        used = {self.step, self.run, self.hyper}
        for loss_col, metric in self.plan.values():
            used.add(loss_col)
            used.update(metric.values())
        self.used = sorted(i for i in used if i is not None)

    @property
    def step_name(self) -> str | None:
        return None if self.step is None else self.header[self.step]

    @property
    def coarse(self) -> str:
        if self.step is not None and norm(self.header[self.step]) in EPOCH_KEYS:
            return f"steps are epochs (column {self.header[self.step]!r})"
        return ""


# Below these sizes the csv module is faster than importing pandas' C parser.
_PANDAS_MIN_BYTES = 2 << 20
_PANDAS_MIN_ROWS = 20000


def _index(header: list[str], name: str | None) -> int | None:
    return None if name is None else header.index(name)


def _floats(cells: np.ndarray, decimal_comma: bool) -> np.ndarray:
    """A column to float64, NaN where no number: numeric blocks (parsed by pandas' C
    parser) as they are, text cells (object arrays) one by one."""
    if cells.dtype.kind in "iuf":
        return cells.astype(np.float64)
    pd = None
    if len(cells) > _PANDAS_MIN_ROWS:  # importing pandas costs more than a few rows
        try:
            import pandas as pd
        except ImportError:
            pd = None
    if pd is not None:
        s = pd.Series(cells, dtype=object)
        if decimal_comma:
            s = s.map(lambda c: c.replace(",", ".") if isinstance(c, str) else c)
        return pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    out = np.full(len(cells), np.nan)
    for i, c in enumerate(cells.tolist()):
        v = to_float(c, decimal_comma=decimal_comma)
        if v is not None:
            out[i] = v
    return out


def _loss_cells(cells: np.ndarray, decimal_comma: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The loss column: values (NaN/inf kept), the masks of empty cells and of cells
    with no loss at all (a record without the key, a text cell), and the count of text
    cells (not a number, not empty, not a NaN/inf spelling)."""
    vals = _floats(cells, decimal_comma)
    absent = np.zeros(len(cells), dtype=bool)
    if cells.dtype.kind in "iuf":  # only an empty cell is NA to the parser
        return vals, np.isnan(vals), absent, 0
    empty = np.zeros(len(cells), dtype=bool)
    bad = np.flatnonzero(np.isnan(vals))
    text = 0
    for i in bad.tolist():
        c = cells[i]
        if c is _ABSENT:
            absent[i] = True
            continue
        c = "" if c is None or isinstance(c, float) else str(c).strip()
        if not c:
            empty[i] = True
        elif c.lower() not in NAN_WORDS:
            text += 1
            absent[i] = True
    return vals, empty, absent, text


def _blocks_pandas(path: str, dialect: Any, used: list[int], ncols: int,
                   counts: dict[str, int], decimal_comma: bool
                   ) -> Iterator[dict[int, np.ndarray]]:
    import pandas as pd

    def bad_line(_fields: list[str]) -> None:
        counts["bad_lines"] += 1
        return None

    kw: dict[str, Any] = dict(
        sep=dialect.delimiter, quotechar=dialect.quotechar or '"', header=None, skiprows=1,
        usecols=used, keep_default_na=False, na_values=[""],
        decimal="," if decimal_comma else ".",
        encoding="utf-8", encoding_errors="replace", skip_blank_lines=True,
        chunksize=_BLOCK, names=list(range(ncols)),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            reader = pd.read_csv(path, engine="c", on_bad_lines="warn", **kw)
            for block in reader:
                yield {i: block[i].to_numpy() for i in used}
        finally:
            counts["bad_lines"] += sum(str(w.message).count("Skipping line") for w in caught)


def _blocks_csv(path: str, dialect: Any, used: list[int], ncols: int,
                counts: dict[str, int]) -> Iterator[dict[int, np.ndarray]]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f, _field_limit():
        reader = csv.reader(f, dialect)
        next(reader, None)
        rows: list[list[str]] = []
        for row in reader:
            if not row:
                continue
            rows.append(row)  # fields beyond the header are ignored, as pandas does
            if len(rows) >= _BLOCK:
                yield _columns(rows, used)
                rows = []
        if rows:
            yield _columns(rows, used)


def _columns(rows: list[list[str]], used: list[int]) -> dict[int, np.ndarray]:
    out = {}
    for i in used:
        col = np.empty(len(rows), dtype=object)
        col[:] = [r[i] if i < len(r) else "" for r in rows]
        out[i] = col
    return out


def read_csv(path: str, *, infos: list[ReadInfo] | None = None) -> list[Trace]:
    """A CSV/TSV with a step and a loss column (see the module docstring), streamed."""
    check_path(path, file=True)
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        sample = f.read(65536)
    if not sample.strip():
        raise SourceError(f"{path}: the file is empty")
    if "\x00" in sample:
        raise SourceError(f"{path}: binary data, not a CSV")
    dialect, decimal_comma = _sniff(sample)
    with open(path, newline="", encoding="utf-8", errors="replace") as f, _field_limit():
        try:
            header = next(csv.reader(f, dialect), None)
        except csv.Error as exc:
            raise SourceError(f"{path}: unreadable CSV header ({exc})") from None
    if not header:
        raise SourceError(f"{path}: no header row")
    header = [h.strip() for h in header]
    layout = _Layout(header, path)
    counts = {"bad_lines": 0}
    col = Collector(path)
    try:
        if os.path.getsize(path) < _PANDAS_MIN_BYTES:  # a small log: pandas' import (0.3 s)
            raise ImportError                          # costs more than the csv module
        import pandas  # noqa: F401

        blocks = _blocks_pandas(path, dialect, layout.used, len(header), counts, decimal_comma)
    except ImportError:
        blocks = _blocks_csv(path, dialect, layout.used, len(header), counts)
    try:
        for block in blocks:
            _consume(block, layout, col, decimal_comma)
    except SourceError:
        raise
    except (csv.Error, ValueError, UnicodeError) as exc:  # pandas' ParserError is a ValueError
        msg = str(exc).strip().splitlines()
        raise SourceError(f"{path}: unreadable CSV ({msg[-1] if msg else type(exc).__name__})"
                          ) from None
    if counts["bad_lines"]:
        warn(f"{path}: skipped {counts['bad_lines']} malformed row(s)")
    if not col.runs:
        raise SourceError(f"{path}: no rows with a step and a {layout.loss_name!r} value")
    return col.traces(loss_column=layout.loss_name, step_column=layout.step_name,
                      drop_empty=layout.wandb, coarse=layout.coarse, infos=infos)


def _consume(block: dict[int, np.ndarray], layout: _Layout, col: Collector,
             decimal_comma: bool) -> None:
    n = len(next(iter(block.values()))) if block else 0
    if n == 0:
        return
    if layout.step is not None:
        step_cells = block[layout.step]
        steps = _floats(step_cells, decimal_comma)
        if step_cells.dtype.kind not in "iuf":
            col.unreadable += sum(1 for i in np.flatnonzero(np.isnan(steps)).tolist()
                                  if _text(step_cells[i]))
    else:
        start = sum(b.rows for b in col.runs.values())
        steps = np.arange(start, start + n, dtype=np.float64)
    runs = block[layout.run] if layout.run is not None else None
    for group, (loss_idx, metric_idx) in layout.plan.items():
        loss, empty, absent, text = _loss_cells(block[loss_idx], decimal_comma)
        col.unreadable += text
        metrics = {k: _floats(block[i], decimal_comma) for k, i in metric_idx.items()}
        has_loss = ~absent
        if runs is None:
            name = "" if group is None else group
            col.add_chunk(name, steps, loss, has_loss, empty, metrics)
            if layout.hyper is not None:
                col.set_hyper(name, _first_hyper(block[layout.hyper]))
            continue
        labels = np.array(["" if isinstance(r, float) and r != r else str(r).strip()
                           for r in runs.tolist()], dtype=object)
        for name in dict.fromkeys(labels.tolist()):
            m = labels == name
            col.add_chunk(name, steps[m], loss[m], has_loss[m], empty[m],
                          {k: v[m] for k, v in metrics.items()})
            if layout.hyper is not None:
                col.set_hyper(name, _first_hyper(block[layout.hyper][m]))


def _text(c: Any) -> bool:
    """A non-empty cell (not NaN, not a missing record key)."""
    if c is None or c is _ABSENT or (isinstance(c, float) and c != c):
        return False
    return bool(str(c).strip())


def _first_hyper(cells: np.ndarray) -> dict[str, Any]:
    from stablestep.diagnosis.sources._common import parse_hyper

    for c in cells.tolist():
        if _text(c):
            return parse_hyper(str(c))
    return {}


_FROM_LAYOUT: Any = object()  # read_records' step_label default: the step key it found


def read_records(records: Iterator[dict[str, Any]], *, source: str, what: str,
                 coarse: str = "", infos: list[ReadInfo] | None = None,
                 step_label: Any = _FROM_LAYOUT) -> list[Trace]:
    """Rows of ``key -> value`` (JSON records, text-log lines) into traces, in blocks.

    The columns are those of the first block (the first 200,000 records); a record
    without the loss key only feeds its metrics. Values that are not numbers or
    strings (nested objects) count as missing. ``step_label`` names where the steps came
    from in the read report when the caller made them up (``None``: row numbers).
    """
    col = Collector(source)
    layout: _Layout | None = None
    header: dict[str, int] = {}
    block: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal layout
        if layout is None:
            for r in block:
                for k in r:
                    header.setdefault(k, len(header))
            layout = _Layout(list(header), source)
        cols = {}
        for i in layout.used:
            key = layout.header[i]
            c = np.empty(len(block), dtype=object)
            c[:] = [_scalar(r.get(key, _ABSENT)) for r in block]
            cols[i] = c
        _consume(cols, layout, col, False)

    for rec in records:
        block.append(rec)
        if len(block) >= _BLOCK:
            flush()
            block = []
    if block:
        flush()
    if layout is None:
        raise SourceError(f"{source}: no rows found in {what}")
    if not col.runs:
        raise SourceError(f"{source}: no rows with a step and a {layout.loss_name!r} value")
    step_column = layout.step_name if step_label is _FROM_LAYOUT else step_label
    return col.traces(loss_column=layout.loss_name, step_column=step_column,
                      drop_empty=layout.wandb, coarse=coarse or layout.coarse, infos=infos)


class _Absent:
    """A key missing from a record (not the same as JSON ``null``)."""

    def __str__(self) -> str:
        return ""


_ABSENT = _Absent()


def _scalar(v: Any) -> Any:
    if v is _ABSENT or v is None or isinstance(v, str):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "<not a number>"
    if isinstance(v, int) and abs(v) >= 2 ** 63:
        return float(v)
    return v

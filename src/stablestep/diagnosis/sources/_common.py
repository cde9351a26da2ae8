"""What every reader shares: column names, errors, the read report, and the collector
that turns streamed rows into traces with memory proportional to the points kept."""

from __future__ import annotations

import logging
import math
import os
import re
import stat
import warnings
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from stablestep.diagnosis.trace import Trace
from stablestep.telemetry import names

log = logging.getLogger("stablestep.diagnosis.sources")

STEP_KEYS = (
    "step", "steps", "global_step", "train/global_step", "trainer/global_step", "iteration",
    "iter", "it", "s", "_step", "epoch", "epochs",
)
EPOCH_KEYS = ("epoch", "epochs")
LOSS_KEYS = (
    "loss", "train_loss", "training_loss", "trl", "lm_loss", "lm loss", "train/loss",
    "loss/train", "train_lm_loss", "micro_batch_loss", "batch_loss", "train_loss_step",
    "epoch_loss", "stablestep/loss",
)
LR_KEYS = ("lr", "learning_rate", "learning-rate", "train/lr", "train/learning_rate",
           "learning rate", "stablestep/lr")
GRAD_KEYS = ("grad_norm", "norm", "gradient_norm", "grad-norm", "grad norm", "train/grad_norm",
             "stablestep/grad_norm")
RUN_KEYS = ("run", "run_name", "run_segment", "run_id")
COUNT_KEYS = ("loss_scale", "nan_iters", "skipped_iters")
HYPER_KEYS = ("optimizer_settings", "optimizer")
KNOWN_METRICS = frozenset(
    v for k, v in vars(names).items()
    if k.isupper() and isinstance(v, str) and not k.startswith("EVENT_")
)
_EXCLUDE_LOSS = re.compile(r"(val|test|eval|valid|scale|__min|__max)", re.IGNORECASE)
_INT64_MAX = 2.0 ** 63  # steps at or beyond it do not fit the trace's int64 steps
NAN_WORDS = frozenset({"nan", "-nan", "+nan", "inf", "+inf", "-inf", "infinity", "+infinity",
                       "-infinity"})


def one_line(text: str) -> str:
    """``text`` with line breaks, other control characters and bidi overrides escaped, so
    a message quoting a user's column or run name stays one clean line."""
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in str(text))


class SourceError(ValueError):
    """The input cannot be read as a training log; the message is one line (names quoted
    from the input have their control characters escaped)."""

    def __init__(self, message: str = ""):
        super().__init__(one_line(message))


class SourceWarning(UserWarning):
    """Part of the input was unreadable and skipped (e.g. a loss cell that is not a number),
    or what was read is too coarse to show a spike."""


@dataclass(frozen=True)
class ReadInfo:
    """What a reader took from a source, for people: which column (or tag) it read as the
    training loss and as the step, how many points, over which steps, how many of them
    non-finite, and whether the resolution is too coarse (epoch-level) to show a spike.

    ``str(info)`` is the one line the CLI prints.
    """

    source: str
    run: str
    loss_column: str
    step_column: str | None
    points: int
    first_step: int | None
    last_step: int | None
    nonfinite: int
    coarse: str = ""

    def __str__(self) -> str:
        where = f"{self.source}" + (f" run {self.run!r}" if self.run else "")
        step = f"step column {self.step_column!r}" if self.step_column else "row numbers as steps"
        span = ("" if self.first_step is None
                else f", steps {self.first_step}..{self.last_step}")
        nf = f", {self.nonfinite} non-finite" if self.nonfinite else ""
        pts = f"{self.points} point{'s' if self.points != 1 else ''}"
        return one_line(f"{where}: read {self.loss_column!r} ({pts}{span}{nf}; {step})")


def norm(key: Any) -> str:
    """Column names compare lower-cased and stripped."""
    return str(key).strip().lower()


def lookup(columns: Iterable[Any]) -> dict[str, Any]:
    """Normalised name -> the first column of that name (build once, pick many times)."""
    out: dict[str, Any] = {}
    for c in columns:
        out.setdefault(norm(c), c)
    return out


def pick(columns: Iterable[Any] | dict[str, Any], candidates: tuple[str, ...]) -> Any | None:
    """The first of ``candidates`` present among ``columns`` (linear in the columns; pass
    a :func:`lookup` to pick several times from a wide header)."""
    table = columns if isinstance(columns, _Lookup) else lookup(columns)
    for cand in candidates:
        if cand in table:
            return table[cand]
    return None


class _Lookup(dict):
    """A :func:`lookup` result, recognised by :func:`pick` and :func:`pick_loss`."""


def pick_loss(columns: Iterable[Any]) -> Any | None:
    """The training-loss column: a known name, else any ``*loss*`` column that is not a
    validation/test loss, a loss scale or a W&B ``__MIN``/``__MAX`` band."""
    table = columns if isinstance(columns, _Lookup) else _Lookup(lookup(columns))
    found = pick(table, LOSS_KEYS)
    if found is not None:
        return found
    for key, c in table.items():
        if "loss" in key and not _EXCLUDE_LOSS.search(str(c)):
            return c
    return None


def columns_lookup(columns: Iterable[Any]) -> _Lookup:
    """A reusable :func:`lookup` for :func:`pick` and :func:`pick_loss`."""
    return _Lookup(lookup(columns))


def to_float(x: Any, *, decimal_comma: bool = False) -> float | None:
    """Parse a cell: ``None`` when missing or not a number, ``nan``/``inf`` kept."""
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, (int, float, np.integer, np.floating)):
        try:
            return float(x)
        except OverflowError:
            return math.inf if x > 0 else -math.inf
    text = str(x).strip()
    if not text or len(text) > 64:
        return None
    if decimal_comma:
        text = text.replace(",", ".")
    try:
        return float(text)
    except ValueError:
        return None


def is_nan_word(text: Any) -> bool:
    """Whether a cell spells a non-finite number (``nan``, ``-inf``, ``Infinity``...)."""
    return isinstance(text, str) and text.strip().lower() in NAN_WORDS


def parse_hyper(text: str) -> dict[str, Any]:
    """Read optimizer hyperparameters from free text such as ``"Adam b1=0.9 eps=1e-8 lr=1e-4"``."""
    out: dict[str, Any] = {}
    low = str(text)[:4096].lower()
    if "adam" in low:
        out["kind"] = "adam"
    elif "sgd" in low:
        out["kind"] = "sgd"
    pats = {
        "beta1": r"(?<![\w])(?:b1|beta1|beta_1)\s*[=:]\s*([0-9.eE+-]{1,32})",
        "beta2": r"(?<![\w])(?:b2|beta2|beta_2)\s*[=:]\s*([0-9.eE+-]{1,32})",
        "eps": r"(?<![\w])(?:eps|epsilon)\s*[=:]\s*([0-9.eE+-]{1,32})",
        "lr": r"\blr\s*[=:]\s*([0-9.eE+-]{1,32})",
        "momentum": r"(?<![\w])momentum\s*[=:]\s*([0-9.eE+-]{1,32})",
    }
    for key, pat in pats.items():
        m = re.search(pat, low)
        if m:
            val = to_float(m.group(1).rstrip(".,"))
            if val is not None and math.isfinite(val):
                out[key] = val
    if "amsgrad" in low:
        out["amsgrad"] = True
    return out


def check_path(path: str, *, file: bool = False) -> os.stat_result:
    """``os.stat`` of ``path``, or a one-line :class:`SourceError` when it is missing or
    not something a reader may open (a FIFO or a device would block or never end; a
    directory where a ``file`` is expected)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError:  # an embedded NUL
        raise SourceError(f"{path!r}: not a valid path") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise SourceError(f"{path}: not a regular file or directory")
    if file and stat.S_ISDIR(st.st_mode):
        raise SourceError(f"{path}: a directory, not a log file")
    return st


def warn(message: str) -> None:
    """A :class:`SourceWarning` (the CLI prints it; also logged at DEBUG so a library
    user who only configures logging still finds it)."""
    log.debug("%s", message)
    warnings.warn(message, SourceWarning, stacklevel=3)


class _RunBuffer:
    """Growing typed arrays of one run: 8 bytes per kept number, nothing per row object."""

    def __init__(self) -> None:
        self.steps = array("q")
        self.loss = array("d")
        self.empty = array("b")  # the loss cell was empty (maybe "not logged at this step")
        self.metrics: dict[str, tuple[array, array]] = {}
        self.hyper: dict[str, Any] = {}
        self.rows = 0


class Collector:
    """Accumulates ``(run, step, loss, metrics)`` rows or column chunks into traces.

    Steps arrive as floats (NaN: unreadable, skipped); a loss that is ``None`` was not
    logged on that row (the row only feeds metrics), NaN/inf is a non-finite loss, and
    ``empty`` marks a loss cell left empty (pandas writes NaN that way; W&B leaves the
    cells of keys not logged at a step empty). Memory grows with the points kept.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.runs: dict[str, _RunBuffer] = {}
        self.unreadable = 0  # rows whose step or loss cell is text
        self.out_of_range = 0  # steps beyond int64

    def _run(self, run: str) -> _RunBuffer:
        buf = self.runs.get(run)
        if buf is None:
            buf = self.runs[run] = _RunBuffer()
        return buf

    def set_hyper(self, run: str, hyper: dict[str, Any]) -> None:
        """Optimizer hyperparameters of ``run`` (the first non-empty ones win)."""
        buf = self._run(run)
        if hyper and not buf.hyper:
            buf.hyper = hyper

    def add_chunk(self, run: str, steps: np.ndarray, loss: np.ndarray, has_loss: np.ndarray,
                  empty: np.ndarray, metrics: dict[str, np.ndarray]) -> None:
        """A block of rows of one run: float64 ``steps`` (NaN: unreadable), ``loss``,
        ``has_loss`` (False: no loss logged on the row), ``empty`` (the loss cell was
        empty) and float64 ``metrics`` (NaN: not recorded)."""
        steps = np.asarray(steps, dtype=np.float64)
        ok = np.isfinite(steps)
        big = ok & (np.abs(steps) >= _INT64_MAX)
        self.out_of_range += int(big.sum())
        ok &= ~big
        buf = self._run(run)
        buf.rows += int(ok.sum())
        st = steps[ok].astype(np.int64)
        keep = np.asarray(has_loss, dtype=bool)[ok]
        buf.steps.frombytes(st[keep].tobytes())
        buf.loss.frombytes(np.asarray(loss, dtype=np.float64)[ok][keep].tobytes())
        buf.empty.frombytes(np.asarray(empty, dtype=np.int8)[ok][keep].tobytes())
        for key, vals in metrics.items():
            v = np.asarray(vals, dtype=np.float64)[ok]
            m = ~np.isnan(v)
            if key == names.GRAD_NORM:
                m &= v > 0
            if not m.any():
                continue
            ms, mv = buf.metrics.setdefault(key, (array("q"), array("d")))
            ms.frombytes(st[m].tobytes())
            mv.frombytes(v[m].tobytes())

    def traces(self, *, loss_column: str, step_column: str | None, drop_empty: bool = False,
               coarse: str = "", infos: list[ReadInfo] | None = None) -> list[Trace]:
        """One trace per run. Empty loss cells count as non-finite (a NaN written by
        pandas) unless ``drop_empty`` or they are interleaved with logged values (a
        fifth of the rows or more, in three or more stretches each followed by a value:
        a loss logged at other steps than other columns, not a run that went NaN)."""
        out = []
        for run, buf in self.runs.items():
            steps = np.frombuffer(buf.steps, dtype=np.int64)
            loss = np.frombuffer(buf.loss, dtype=np.float64)
            empty = np.frombuffer(buf.empty, dtype=np.int8).astype(bool)
            n_empty = int(empty.sum())
            if n_empty and (drop_empty or _interleaved(empty)):
                if not drop_empty:
                    log.info("%s: %d rows without a %r value read as not logged there",
                             self.source, n_empty, loss_column)
                steps, loss = steps[~empty], loss[~empty]
            if steps.size == 0:
                continue
            metrics = {k: (np.frombuffer(s, dtype=np.int64), np.frombuffer(v, dtype=np.float64))
                       for k, (s, v) in buf.metrics.items()}
            nonfinite = steps[~np.isfinite(loss)]
            nan_iters = metrics.pop("nan_iters", None)
            if nan_iters is not None:
                metrics["nan_iters"] = nan_iters
                nonfinite = np.concatenate([nonfinite, nan_iters[0][nan_iters[1] > 0]])
            trace = build_trace(steps, loss, metrics=metrics, hyper=buf.hyper,
                                nonfinite_steps=nonfinite, name=run, source=self.source)
            out.append(trace)
            this_coarse = coarse
            if coarse.startswith("steps are epochs") and len(trace) > 1 and float(
                    np.median(np.diff(trace.steps))) > 1:
                this_coarse = ""  # every k-th epoch of a full-batch run: epochs are steps
            info = ReadInfo(self.source, run, str(loss_column), step_column, len(trace),
                            int(trace.steps[0]) if len(trace) else None,
                            int(trace.steps[-1]) if len(trace) else None,
                            int((~np.isfinite(trace.loss)).sum()), this_coarse)
            report(info, infos)
        if not out:
            raise SourceError(f"{self.source}: column {str(loss_column)!r} has no numeric values")
        why = []
        if self.unreadable:
            why.append(f"{self.unreadable} record(s) whose step or {str(loss_column)!r} "
                       "is not a number")
        if self.out_of_range:
            why.append(f"{self.out_of_range} record(s) whose step is beyond int64")
        if why:
            warn(f"{self.source}: skipped " + " and ".join(why))
        return out


def _interleaved(empty: np.ndarray) -> bool:
    """Whether empty cells are a fifth of the rows or more and come in three or more
    stretches that each end before a filled row."""
    if empty.sum() * 5 < empty.size:
        return False
    ends = np.flatnonzero(empty[:-1] & ~empty[1:])
    return ends.size >= 3


def report(info: ReadInfo, infos: list[ReadInfo] | None) -> None:
    """Log what was read (INFO), warn when it is epoch-level, and hand it to ``infos``."""
    log.info("%s", info)
    if info.coarse:
        warn(f"{info.source}: {info.coarse}: spikes shorter than that are invisible; "
             "log the loss every step for a real diagnosis")
    if infos is not None:
        infos.append(info)


def build_trace(steps: Any, loss: Any, *, metrics: dict[str, tuple[Any, Any]] | None = None,
                hyper: dict[str, Any] | None = None, nonfinite_steps: Any = (), name: str = "",
                source: str = "", events: Any = ()) -> Trace:
    """:func:`stablestep.diagnosis.trace.from_series` with the same result, vectorised
    (sorting and searching, no per-row Python objects) so a 10M-point log fits in the
    memory of its arrays.

    Rows are sorted by step, a repeated step keeps its last value, non-finite steps
    without a loss get ``nan``, metric values are aligned onto the loss steps, and the
    value of a metric recorded at a step without a loss moves to the next loss step
    (the first such value wins) when that step has none. ``events`` (``{"step", "kind",
    "data"}`` dicts, e.g. the guard's actions) are kept, sorted by step.
    """
    s = np.asarray(steps, dtype=np.int64).ravel()
    v = np.asarray(loss, dtype=np.float64).ravel()
    if s.size != v.size:
        raise ValueError(f"{s.size} steps for {v.size} loss values")
    nf = np.unique(np.asarray(list(nonfinite_steps) if not isinstance(nonfinite_steps, np.ndarray)
                              else nonfinite_steps, dtype=np.int64).ravel())
    ls, lv = _last_per_step(s, v)
    extra = np.setdiff1d(nf, ls, assume_unique=True)
    if extra.size:
        ls = np.concatenate([ls, extra])
        lv = np.concatenate([lv, np.full(extra.size, np.nan)])
        order = np.argsort(ls, kind="stable")
        ls, lv = ls[order], lv[order]
    aligned: dict[str, np.ndarray] = {}
    for key, (ms, mv) in (metrics or {}).items():
        ms = np.asarray(ms, dtype=np.int64).ravel()
        mv = np.asarray(mv, dtype=np.float64).ravel()
        if ms.size != mv.size:
            raise ValueError(f"metric {key!r}: {ms.size} steps for {mv.size} values")
        ms, mv = _last_per_step(ms, mv)
        out = np.full(ls.size, np.nan)
        pos = np.searchsorted(ls, ms)
        inside = pos < ls.size
        hit = inside.copy()
        hit[inside] = ls[pos[inside]] == ms[inside]
        out[pos[hit]] = mv[hit]
        # values at steps without a loss: the first finite one before each loss step
        # fills it when that step has no value of its own
        miss = ~hit & inside & np.isfinite(mv)
        if miss.any():
            j, first = np.unique(pos[miss], return_index=True)
            vals = mv[miss][first]
            empty = ~np.isfinite(out[j])
            out[j[empty]] = vals[empty]
        aligned[key] = out
    return Trace(steps=ls, loss=lv, metrics=aligned, hyper=dict(hyper or {}),
                 nonfinite_steps=frozenset(nf.tolist()), name=name, source=source,
                 events=sorted((dict(e) for e in events), key=lambda e: int(e["step"])))


def _last_per_step(s: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique steps with the value recorded last for each."""
    if s.size and np.all(s[1:] > s[:-1]):
        return s, v
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    last = np.ones(s.size, dtype=bool)
    last[:-1] = s[1:] != s[:-1]
    return s[last], v[last]

"""JSON logs: Hugging Face ``trainer_state.json``, Keras ``History.history``, a JSON of
parallel arrays, a list of records, and JSON Lines (one record per line).

- ``trainer_state.json`` (written by ``transformers.Trainer`` next to each checkpoint):
  ``{"log_history": [{"loss": 2.3, "grad_norm": 1.1, "learning_rate": 5e-05,
  "epoch": 0.01, "step": 10}, {"eval_loss": ..., "step": 500}, ...], "global_step": ...}``;
  entries without ``loss`` (evaluation, the final summary) feed no loss point.
- Keras ``History.history``: ``{"loss": [...], "val_loss": [...]}`` (optionally wrapped
  as ``{"history": {...}, "params": {...}}``), one entry per epoch, counted from 0.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from stablestep.diagnosis.sources._common import (
    STEP_KEYS,
    ReadInfo,
    SourceError,
    check_path,
    pick,
    pick_loss,
)
from stablestep.diagnosis.sources.tabular import read_records
from stablestep.diagnosis.trace import Trace


def _load(path: str) -> Any:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        return json.loads(text)
    except RecursionError:
        raise SourceError(f"{path}: JSON nested too deeply to be a training log") from None
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines
            return _json_lines(path, text)
        raise SourceError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _json_lines(path: str, text: str) -> list[Any]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except RecursionError:
            raise SourceError(f"{path}: JSON nested too deeply at line {n}") from None
        except json.JSONDecodeError as exc:
            raise SourceError(f"{path}: not valid JSON Lines ({exc.msg} at line {n})") from None
    return out


def read_json(path: str, *, infos: list[ReadInfo] | None = None) -> list[Trace]:
    """A ``trainer_state.json``, Keras history, JSON of arrays, records or JSON Lines
    (streamed record by record: memory follows the points kept)."""
    check_path(path, file=True)
    if _is_json_lines(path):
        return read_records(_stream_lines(path), source=path, what="the JSON Lines",
                            infos=infos)
    return json_traces(_load(path), path, infos=infos)


def _is_json_lines(path: str) -> bool:
    """Whether the first two non-empty lines are each a whole JSON object."""
    seen = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            if len(line) > 1 << 20:
                return False
            try:
                if not isinstance(json.loads(line), dict):
                    return False
            except (ValueError, RecursionError):
                return False
            seen += 1
            if seen == 2:
                return True
    return False


def _stream_lines(path: str) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except RecursionError:
                raise SourceError(f"{path}: JSON nested too deeply at line {n}") from None
            except ValueError as exc:
                msg = getattr(exc, "msg", str(exc))
                raise SourceError(f"{path}: not valid JSON Lines ({msg} at line {n})") from None
            if isinstance(rec, dict):
                yield rec


def json_traces(data: Any, source: str, *, infos: list[ReadInfo] | None = None) -> list[Trace]:
    """Traces from parsed JSON ``data`` (see the module docstring for the layouts)."""
    coarse = ""
    if isinstance(data, dict) and isinstance(data.get("log_history"), list):
        data = data["log_history"]  # Hugging Face trainer_state.json
    elif isinstance(data, dict) and isinstance(data.get("history"), dict):
        data = data["history"]  # {"history": History.history, "params": ...}
        coarse = "one point per epoch (a Keras History)"
    if isinstance(data, list):
        if data and all(isinstance(r, dict) for r in data):
            return read_records(iter(data), source=source, what="the JSON records",
                                infos=infos)
        raise SourceError(f"{source}: a JSON list must hold objects with step and loss fields")
    if not isinstance(data, dict):
        raise SourceError(f"{source}: expected a JSON object of arrays or a list of records")
    arrays = {str(k): v for k, v in data.items() if isinstance(v, list)}
    if not arrays:
        raise SourceError(f"{source}: the JSON object holds no arrays")
    loss_col = pick_loss(arrays)
    if loss_col is None:
        shown = ", ".join(k[:40] for k in list(arrays)[:12])
        raise SourceError(f"{source}: no training-loss array among {shown} "
                          "(expected one of: loss, train_loss)")
    if not coarse and pick(arrays, STEP_KEYS) is None and any(
            k.startswith("val_") for k in arrays):
        coarse = "one point per epoch (a Keras History)"
    n = len(arrays[loss_col])
    same = {k: v for k, v in arrays.items() if len(v) == n}
    return read_records(_rows(same, n), source=source, what="the JSON arrays", coarse=coarse,
                        infos=infos)


def _rows(arrays: dict[str, list], n: int) -> Iterator[dict[str, Any]]:
    keys = list(arrays)
    for i in range(n):
        yield {k: arrays[k][i] for k in keys}

"""Property-based fuzzing of every reader: whatever the bytes, ``load`` returns traces or
raises a one-line :class:`SourceError`, never another exception, never a hang."""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stablestep.diagnosis.sources import SourceError, load
from tests.fuzz._inputs import csv_texts, json_texts, names, numbers, steps, text_logs

FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _load_ok(path: str, **kw) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            traces = load(path, **kw)
        except SourceError as exc:
            assert "\n" not in str(exc) and str(exc)
            return
    for t in traces:
        assert t.steps.dtype == np.int64 and len(t.steps) == len(t.loss)
        assert np.all(np.diff(t.steps) > 0)


def _write(data: bytes | str, suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    return path


def _each(data, suffixes=(".csv", ".json", ".log", ".db", ".tsv", "")):
    for suffix in suffixes:
        path = _write(data, suffix)
        try:
            _load_ok(path)
        finally:
            os.unlink(path)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data):
    _each(data)


@FUZZ
@given(csv_texts(), st.one_of(st.none(), names))
def test_csv_dialects_extreme_numbers_and_names(text, run):
    path = _write(text, ".csv")
    try:
        _load_ok(path, run=run)
        _load_ok(path)
    finally:
        os.unlink(path)


@FUZZ
@given(json_texts(), st.integers(0, 400))
def test_json_layouts_and_truncations(text, cut):
    _each(text, (".json", ""))
    _each(text[:cut], (".json",))


@FUZZ
@given(text_logs())
def test_text_logs(text):
    _each(text, (".log",))


@FUZZ
@given(st.one_of(st.lists(numbers, max_size=20), st.dictionaries(steps, numbers, max_size=8),
                 st.lists(st.tuples(steps, numbers), max_size=8),
                 st.dictionaries(st.sampled_from(["step", "loss", "lr", "x"]),
                                 st.lists(numbers, max_size=5), max_size=4)))
def test_in_memory_objects(obj):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            load(obj)
        except SourceError as exc:
            assert "\n" not in str(exc)
        try:
            load(np.asarray(obj, dtype=object) if isinstance(obj, list) else obj)
        except SourceError:
            pass


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    """A run store and a TensorBoard event file, to truncate and scribble on."""
    from torch.utils.tensorboard import SummaryWriter

    from stablestep.telemetry.store import RunWriter

    root = tmp_path_factory.mktemp("valid")
    w = RunWriter(root / "s.db", "r", config={"hyper": {"lr": 1e-3}})
    for s in range(300):
        w.add(s, {"loss": 1.0 + (s == 200) * 9, "lr": 1e-3, "grad_norm": 1.0})
    w.event(250, "non-finite", {"what": ["loss"]})
    w.close()
    sw = SummaryWriter(str(root / "tb"))
    for s in range(60):
        sw.add_scalar("train/loss", 1.0, s)
    sw.close()
    (tb,) = [root / "tb" / n for n in os.listdir(root / "tb")]
    return {"store": (root / "s.db").read_bytes(), "tb": tb.read_bytes()}


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_truncated_and_scribbled_stores_and_event_files(valid_files, data):
    kind = data.draw(st.sampled_from(["store", "tb"]))
    raw = bytearray(valid_files[kind])
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    for _ in range(data.draw(st.integers(0, 6))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    with tempfile.TemporaryDirectory() as d:
        if kind == "store":
            path = os.path.join(d, "s.db")
            open(path, "wb").write(bytes(raw))
        else:
            path = d
            open(os.path.join(d, "events.out.tfevents.1.host"), "wb").write(bytes(raw))
        _load_ok(path)

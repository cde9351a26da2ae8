"""TensorBoard event files, read record by record with their checksums checked.

An event file is a sequence of TFRecords: ``uint64 length``, ``uint32 masked_crc32c(length)``,
``length`` bytes of a serialised ``Event`` protobuf, ``uint32 masked_crc32c(data)``.
TensorBoard's own loader stops silently at the first bad record (a file with a flipped
byte once gave 33 of 200 steps, and the spike after them was missed). Here a bad
record is skipped by searching forward for the next record whose length checksum
holds, and a :class:`SourceWarning` says how many bytes were skipped and how many
points were read. Data checksums are verified on the first 16 MB of each file (the
pure-Python CRC is slow); beyond that a record must still parse as an ``Event``.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterator
from typing import Any

import numpy as np

from stablestep.diagnosis.sources._common import (
    GRAD_KEYS,
    KNOWN_METRICS,
    LR_KEYS,
    ReadInfo,
    SourceError,
    build_trace,
    check_path,
    norm,
    pick,
    pick_loss,
    report,
    warn,
)
from stablestep.diagnosis.trace import Trace
from stablestep.telemetry import names

_VERIFY_BYTES = 16 << 20
_MAX_RECORD = 64 << 20
_RESYNC_LIMIT = 4 << 20


def _crc_ok(data: bytes, crc: int) -> bool:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    return masked_crc32c(data) == crc


def _records(path: str, bad: dict[str, int]) -> Iterator[bytes]:
    """The data of each valid record; corrupt stretches are skipped and counted in ``bad``."""
    with open(path, "rb") as f:
        buf = f.read()
    pos, n = 0, len(buf)
    verified = 0
    while pos < n:
        if n - pos < 12:
            bad["truncated"] += n - pos
            return
        length, lcrc = struct.unpack_from("<QI", buf, pos)
        ok = length <= _MAX_RECORD and pos + 12 + length + 4 <= n and _crc_ok(buf[pos:pos + 8],
                                                                               lcrc)
        if ok:
            data = buf[pos + 12:pos + 12 + length]
            if verified < _VERIFY_BYTES:
                verified += length
                (dcrc,) = struct.unpack_from("<I", buf, pos + 12 + length)
                ok = _crc_ok(data, dcrc)
        if ok:
            yield data
            pos += 16 + length
            continue
        if length <= _MAX_RECORD and pos + 12 <= n < pos + 16 + length and _crc_ok(
                buf[pos:pos + 8], lcrc):
            bad["truncated"] += n - pos  # the last record was cut short (a crash)
            return
        start = pos
        pos = _resync(buf, pos + 1)
        bad["corrupt"] += pos - start
        bad["stretches"] += 1


def _resync(buf: bytes, pos: int) -> int:
    """The next offset holding a record whose length checksum holds (or the end)."""
    end = min(len(buf), pos + _RESYNC_LIMIT)
    while pos + 12 <= end:
        length, lcrc = struct.unpack_from("<QI", buf, pos)
        if length <= _MAX_RECORD and pos + 16 + length <= len(buf) and _crc_ok(
                buf[pos:pos + 8], lcrc):
            return pos
        pos += 1
    return len(buf) if end == len(buf) else end


def _scalars(path: str, bad: dict[str, int]) -> dict[str, tuple[array, array]]:
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import event_pb2

    out: dict[str, tuple[array, array]] = {}  # 16 bytes a point
    for data in _records(path, bad):
        ev = event_pb2.Event()
        try:
            ev.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError):
            bad["unparsable"] += 1
            continue
        if not ev.HasField("summary"):
            continue
        for v in ev.summary.value:
            val = _value(v)
            if val is None:
                continue
            steps, vals = out.setdefault(v.tag, (array("q"), array("d")))
            steps.append(int(ev.step))
            vals.append(val)
    return out


def _value(v: Any) -> float | None:
    kind = v.WhichOneof("value")
    if kind == "simple_value":
        return float(v.simple_value)
    if kind == "tensor":  # tf.summary.scalar in TF2 / Keras: a 0-d float tensor
        t = v.tensor
        if t.tensor_shape.dim:
            return None
        if t.float_val:
            return float(t.float_val[0])
        if t.double_val:
            return float(t.double_val[0])
        if t.tensor_content and len(t.tensor_content) in (4, 8):
            fmt = "<f" if len(t.tensor_content) == 4 else "<d"
            return float(struct.unpack(fmt, t.tensor_content)[0])
    return None


def event_dirs(path: str) -> list[str]:
    """Directories under ``path`` holding event files, sorted."""
    return sorted({root for root, _, files in os.walk(path)
                   if any("tfevents" in f for f in files)})


def read_tensorboard(path: str, *, infos: list[ReadInfo] | None = None) -> list[Trace]:
    """Scalars of a TensorBoard log directory; one trace per directory holding event files.

    Keras and Lightning write validation scalars to a sibling ``validation``/``val`` run
    under the same tag (``epoch_loss``): those runs are skipped when a training run exists.
    """
    check_path(path)
    if not os.path.isdir(path):
        raise SourceError(f"{path}: not a TensorBoard log directory")
    try:
        import tensorboard  # noqa: F401
    except ImportError:  # pragma: no cover - optional extra
        raise SourceError(
            f"{path}: reading TensorBoard logs needs `pip install stablestep[tensorboard]`"
        ) from None
    from stablestep.diagnosis.sources._common import _EXCLUDE_LOSS

    dirs = event_dirs(path)
    train = [d for d in dirs
             if not _EXCLUDE_LOSS.search(os.path.basename(os.path.relpath(d, path)))]
    traces = []
    for d in train or dirs:
        tags: dict[str, tuple[array, array]] = {}
        bad = {"corrupt": 0, "stretches": 0, "truncated": 0, "unparsable": 0}
        files = sorted(f for f in os.listdir(d) if "tfevents" in f)
        for fname in files:
            fpath = os.path.join(d, fname)
            if not os.path.isfile(fpath):
                continue
            for tag, (s, v) in _scalars(fpath, bad).items():
                cur = tags.setdefault(tag, (array("q"), array("d")))
                cur[0].extend(s)
                cur[1].extend(v)
        loss_tag = pick_loss(tags)
        rel = os.path.relpath(d, path)
        if bad["corrupt"] or bad["unparsable"] or bad["truncated"]:
            n = len(tags[loss_tag][0]) if loss_tag else 0
            parts = []
            if bad["corrupt"]:
                parts.append(f"skipped {bad['corrupt']} corrupt bytes in {bad['stretches']} "
                             "place(s)")
            if bad["truncated"]:
                parts.append(f"the last {bad['truncated']} bytes are a truncated record")
            if bad["unparsable"]:
                parts.append(f"{bad['unparsable']} record(s) do not parse")
            warn(f"{os.path.join(path, rel) if rel != '.' else path}: damaged event file: "
                 f"{'; '.join(parts)}; read {n} loss points around the damage")
        if loss_tag is None:
            continue
        steps, losses = tags[loss_tag]
        metrics = {}
        for key, cands in ((names.LR, LR_KEYS), (names.GRAD_NORM, GRAD_KEYS)):
            tag = pick(tags, cands)
            if tag:
                metrics[key] = tags[tag]
        for tag in tags:
            base = norm(tag).removeprefix("stablestep/")
            if base in KNOWN_METRICS and base not in metrics and tag != loss_tag:
                metrics[base] = tags[tag]
        st = np.asarray(steps, dtype=np.int64)
        lv = np.asarray(losses, dtype=np.float64)
        tr = build_trace(st, lv, metrics=metrics, name=rel,
                         nonfinite_steps=st[~np.isfinite(lv)], source=path)
        traces.append((tr, loss_tag))
    if not traces:
        raise SourceError(f"{path}: no TensorBoard scalar whose tag names a training loss")
    if len(traces) == 1:
        traces[0][0].name = ""
    out = []
    for tr, tag in traces:
        coarse = "one point per epoch" if norm(tag).startswith("epoch_") else ""
        report(ReadInfo(path, tr.name if len(traces) > 1 else "", tag, "step", len(tr),
                        int(tr.steps[0]) if len(tr) else None,
                        int(tr.steps[-1]) if len(tr) else None,
                        int((~np.isfinite(tr.loss)).sum()), coarse), infos)
        out.append(tr)
    return out

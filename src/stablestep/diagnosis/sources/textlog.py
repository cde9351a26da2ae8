"""Text logs with ``key:value`` or ``key=value`` fields per line, read line by line.

llm.c / modded-nanogpt write ``s:12 trl:3.21 lr:6e-4 norm:0.9``; Megatron-style and
hand-written logs ``step=12 loss=3.21``. Lines without a step and a training loss (llm.c's
``tel:`` validation lines, banners) are ignored. The field pattern can only start a
key where no key character precedes it, so a line is scanned in linear time however
long it is (an 80 KB line of letters once took 70 s of regex backtracking).
"""

from __future__ import annotations

import re
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

_NUMBER = r"[-+]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|nan|inf)"
_KEYCHARS = r"\w/.\-"
_FIELD = re.compile(
    rf"(?<![{_KEYCHARS}])([A-Za-z_][{_KEYCHARS}]*)[ \t]*[:=][ \t]*({_NUMBER})",
    re.IGNORECASE,
)


def _records(path: str) -> Iterator[dict[str, Any]]:
    keysets: dict[frozenset[str], bool] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = dict(_FIELD.findall(line))
            if not fields:
                continue
            ks = frozenset(fields)
            ok = keysets.get(ks)
            if ok is None:
                ok = keysets[ks] = bool(pick(ks, STEP_KEYS) and pick_loss(ks))
            if ok:
                yield fields


def read_text_log(path: str, *, infos: list[ReadInfo] | None = None) -> list[Trace]:
    """Text logs with ``key:value`` fields per line (llm.c: ``s:12 trl:3.21 lr:6e-4 norm:0.9``).

    Lines without a training loss (llm.c's ``tel:`` validation lines) are ignored.
    """
    check_path(path, file=True)
    try:
        return read_records(_records(path), source=path, what="the text log", infos=infos)
    except SourceError as exc:
        if "no rows found" not in str(exc):
            raise
    raise SourceError(
        f"{path}: no line with a step and a training loss "
        f"(expected fields like 's:STEP trl:LOSS' or 'step=N loss=X')"
    )

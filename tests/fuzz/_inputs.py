"""Hypothesis strategies for hostile training logs: random bytes, truncations of valid
files, CSV dialects, extreme numbers and hostile names."""

from __future__ import annotations

import json
import math

from hypothesis import strategies as st

HOSTILE_NAMES = [
    "$\\undefinedmacro$", "\x1b[31mred\x1b[0m", "\u202eevil", "a" * 10_000, "../../etc",
    "new\nline", "tab\there", "", " ", "é漢字", "<script>alert(1)</script>", "nul\x00x",
    "run,with,commas", '"quoted"', "-2",
]
EXTREME = [0.0, -0.0, 1e308, -1e308, 1e-320, 5e-324, math.nan, math.inf, -math.inf, 1.0, 2.5,
           -7.0, 3.4e38, 1e-45]
EXTREME_STEPS = [0, 1, -1, 2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -(2 ** 63),
                 10 ** 30, 1.5, 7]
CELL_TEXT = ["", "nan", "NaN", "inf", "-inf", "abc", "1,5", "1e999", "0x10", "None", "null",
             " 3 ", "1.0.0", "\x1b[2J", "—"]

names = st.sampled_from(HOSTILE_NAMES)
numbers = st.one_of(st.sampled_from(EXTREME), st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(-(2 ** 70), 2 ** 70))
steps = st.one_of(st.sampled_from(EXTREME_STEPS), st.integers(-10, 10 ** 6))
cells = st.one_of(numbers.map(repr), st.sampled_from(CELL_TEXT), steps.map(str))


@st.composite
def csv_texts(draw) -> str:
    """A CSV in a drawn dialect, with a drawn header and hostile cells."""
    delim = draw(st.sampled_from([",", ";", "\t", "|"]))
    quote = draw(st.booleans())
    cols = draw(st.lists(st.sampled_from(
        ["step", "iter", "loss", "train_loss", "lr", "grad_norm", "run", "epoch", "_step",
         "train/loss", "x - train/loss", "x - train/loss__MIN", "optimizer", "note",
         *HOSTILE_NAMES[:6]]), min_size=1, max_size=6))
    rows = draw(st.lists(st.lists(cells, min_size=0, max_size=len(cols) + 2), max_size=12))
    q = (lambda c: '"' + c.replace('"', '""') + '"') if quote else (lambda c: c)
    lines = [delim.join(q(c) for c in cols)] + [delim.join(q(c) for c in r) for r in rows]
    bom = "\ufeff" if draw(st.booleans()) else ""
    return bom + draw(st.sampled_from(["\n", "\r\n"])).join(lines) + "\n"


@st.composite
def json_texts(draw) -> str:
    """Records, arrays, trainer_state or Keras history JSON with hostile values."""
    n = draw(st.integers(0, 8))
    vals = draw(st.lists(st.one_of(numbers, st.none(), st.sampled_from(CELL_TEXT),
                                   st.just({"a": 1}), st.just([1, 2])),
                         min_size=n, max_size=n))
    sts = draw(st.lists(steps, min_size=n, max_size=n))
    kind = draw(st.sampled_from(["records", "arrays", "trainer_state", "history", "scalar"]))
    if kind == "records":
        data = [{"step": s, "loss": v} for s, v in zip(sts, vals, strict=True)]
    elif kind == "arrays":
        data = {"step": sts, "train_loss": vals}
    elif kind == "trainer_state":
        data = {"log_history": [{"step": s, "loss": v, "learning_rate": 1e-3}
                                for s, v in zip(sts, vals, strict=True)], "global_step": n}
    elif kind == "history":
        data = {"history": {"loss": vals, "val_loss": vals}, "params": {}}
    else:
        data = draw(st.one_of(numbers, st.none(), st.text(max_size=5)))
    return json.dumps(data, default=str)


def text_logs() -> st.SearchStrategy[str]:
    """llm.c-style lines mixed with noise and very long tokens."""
    line = st.one_of(
        st.builds(lambda s, v: f"s:{s} trl:{v}", steps, cells),
        st.builds(lambda s, v: f"step={s} loss={v} lr=1e-3", steps, cells),
        st.text(max_size=40),
        st.sampled_from(["a" * 5000, "x:" * 3000, "1" * 5000 + "x", "=" * 3000]),
    )
    return st.lists(line, max_size=10).map("\n".join)

"""Read training logs of every supported kind into :class:`~stablestep.diagnosis.trace.Trace`.

Supported sources (``load(source)`` picks by content, not only by extension):

- a stablestep run store (SQLite file, or a lab directory holding ``run.sqlite``) or a
  ``Run`` object from :func:`stablestep.open_run`;
- a CSV/TSV file in any dialect :class:`csv.Sniffer` recognises (``;`` with decimal
  commas included) with a step column (``step``, ``iter``, ``iteration``,
  ``global_step``, ``_step``, ``epoch``...) and a loss column (``loss``, ``train_loss``,
  ``lm_loss``, ``train/loss``...), optional ``lr``/``learning_rate``,
  ``grad_norm``/``norm`` and any stablestep metric name; a ``run``/``run_segment``
  column splits the file into several runs; W&B history and chart exports;
- a TensorBoard log directory (scalars; the training-loss tag is found by name);
- Hugging Face ``trainer_state.json``, a Keras ``History.history`` JSON, a JSON of
  parallel arrays, a JSON list of records, JSON Lines;
- text logs with ``key:value`` or ``key=value`` fields per line, such as llm.c's
  ``s:STEP trl:LOSS lr:LR norm:GNORM`` (validation lines ``tel:`` are kept apart);
- in memory: a pandas ``DataFrame``/``Series``, a dict, a numpy array, a list.

Empty loss cells and ``nan`` are a non-finite loss (that is how pandas writes NaN),
except where a format leaves cells of keys not logged at a row empty (W&B).
Files are streamed: memory grows with the points kept, not with the file.

Each reader says what it read (:class:`ReadInfo`: the loss column or tag, the step
column, how many points) through the ``stablestep.diagnosis.sources`` logger and the
``infos`` list of :func:`load`, and warns (:class:`SourceWarning`) when the log is
epoch-level or part of it was unreadable. Unusable input raises :class:`SourceError`
with a one-line message naming what is missing.
"""

from __future__ import annotations

from stablestep._lazy import attach

_LAZY = {
    "GRAD_KEYS": "stablestep.diagnosis.sources._common",
    "LOSS_KEYS": "stablestep.diagnosis.sources._common",
    "LR_KEYS": "stablestep.diagnosis.sources._common",
    "RUN_KEYS": "stablestep.diagnosis.sources._common",
    "STEP_KEYS": "stablestep.diagnosis.sources._common",
    "ReadInfo": "stablestep.diagnosis.sources._common",
    "SourceError": "stablestep.diagnosis.sources._common",
    "SourceWarning": "stablestep.diagnosis.sources._common",
    "build_trace": "stablestep.diagnosis.sources._common",
    "parse_hyper": "stablestep.diagnosis.sources._common",
    "json_traces": "stablestep.diagnosis.sources.jsonlogs",
    "read_json": "stablestep.diagnosis.sources.jsonlogs",
    "from_object": "stablestep.diagnosis.sources.objects",
    "from_run": "stablestep.diagnosis.sources.stored",
    "is_sqlite": "stablestep.diagnosis.sources.stored",
    "read_store": "stablestep.diagnosis.sources.stored",
    "read_csv": "stablestep.diagnosis.sources.tabular",
    "read_records": "stablestep.diagnosis.sources.tabular",
    "read_tensorboard": "stablestep.diagnosis.sources.tensorboard",
    "read_text_log": "stablestep.diagnosis.sources.textlog",
    "load": "stablestep.diagnosis.sources.loader",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY, globals())

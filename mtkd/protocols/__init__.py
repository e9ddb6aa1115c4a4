"""Protocols: whole experiments as presets (``mtkd protocol NAME``).

A protocol is one YAML file (``mtkd/presets/<name>.yaml``, or any file of the same form):

- ``common``: run-configuration keys shared by every stage (data, split);
- ``stages``: named run configurations, merged onto ``common`` and run in order, each in
  ``RUNS/<stage>``. A stage may instead name a complete run configuration file
  (``config: FILE``, relative to the protocol file). ``baseline_of: STAGE`` makes a no-KD
  twin: the named distillation stage's configuration with ``distill.scale: 0`` (METHOD.md
  section 3, fix 3); a twin with its own file must equal its stage but for that;
- ``expects``: what the dataset must be (``layout``, ``structures``), checked before training;
- ``reference``: published numbers printed beside ours (optional).

``${DATA}`` and ``${RUNS}`` in string values are filled from ``--data`` and ``--runs``. Other
relative paths are read from the folder of the file that holds them (the protocol file, or a
stage's config file), as in every configuration file; a ``--set`` path from the working
directory.
Overrides (``--epochs``, ``--slice-size``, ``--patch-size``, ``--device`` and
``--set [STAGE:]KEY=VALUE``) change the loaded stages, never the preset file: tests run the
real preset at a tiny size. ``--set`` addressed to a stage also reaches its no-KD twin;
``students:`` addresses every distillation stage.

Running a protocol skips a stage whose run folder holds a model, resumes one that holds a
checkpoint, starts the others, then evaluates every model on the test patients: per-volume
Dice and HD95 per structure, and the paper's pooled slice Dice (:mod:`mtkd.infer.pooled`),
written to ``RUNS/report.json`` and ``RUNS/report.md``.

Modules: :mod:`~mtkd.protocols.specification` (reading a protocol, ``--write-configs``),
:mod:`~mtkd.protocols.running` (the stages in order) and :mod:`~mtkd.protocols.report`
(the evaluation and its report).
"""

from mtkd.protocols.report import evaluate_protocol, format_report, write_report
from mtkd.protocols.running import check_expectations, run_protocol
from mtkd.protocols.specification import (
    PRESETS,
    Protocol,
    Stage,
    available_protocols,
    load_protocol,
    parse_override,
    protocol_file,
    require_filled,
    select_stages,
    write_configs,
)

__all__ = [
    "PRESETS",
    "Protocol",
    "Stage",
    "available_protocols",
    "check_expectations",
    "evaluate_protocol",
    "format_report",
    "load_protocol",
    "parse_override",
    "protocol_file",
    "require_filled",
    "run_protocol",
    "select_stages",
    "write_configs",
    "write_report",
]

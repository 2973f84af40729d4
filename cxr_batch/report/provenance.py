"""The provenance record: what produced a report, written beside it as ``<report>.provenance.json``.

This module is the public face of two: :mod:`cxr_batch.report.provenance_facts` (the facts a run
states: time, run id, input-list hash, machine, software, model, OOD and screening, engine settings)
and :mod:`cxr_batch.report.provenance_record` (the record: schema, reading, writing, checking,
:class:`RunRecorder`, :func:`count_report_rows`, ``merge``'s record). Secrets are kept out by the
project's one redactor, :mod:`cxr_batch.redact`. Every name is re-exported here.

One JSON document per report (schema: ``docs/provenance.schema.json``, described in
``docs/provenance.md``), with a ``schema_version`` and a list of ``runs``. Each run says when it
ran, the command line (secrets never: :func:`redact_argv`), the versions, the model (name,
version, precision, sha256 of the file), the execution provider that really ran, the CPU or GPU,
the thread and batch settings, the preprocessing contract, the out-of-distribution threshold, a
hash of the input list (:func:`input_list_sha256`), the shard, and the counts of the rows
it wrote by status and label. Every report row carries the ``run_id`` of the run that wrote it.

- ``classify`` writes the record when the run starts (status ``running``), every
  :data:`CHECKPOINT_S` seconds while it runs, and at the end (``finished``, ``interrupted`` on
  Ctrl-C, ``failed`` on a fatal error). Every write is atomic (a temporary file, fsync, rename):
  the record on disk is always a complete document. A run killed with ``kill -9`` stays
  ``running`` with the counts of its last checkpoint.
- ``classify --resume`` appends a run to the existing record; earlier runs are kept as they are.
- ``merge`` writes the merged report's record: every run of every part, each with the ``part``
  it came from, and a ``merge`` entry (:func:`merge_records`).

Library use (what ``classify`` does; other input sources, such as DICOMweb, do the same)::

    run_id = new_run_id()
    writer, existing = open_report(report_config, labels, ident, run_id=run_id)
    recorder = RunRecorder.start(record_file, run_id=run_id, report=out, model=model_facts(...), ...)
    try:
        for batch in batches:
            writer.write(batch)
            recorder.add(batch)
    except BaseException as exc:
        recorder.note_exception(exc)
        raise
    finally:
        writer.close()
        recorder.close()
"""

from __future__ import annotations

from cxr_batch.redact import REDACTED, redact_argv, redact_source
from cxr_batch.report.provenance_facts import (
    INPUT_HASH_METHOD,
    InputListHash,
    cpu_facts,
    engine_settings,
    gpu_facts,
    host_facts,
    input_list_sha256,
    model_facts,
    new_run_id,
    ood_facts,
    preprocessing_facts,
    screening_facts,
    utc_now,
    versions,
)
from cxr_batch.report.provenance_record import (
    CHECKPOINT_S,
    KIND,
    RECORD_MAX_BYTES,
    SCHEMA_VERSION,
    STATUSES,
    SUFFIX,
    Counts,
    PartRecord,
    RunRecorder,
    check_record_output,
    count_report_rows,
    merge_records,
    part_record_path,
    read_record,
    record_path,
    start_classifier_run,
    write_record,
)

__all__ = [
    "CHECKPOINT_S",
    "INPUT_HASH_METHOD",
    "KIND",
    "RECORD_MAX_BYTES",
    "REDACTED",
    "SCHEMA_VERSION",
    "STATUSES",
    "SUFFIX",
    "Counts",
    "InputListHash",
    "PartRecord",
    "RunRecorder",
    "check_record_output",
    "count_report_rows",
    "cpu_facts",
    "engine_settings",
    "gpu_facts",
    "host_facts",
    "input_list_sha256",
    "merge_records",
    "model_facts",
    "new_run_id",
    "ood_facts",
    "part_record_path",
    "preprocessing_facts",
    "read_record",
    "record_path",
    "redact_argv",
    "redact_source",
    "screening_facts",
    "start_classifier_run",
    "utc_now",
    "versions",
    "write_record",
]

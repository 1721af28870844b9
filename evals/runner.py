"""Resumable evaluation runs: generate (or load) an output per sample, score it, log it, summarise.

Layout of a run folder:

    out_dir/results.jsonl   one JSON object per finished sample, appended (flush + fsync) as it finishes
    out_dir/images/         the output images the rows refer to (PNG, paths relative to out_dir)
    out_dir/summary.json    means over the finished rows, written atomically
    out_dir/report.md       with plots and example grids (see `report.py`)

Rerunning on the same folder skips the ids already in `results.jsonl`. A run killed mid-write leaves at
most one torn last line; it is dropped on the next start and that sample is done again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mmgen.segments import Segment, as_segments

from .format import EvalSample, Prediction, atomic_write_text, safe_name, segments_from_json, segments_to_json

logger = logging.getLogger(__name__)

__all__ = [
    "EvalRun",
    "ResultsLog",
    "Scorer",
    "outputs_from_rows",
    "run_eval",
    "score_predictions",
    "summarize",
]

# A scorer maps (sample, output) to named values: numbers are averaged in the summary, None means
# "not applicable", strings (e.g. an error record) and dicts are kept in the row only.
Scorer = Callable[[EvalSample, list[Segment]], Mapping[str, Any]]

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"


def _json_safe(value: Any) -> Any:
    """Non-finite floats become None, so every line is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class ResultsLog:
    """An append-only JSONL file of per-sample result rows, each a JSON object with a unique `id`.

    Opening it repairs a torn last line left by a killed writer (everything after the last newline is
    cut off, with a warning). Each `append` is one write of one line, flushed and fsynced before it
    returns, so a finished row survives a crash right after it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._rows: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            logger.warning(
                "%s: dropping a torn last line (%d bytes) left by an interrupted run",
                self.path,
                len(data) - end,
            )
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for n, line in enumerate(data[:end].split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{n}: corrupt result line (not JSON): {e}") from e
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                raise ValueError(f"{self.path}:{n}: a result row must be a JSON object with a string 'id'")
            if row["id"] in self._rows:
                raise ValueError(
                    f"{self.path}:{n}: id {row['id']!r} appears twice; was the folder written by two runs at once?"
                )
            self._rows[row["id"]] = row

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def done_ids(self) -> set[str]:
        """Ids with a row."""
        return set(self._rows)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """All rows, in file order."""
        return list(self._rows.values())

    def get(self, sample_id: str) -> dict[str, Any] | None:
        """The row of `sample_id`, or None."""
        return self._rows.get(sample_id)

    def append(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Append one row (it must have a new string `id`); returns the row as stored."""
        if not isinstance(row, Mapping) or not isinstance(row.get("id"), str):
            raise ValueError("a result row must be a mapping with a string 'id'")
        if row["id"] in self._rows:
            raise ValueError(f"{self.path}: id {row['id']!r} already has a row")
        line = json.dumps(_json_safe(dict(row)), ensure_ascii=False, allow_nan=False)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        stored = json.loads(line)
        self._rows[stored["id"]] = stored
        return stored

    def drop(self, ids: Iterable[str]) -> None:
        """Remove the rows of `ids` by rewriting the file atomically (used to retry failed samples)."""
        ids = set(ids)
        if not ids & self._rows.keys():
            return
        self._rows = {k: v for k, v in self._rows.items() if k not in ids}
        atomic_write_text(
            self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._rows.values())
        )


@dataclass
class EvalRun:
    """What a run leaves behind: its folder, the summary, and the rows of the requested samples."""

    out_dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


def _scorer_name(scorer: Scorer) -> str:
    return getattr(scorer, "name", None) or getattr(scorer, "__name__", None) or type(scorer).__name__


def _score(
    sample: EvalSample, output: list[Segment], scorers: Sequence[Scorer]
) -> tuple[dict[str, Any], dict[str, str]]:
    scores: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for scorer in scorers:
        name = _scorer_name(scorer)
        try:
            values = scorer(sample, output)
        except Exception as e:  # one scorer failing on one sample must not stop the run
            logger.warning("scorer %s failed on sample %r: %s", name, sample.id, e)
            errors[name] = f"{type(e).__name__}: {e}"
            continue
        if not isinstance(values, Mapping):
            raise TypeError(
                f"scorer {name} must return a mapping of metric names to values, got {type(values).__name__}"
            )
        clash = scores.keys() & values.keys()
        if clash:
            raise ValueError(
                f"scorer {name} reports metrics another scorer already reported: {sorted(clash)}"
            )
        scores.update(values)
    return scores, errors


def _as_output(value: Any) -> list[Segment]:
    """Accept a segment list, or anything with `.segments` (the pipeline's output dataclass)."""
    if hasattr(value, "segments"):
        value = value.segments
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"generate_fn must return a list of segments, got {type(value).__name__}")
    return as_segments(list(value))


def _check_samples(samples: Sequence[EvalSample]) -> None:
    seen: set[str] = set()
    for s in samples:
        if not isinstance(s, EvalSample):
            raise TypeError(f"samples must be EvalSample objects, got {type(s).__name__}")
        if s.id in seen:
            raise ValueError(f"duplicate sample id {s.id!r}")
        seen.add(s.id)


def _evaluate(
    samples: Sequence[EvalSample],
    produce: Callable[[EvalSample], list[Segment] | None],
    out_dir: str | os.PathLike,
    scorers: Sequence[Scorer],
    on_error: str,
    retry_errors: bool,
    title: str,
    report: bool,
    progress: bool,
    timed: bool,
) -> EvalRun:
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    samples = list(samples)
    _check_samples(samples)
    scorers = list(scorers)
    for scorer in scorers:
        if not callable(scorer):
            raise TypeError(
                f"scorers must be callables (sample, output) -> dict, got {type(scorer).__name__}"
            )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = ResultsLog(out_dir / RESULTS_FILE)
    if retry_errors:
        log.drop([r["id"] for r in log.rows if r.get("status") == "error"])
    todo = [s for s in samples if s.id not in log]
    if len(todo) < len(samples):
        logger.info(
            "resuming in %s: %d of %d samples already done", out_dir, len(samples) - len(todo), len(samples)
        )

    for sample in tqdm(todo, desc="evaluating", disable=not progress):
        start = time.perf_counter()
        row: dict[str, Any] = {"id": sample.id, "category": sample.category}
        try:
            output = produce(sample)
            if output is None:
                continue  # nothing to score (a prediction is missing); not recorded, so a later run can fill it
            seconds = time.perf_counter() - start
            items = segments_to_json(output, out_dir, f"images/{safe_name(sample.id)}_o")
        except Exception as e:
            if on_error == "raise":
                raise
            logger.warning("sample %r failed: %s", sample.id, e)
            log.append(
                {**row, "status": "error", "error": f"{type(e).__name__}: {e}", "output": [], "scores": {}}
            )
            continue
        scores, scorer_errors = _score(sample, output, scorers)
        row["status"] = "ok"
        row["output"] = items
        row["scores"] = scores
        if scorer_errors:
            row["scorer_errors"] = scorer_errors
        if timed:
            row["seconds"] = round(seconds, 4)
        log.append(row)

    rows = [log.get(s.id) for s in samples if s.id in log]
    summary = summarize(rows, n_samples=len(samples))
    atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False))
    if report:
        from .report import write_report

        write_report(out_dir, summary, rows, title)
    logger.info(
        "evaluation in %s: %d/%d samples done, %d errors",
        out_dir,
        summary["n_done"],
        len(samples),
        summary["n_errors"],
    )
    return EvalRun(out_dir=out_dir, summary=summary, rows=rows)


def run_eval(
    samples: Sequence[EvalSample],
    generate_fn: Callable[[list[Segment]], Any],
    out_dir: str | os.PathLike,
    scorers: Sequence[Scorer] = (),
    *,
    on_error: str = "raise",
    retry_errors: bool = False,
    title: str = "Interleaved evaluation",
    report: bool = True,
    progress: bool = True,
) -> EvalRun:
    """Generate an output for every sample not yet in `out_dir/results.jsonl`, score it and log it.

    `generate_fn(query)` returns the output segments (or an object with `.segments`). With
    `on_error="raise"` an exception from it stops the run (rows so far stay valid, a rerun resumes);
    with `"record"` the sample gets an error row and the run goes on. `retry_errors` drops earlier
    error rows first so those samples are tried again.
    """
    if not callable(generate_fn):
        raise TypeError("generate_fn must be callable: generate_fn(query: list[Segment]) -> list[Segment]")

    def produce(sample: EvalSample) -> list[Segment]:
        return _as_output(generate_fn(list(sample.query)))

    return _evaluate(
        samples, produce, out_dir, scorers, on_error, retry_errors, title, report, progress, timed=True
    )


def score_predictions(
    samples: Sequence[EvalSample],
    predictions: Sequence[Prediction],
    out_dir: str | os.PathLike,
    scorers: Sequence[Scorer] = (),
    *,
    on_error: str = "record",
    title: str = "Interleaved evaluation",
    report: bool = True,
    progress: bool = True,
) -> EvalRun:
    """Score existing outputs (e.g. read with an adapter's `read_predictions`) instead of generating.
    Samples without a prediction are left out and counted in the summary as not done."""
    by_id: dict[str, Prediction] = {}
    known = {s.id for s in samples}
    for p in predictions:
        if not isinstance(p, Prediction):
            raise TypeError(f"predictions must be Prediction objects, got {type(p).__name__}")
        if p.id not in known:
            raise ValueError(f"prediction for unknown sample id {p.id!r}")
        by_id[p.id] = p
    missing = len(known - by_id.keys())
    if missing:
        logger.warning("%d of %d samples have no prediction and are skipped", missing, len(known))

    def produce(sample: EvalSample) -> list[Segment] | None:
        pred = by_id.get(sample.id)
        return None if pred is None else list(pred.output)

    return _evaluate(
        samples, produce, out_dir, scorers, on_error, False, title, report, progress, timed=False
    )


def outputs_from_rows(rows: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike) -> list[Prediction]:
    """Predictions rebuilt from result rows (images loaded from `out_dir`); error rows are skipped."""
    return [
        Prediction(r["id"], segments_from_json(r.get("output", []), out_dir, r["id"], "output"))
        for r in rows
        if r.get("status") == "ok"
    ]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and (isinstance(value, bool) or math.isfinite(value))


def _means(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    values: dict[str, list[float]] = {}
    for row in rows:
        for key, value in (row.get("scores") or {}).items():
            if _is_number(value):
                values.setdefault(key, []).append(float(value))
    return {key: {"mean": sum(v) / len(v), "n": len(v)} for key, v in values.items()}


def summarize(rows: Sequence[Mapping[str, Any]], n_samples: int | None = None) -> dict[str, Any]:
    """Means of every numeric score over the successful rows, overall and per category; booleans
    count as 0/1 (so `structure_match` becomes a rate) and None values are left out."""
    ok = [r for r in rows if r.get("status") == "ok"]
    summary: dict[str, Any] = {
        "n_samples": len(rows) if n_samples is None else n_samples,
        "n_done": len(rows),
        "n_ok": len(ok),
        "n_errors": sum(1 for r in rows if r.get("status") == "error"),
        "metrics": _means(ok),
    }
    categories = sorted({r.get("category") for r in ok if r.get("category") is not None})
    if categories:
        summary["by_category"] = {
            c: {
                "n": sum(1 for r in ok if r.get("category") == c),
                **{k: v["mean"] for k, v in _means([r for r in ok if r.get("category") == c]).items()},
            }
            for c in categories
        }
    failures: dict[str, int] = {}
    for r in ok:
        for name in r.get("scorer_errors") or {}:
            failures[name] = failures.get(name, 0) + 1
        for key, value in (r.get("scores") or {}).items():
            if key.endswith("error") and isinstance(value, str):
                failures[key] = failures.get(key, 0) + 1
    if failures:
        summary["scoring_failures"] = failures
    seconds = [r["seconds"] for r in ok if _is_number(r.get("seconds"))]
    if seconds:
        summary["mean_seconds"] = sum(seconds) / len(seconds)
    return summary

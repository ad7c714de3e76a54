"""A run's metrics.json, read the one way the suite and the reports both rely on.

A run is done only when its record is a mapping that says ``status: ok`` and holds its metrics.
Anything else on disk (a half-copied file, ``[]``, ``{"status": "ok"}`` with no metrics) is an
unreadable run: the suite runs it again and the reports count it as failed, never as a trial.
"""
from __future__ import annotations

import json
from pathlib import Path


def read_record(path) -> dict | None:
    """The metrics.json at ``path``; None when there is none; a failed record saying why when it
    cannot stand for a finished run."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return _unreadable(path, f"not JSON ({type(e).__name__})")
    if not isinstance(record, dict):
        return _unreadable(path, f"a JSON {type(record).__name__}, not a mapping")
    metrics = record.get("metrics")
    if record.get("status") == "ok" and not (isinstance(metrics, dict) and metrics):
        return {**record, **_unreadable(path, "says ok but holds no metrics")}
    return record


def _unreadable(path: Path, why: str) -> dict:
    return {"status": "failed", "error": f"{path}: unreadable metrics.json: {why}", "metrics": {}}

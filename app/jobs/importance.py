"""``GET /v1/jobs/{id}/importance``: every neuron's value and bounds per layer, in index order.

``/neurons`` ranks; a structured-pruning tool's importance criterion wants the
opposite view: one array per layer whose position ``i`` is channel ``i``. This
is that view, read from the same estimates: the stored neurons of a finished
job, the live snapshot of a running one (so the report page can chart layers
while a job runs).
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.bus import Bus
from app.core.problems import Problem

from .models import Job, JobNeuron
from .states import ACTIVE

log = logging.getLogger(__name__)

FIELDS = ("value", "lower", "upper", "status")


def importance(session: Session, bus: Bus, job: Job) -> dict:
    """``{"layers": {name: {"value": […], "lower": […], "upper": […], "status": […]}}}``, layers in the model's
    order where the job's summary records it; a 409 problem while the job has no estimates."""
    rows = _live_neurons(bus, job) if job.state in ACTIVE else _stored_neurons(session, job)
    if not rows:
        raise Problem(
            409,
            "not-ready",
            "No estimates yet",
            f"Job {job.id} is {job.state} and has no estimates"
            + (
                "; they appear once its worker has published the first round: retry in a few seconds."
                if job.state in ACTIVE
                else " (a failed job stores none)."
            ),
        )
    by_layer: dict[str, list[dict]] = {}
    for row in rows:
        by_layer.setdefault(row["layer"], []).append(row)
    layers = {}
    for name in _layer_order(job, by_layer):
        neurons = by_layer[name]
        size = max(n["index"] for n in neurons) + 1
        arrays: dict[str, list] = {field: [None] * size for field in FIELDS}
        for n in neurons:
            for field in FIELDS:
                arrays[field][n["index"]] = n[field]
        layers[name] = arrays
    return {"layers": layers}


def _stored_neurons(session: Session, job: Job) -> list[dict]:
    query = select(JobNeuron.layer, JobNeuron.index, *(getattr(JobNeuron, f) for f in FIELDS)).where(
        JobNeuron.job_id == job.id
    )
    return [row._asdict() for row in session.execute(query)]


def _live_neurons(bus: Bus, job: Job) -> list[dict]:
    """The running job's snapshot; none when the bus is unreachable (nothing is stored before the job ends)."""
    try:
        live = bus.get_live(job.id)
    except Exception as exc:  # Redis down must not turn reads into 500s
        log.warning("live state of %s unavailable: %s", job.id, exc)
        return []
    return live["neurons"] if live is not None else []


def _layer_order(job: Job, by_layer: dict[str, list[dict]]) -> list[str]:
    """The model's layer order from the summary (a finished job), else by name: JSON readers may keep key order."""
    recorded = [layer["name"] for layer in ((job.summary or {}).get("game") or {}).get("layers", [])]
    known = [name for name in recorded if name in by_layer]
    return known + sorted(set(by_layer) - set(known))

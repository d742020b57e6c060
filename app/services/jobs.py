"""Job creation, lookup, cancellation, reruns, logs and reports, on top of `workers.db` and `workers.submit`.

Nothing here imports torch or transformers: configs are checked with `ml.config` (pydantic only)
and the work is queued for the Celery workers.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

from kombu.exceptions import OperationalError as BrokerError
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from app.auth import Principal
from app.errors import Conflict, InvalidInput, NotFound, QueueFull, broker_unavailable
from app.schemas.jobs import JobError, JobProgress, JobPublic, JobStage
from app.services.references import ReferenceResolver, ResolvedConfig
from workers.db import Job, JobReference, JobState, JobStore, JobType
from workers.settings import Settings
from workers.submit import FAIL_FAST_RETRY_POLICY, cancel_job, submit_job
from workers.joblog import LOG_FILE
from workers.validation import JobConfigError, validate_job_config

logger = logging.getLogger(__name__)

REPORT_FILES = {"json": "json", "markdown": "markdown", "accuracy": "accuracy_plot", "drift": "drift_plot"}
MAX_IDEMPOTENCY_KEY_CHARS = 200


def job_not_found(job_id: str) -> NotFound:
    return NotFound(
        f"job {job_id} not found",
        code="job_not_found",
        field="job_id",
        value=job_id,
        fix="List your jobs with GET /v1/jobs.",
    )


def get_visible_job(store: JobStore, principal: Principal, job_id: str) -> Job:
    """Return the job if the caller may see it: its own jobs, or every job for an admin key."""
    from workers.db import JobNotFound

    try:
        job = store.get_job(job_id)
    except JobNotFound:
        raise job_not_found(job_id) from None
    # Another key's job returns 404, not 403, so ids of other keys' jobs are not confirmed.
    if not principal.is_admin and job.owner != principal.key_id:
        raise job_not_found(job_id)
    return job


def references_of(store: JobStore, job_ids: list[str]) -> dict[str, dict[str, list[str]]]:
    """Return {job id: {kind: [ref ids]}} for these jobs."""
    refs: dict[str, dict[str, list[str]]] = {job_id: {} for job_id in job_ids}
    if not job_ids:
        return refs
    with store.session() as session:
        for row in session.scalars(select(JobReference).where(JobReference.job_id.in_(job_ids))):
            refs[row.job_id].setdefault(row.kind, []).append(row.ref_id)
    return refs


def progress_of(job: Job) -> JobProgress:
    fraction = None
    if job.progress_total:
        fraction = min(1.0, max(0.0, (job.progress_step or 0) / job.progress_total))
    return JobProgress(
        stage=job.progress_stage,
        step=job.progress_step,
        total=job.progress_total,
        fraction=fraction,
        metrics=job.progress_metrics or {},
        updated_at=job.progress_at,
    )


def error_of(job: Job) -> JobError | None:
    if not job.error_type:
        return None
    return JobError(type=job.error_type, message=job.error_message, where=job.error_where)


def to_public(job: Job, refs: dict[str, list[str]] | None = None) -> JobPublic:
    refs = refs or {}
    return JobPublic(
        id=job.id,
        type=job.type,
        state=job.state,
        config=job.config,
        owner=job.owner,
        parent_id=job.parent_id,
        stage_name=job.stage_name,
        progress=progress_of(job),
        error=error_of(job),
        stages=[JobStage(id=c.id, stage_name=c.stage_name, type=c.type, state=c.state) for c in job.children],
        outputs=job.outputs,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        datasets=sorted(refs.get("dataset", [])),
        models=sorted(refs.get("model", [])),
        rerun_of=(refs.get("rerun_of") or [None])[0],
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def public_job(store: JobStore, job: Job) -> JobPublic:
    return to_public(job, references_of(store, [job.id])[job.id])


# --- Creation -------------------------------------------------------------------------------------


# NOTE: serialises admissions within one API process only. When several API replicas admit at
# the same moment, the queue can exceed its limit by up to one job per additional replica.
_ADMISSION_LOCK = threading.Lock()


def _check_queue(store: JobStore, settings: Settings) -> None:
    with store.session() as session:
        queued = session.scalar(
            select(func.count()).select_from(Job).where(Job.state == JobState.QUEUED.value, Job.parent_id.is_(None))
        ) or 0
    if queued >= settings.max_queued_jobs:
        raise QueueFull(
            f"the job queue is full: {queued} jobs are queued and the limit is {settings.max_queued_jobs} (W2S_MAX_QUEUED_JOBS)",
            code="queue_full",
            value=queued,
            fix="Retry after some queued jobs have started or finished.",
            headers={"Retry-After": "60"},
        )


def _validate(job_type: str, resolved: ResolvedConfig, settings: Settings) -> dict[str, Any]:
    # The resolver already enforced the allowed folders. Uploads and trained models lie under the
    # artifact root, outside those folders, so the worker check runs for existence and schema only.
    relaxed = settings.model_copy(update={"data_dir": None, "model_dir": None})
    try:
        parsed = validate_job_config(job_type, resolved.config, relaxed, check_paths=True)
    except JobConfigError as error:
        first = error.errors[0]
        field_name = "type" if first.field == "type" else f"config.{first.field}"
        raise InvalidInput(
            f"invalid {job_type} config: " + "; ".join(f"{e.field}: {e.message}" for e in error.errors),
            code="invalid_config",
            field=field_name,
            value=_value_at(resolved.config, first.field),
            fix="Correct the field and send the request again; ml/config.py lists every field with its range.",
        ) from None
    _check_path_names(parsed)
    return parsed.model_dump(mode="json")


# Arm names become folder names of the pipeline's stages (<job folder>/arms/<name>), so they may not
# contain path separators or start with a dot.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _check_path_names(parsed: Any) -> None:
    for index, arm in enumerate(getattr(parsed, "arms", None) or []):
        if not SAFE_NAME.match(arm.name):
            raise InvalidInput(
                f"config.arms.{index}.name: {arm.name!r} is not a valid arm name; it becomes a folder name, "
                "so it needs 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit",
                code="invalid_name",
                field=f"config.arms.{index}.name",
                value=arm.name,
                fix="Rename the arm, e.g. 'anchored' or 'anchored-0.1'.",
            )


def _value_at(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if not isinstance(node, (dict, list)) else None


def _existing_for_key(store: JobStore, owner: str, key: str) -> Job | None:
    with store.session() as session:
        job_id = session.scalar(select(Job.id).where(Job.owner == owner, Job.idempotency_key == key))
    return store.get_job(job_id) if job_id else None


def _replay(store: JobStore, existing: Job, job_type: str, config: dict[str, Any], key: str) -> Job:
    if existing.type != job_type or existing.config != config:
        raise Conflict(
            f"Idempotency-Key {key!r} was already used for job {existing.id} with a different type or config",
            code="idempotency_key_reused",
            field="Idempotency-Key",
            value=key,
            fix="Use a new Idempotency-Key for a different job.",
        )
    return existing


def create_and_submit(
    store: JobStore,
    settings: Settings,
    celery: Any,
    principal: Principal,
    job_type: str,
    config: dict[str, Any],
    idempotency_key: str | None = None,
    rerun_of: str | None = None,
    resolve: bool = True,
) -> tuple[Job, bool]:
    """Resolve, validate, insert and queue a job; return it and whether it is new (False for a replay)."""
    if idempotency_key is not None and not (0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS):
        raise InvalidInput(
            f"Idempotency-Key must have 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters, got {len(idempotency_key)}",
            code="invalid_idempotency_key",
            field="Idempotency-Key",
            value=idempotency_key,
            fix="Send a shorter key, such as a UUID.",
        )
    # A rerun's stored config already contains the server paths its first request resolved.
    resolved = ReferenceResolver(store, settings).resolve(job_type, config) if resolve else ResolvedConfig(config=config)
    config_json = _validate(job_type, resolved, settings)

    if idempotency_key is not None:
        existing = _existing_for_key(store, principal.key_id, idempotency_key)
        if existing is not None:
            return _replay(store, existing, job_type, config_json, idempotency_key), False
    try:
        # The count and the insert must not interleave with another request's, or a burst admits
        # more jobs than the limit (seen: 116 of 200 against a limit of 100).
        with _ADMISSION_LOCK:
            _check_queue(store, settings)
            job = store.create_job(job_type, config_json, owner=principal.key_id, idempotency_key=idempotency_key, check_paths=False)
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key inserted its job first.
        existing = _existing_for_key(store, principal.key_id, idempotency_key or "")
        if existing is None:
            raise
        return _replay(store, existing, job_type, config_json, idempotency_key or ""), False

    with store.session() as session:
        for dataset_id in resolved.dataset_ids:
            session.add(JobReference(job_id=job.id, kind="dataset", ref_id=dataset_id))
        for model_id in resolved.model_ids:
            session.add(JobReference(job_id=job.id, kind="model", ref_id=model_id))
        if rerun_of:
            session.add(JobReference(job_id=job.id, kind="rerun_of", ref_id=rerun_of))

    try:
        job = submit_job(job.id, store=store, app=celery, retry_policy=FAIL_FAST_RETRY_POLICY)
    except (BrokerError, OSError) as error:
        # Without a message no worker would ever run the row, so it goes; a retry with the same
        # Idempotency-Key then creates the job afresh.
        with store.session() as session:
            session.execute(delete(Job).where(Job.id == job.id))
        url = maybe_sanitize_url(celery.conf.broker_url)
        logger.error("job %s not queued: broker %s unreachable: %s", job.id, url, error)
        raise broker_unavailable(error, url) from None
    logger.info("job %s (%s) created by key %s and queued", job.id, job_type, principal.key_id)
    return job, True


def list_visible_jobs(
    store: JobStore,
    principal: Principal,
    *,
    states: list[str] | None,
    job_type: str | None,
    owner: str | None,
    include_stages: bool,
    limit: int,
    offset: int,
):
    if owner is not None and not principal.is_admin and owner != principal.key_id:
        raise InvalidInput(
            f"owner {owner!r}: only an admin key may list another key's jobs",
            code="owner_not_allowed",
            field="owner",
            value=owner,
            fix="Leave owner out to list your own jobs.",
        )
    return store.list_jobs(
        state=states or None,
        job_type=job_type,
        owner=owner if principal.is_admin else principal.key_id,
        top_level=not include_stages,
        limit=limit,
        offset=offset,
    )


# --- Cancel and rerun ------------------------------------------------------------------------------


def cancel(store: JobStore, celery: Any, principal: Principal, job_id: str) -> Job:
    job = get_visible_job(store, principal, job_id)
    if job.terminal:
        raise Conflict(
            f"job {job_id} is already {job.state} and cannot be cancelled",
            code="job_finished",
            field="job_id",
            value=job_id,
            fix="Only queued or running jobs can be cancelled.",
        )
    try:
        job = cancel_job(job_id, store=store, app=celery)
    except (BrokerError, OSError) as error:
        # The cancel flag is set before the broadcast, so the job still stops at its next check.
        logger.warning("job %s: cancel flag set, but revoking its messages failed: %s", job_id, error)
        job = store.get_job(job_id)
    logger.info("job %s cancel requested by key %s; state %s", job_id, principal.key_id, job.state)
    return job


def rerun(store: JobStore, settings: Settings, celery: Any, principal: Principal, job_id: str) -> Job:
    job = get_visible_job(store, principal, job_id)
    if job.parent_id:
        raise Conflict(
            f"job {job_id} is stage {job.stage_name} of pipeline {job.parent_id}; stages are rerun with their pipeline",
            code="job_is_stage",
            field="job_id",
            value=job_id,
            fix=f"Rerun the pipeline: POST /v1/jobs/{job.parent_id}/rerun.",
        )
    if job.state not in (JobState.FAILED.value, JobState.CANCELLED.value):
        raise Conflict(
            f"job {job_id} is {job.state}; only failed or cancelled jobs can be rerun",
            code="job_not_rerunnable",
            field="job_id",
            value=job_id,
            fix="Wait for the job to finish, or create a new job with POST /v1/jobs.",
        )
    owner = Principal(key_id=job.owner or principal.key_id, name=principal.name, scopes=principal.scopes)
    new_job, _ = create_and_submit(store, settings, celery, owner, job.type, job.config, rerun_of=job.id, resolve=False)
    refs = references_of(store, [job.id])[job.id]
    with store.session() as session:
        for kind in ("dataset", "model"):
            for ref_id in refs.get(kind, []):
                if session.get(JobReference, (new_job.id, kind, ref_id)) is None:
                    session.add(JobReference(job_id=new_job.id, kind=kind, ref_id=ref_id))
    return store.get_job(new_job.id)


# --- Logs and reports ------------------------------------------------------------------------------


def log_lines(store: JobStore, job: Job) -> list[str]:
    """Read the job's log file; a pipeline's lines are its stages' lines, prefixed with the stage name."""
    if job.type == JobType.PIPELINE.value and job.children:
        lines: list[str] = []
        for child in job.children:
            lines.extend(f"[{child.stage_name}] {line}" for line in _read_log(child))
        return lines
    return _read_log(job)


def _read_log(job: Job) -> list[str]:
    if not job.out_dir:
        return []
    path = Path(job.out_dir) / LOG_FILE
    if not path.is_file():
        return []
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def report_path(settings: Settings, job: Job, kind: str) -> Path:
    """Return the path of a report file of a succeeded pipeline or evaluate job."""
    if job.type not in (JobType.PIPELINE.value, JobType.EVALUATE.value):
        raise NotFound(
            f"job {job.id} is a {job.type} job, which has no report",
            code="report_not_found",
            field="job_id",
            value=job.id,
            fix="Reports are written by pipeline and evaluate jobs.",
        )
    if job.state != JobState.SUCCEEDED.value:
        raise Conflict(
            f"job {job.id} is {job.state}; its report exists once it has succeeded",
            code="report_not_ready",
            field="job_id",
            value=job.id,
            fix=f"Wait for the job to succeed (GET /v1/jobs/{job.id}/events streams its progress).",
        )
    outputs = job.outputs or {}
    files = outputs.get("report", {})
    if job.type == JobType.PIPELINE.value:
        files = files.get("report", {}) if isinstance(files, dict) else {}
    path = Path(files.get(REPORT_FILES[kind], "")) if isinstance(files, dict) and files.get(REPORT_FILES[kind]) else None
    if path is None or not path.is_file() or not path.resolve().is_relative_to(settings.resolved_artifact_root):
        raise NotFound(
            f"report file {kind!r} of job {job.id} not found in its outputs",
            code="report_not_found",
            field="job_id",
            value=job.id,
            fix="The job's output folder may have been deleted; rerun the job.",
        )
    return path

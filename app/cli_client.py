"""`w2s submit`, `w2s jobs`, `w2s watch`, `w2s report` and `w2s datasets`: the HTTP API from the shell.

The API address and key come from --api-url / --api-key or W2S_API_URL / W2S_API_KEY. `w2s keys`
is an operator command: it creates, lists and revokes API keys in the job database directly
(W2S_DATABASE_URL), so it runs on the server, not through the API.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_API_URL = "http://127.0.0.1:8000"
# Seconds to wait for a response; uploads and report downloads can take longer than queries.
REQUEST_TIMEOUT_S = 300.0
BAR_WIDTH = 30


class ApiError(Exception):
    """The API returned an error body; the exception message contains its code, message and fix."""


def _client(args: argparse.Namespace):
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.api_url.rstrip("/"), headers=headers, timeout=REQUEST_TIMEOUT_S)


def _check(response) -> Any:
    if response.status_code < 400:
        content_type = response.headers.get("content-type", "")
        return response.json() if content_type.startswith("application/json") else response
    try:
        error = response.json()["error"]
        text = f"{response.status_code} {error['code']}: {error['message']}"
        if error.get("fix"):
            text += f"\n  fix: {error['fix']}"
    except (ValueError, KeyError, TypeError):
        text = f"{response.status_code}: {response.text[:500]}"
    raise ApiError(text)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _load_config(path: str) -> dict[str, Any]:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


# --- Commands --------------------------------------------------------------------------------------


def _submit(args: argparse.Namespace) -> int:
    body = {"type": args.type, "config": _load_config(args.config)}
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    with _client(args) as client:
        job = _check(client.post("/v1/jobs", json=body, headers=headers))
    print(f"job {job['id']} ({job['type']}) {job['state']}")
    if args.watch:
        return _watch_job(args, job["id"])
    return 0


def _jobs_list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit, "offset": args.offset}
    if args.state:
        params["state"] = args.state
    if args.type:
        params["type"] = args.type
    with _client(args) as client:
        page = _check(client.get("/v1/jobs", params=params))
    if args.json:
        _print_json(page)
        return 0
    print(f"{'id':36}  {'type':10}  {'state':9}  {'progress':24}  created")
    for job in page["items"]:
        progress = job["progress"]
        where = f"{progress['stage'] or '-'} {progress['step'] or 0}/{progress['total'] or 0}" if progress["stage"] else "-"
        print(f"{job['id']:36}  {job['type']:10}  {job['state']:9}  {where[:24]:24}  {job['created_at']}")
    print(f"{len(page['items'])} of {page['total']} jobs")
    return 0


def _jobs_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(_check(client.get(f"/v1/jobs/{args.job_id}")))
    return 0


def _jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = _check(client.post(f"/v1/jobs/{args.job_id}/cancel"))
    print(f"job {job['id']} {job['state']} (cancel requested)")
    return 0


def _jobs_rerun(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = _check(client.post(f"/v1/jobs/{args.job_id}/rerun"))
    print(f"job {job['id']} queued as a rerun of {args.job_id}")
    return 0


def _jobs_logs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = _check(client.get(f"/v1/jobs/{args.job_id}/logs", params={"offset": args.offset, "limit": args.limit}))
    for line in page["lines"]:
        print(line)
    if page["next_offset"] < page["total"]:
        print(f"... {page['total'] - page['next_offset']} more lines: --offset {page['next_offset']}", file=sys.stderr)
    return 0


def _progress_line(event: dict[str, Any]) -> str:
    progress = event["progress"]
    fraction = progress.get("fraction") or 0.0
    filled = int(round(fraction * BAR_WIDTH))
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    step = f"{progress.get('step') or 0}/{progress.get('total') or 0}"
    loss = progress.get("metrics", {}).get("loss")
    metric = f" loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
    return f"[{bar}] {fraction * 100:5.1f}% {progress.get('stage') or '':28.28} {step}{metric}"


def _watch_job(args: argparse.Namespace, job_id: str) -> int:
    import httpx

    interactive = sys.stderr.isatty()
    final: dict[str, Any] | None = None
    name = None
    with _client(args) as client:
        with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=httpx.Timeout(REQUEST_TIMEOUT_S, read=None)) as response:
            if response.status_code >= 400:
                response.read()
                _check(response)
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                    continue
                if not line.startswith("data: "):
                    continue
                event = json.loads(line.removeprefix("data: "))
                if name == "progress":
                    text = _progress_line(event)
                    print(("\r" + text) if interactive else text, end="" if interactive else "\n", file=sys.stderr, flush=True)
                elif name == "state" and interactive:
                    print(f"\rstate: {event['state']}".ljust(80), file=sys.stderr)
                elif name == "state":
                    print(f"state: {event['state']}", file=sys.stderr)
                elif name == "end":
                    final = event
    if interactive:
        print(file=sys.stderr)
    if final is None:
        raise ApiError(f"the event stream of job {job_id} closed before the job finished; run `w2s watch {job_id}` again")
    print(f"job {job_id} {final['state']}")
    if final.get("error"):
        error = final["error"]
        print(f"  {error['type']}: {error['message']} ({error.get('where')})")
    return 0 if final["state"] == "succeeded" else 1


def _watch(args: argparse.Namespace) -> int:
    return _watch_job(args, args.job_id)


def _report(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.out is None:
            response = _check(client.get(f"/v1/jobs/{args.job_id}/report", params={"format": args.format}))
            if args.format == "json":
                _print_json(response)
            else:
                print(response.text)
            return 0
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = _check(client.get(f"/v1/jobs/{args.job_id}/report"))
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        markdown = _check(client.get(f"/v1/jobs/{args.job_id}/report", params={"format": "markdown"}))
        (out / "report.md").write_text(markdown.text, encoding="utf-8")
        for plot in ("accuracy", "drift"):
            image = _check(client.get(f"/v1/jobs/{args.job_id}/report/plots/{plot}"))
            (out / f"{plot}.png").write_bytes(image.content)
    print(f"report of job {args.job_id} written to {out}: report.json, report.md, accuracy.png, drift.png")
    return 0


def _datasets_upload(args: argparse.Namespace) -> int:
    path = Path(args.file)
    with _client(args) as client, path.open("rb") as file:
        dataset = _check(client.post("/v1/datasets", files={"file": (path.name, file)}, data={"format": args.format}))
    print(
        f"dataset {dataset['id']}: {dataset['format']} format, {dataset['rows']} rows, {dataset['pairs']} pairs, "
        f"{dataset['skipped']} skipped\nuse it in a job config as: {dataset['reference']}"
    )
    return 0


def _datasets_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = _check(client.get("/v1/datasets", params={"limit": args.limit}))
    for dataset in page["items"]:
        print(f"{dataset['id'][:16]}  {dataset['filename']:32.32}  {dataset['format']:6}  {dataset['pairs']:>8} pairs  {dataset['created_at']}")
    print(f"{len(page['items'])} of {page['total']} datasets")
    return 0


def _keys_store():
    from workers.db import default_store

    return default_store()


def _keys_create(args: argparse.Namespace) -> int:
    from app.auth import create_api_key, parse_scopes

    row, key = create_api_key(_keys_store(), args.name, parse_scopes(args.scopes))
    print(f"API key {row.id} ({row.name}, scopes {','.join(row.scopes)}) created. It is shown only once:")
    print(key)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from app.auth import list_api_keys

    for row in list_api_keys(_keys_store(), include_revoked=args.all):
        revoked = f"  revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else ""
        print(f"{row.id}  {row.prefix}...  {row.name:20.20}  {','.join(row.scopes):20}  created {row.created_at:%Y-%m-%d}{revoked}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from app.auth import revoke_api_key

    row = revoke_api_key(_keys_store(), args.key_id)
    print(f"API key {row.id} ({row.name}) revoked")
    return 0


# --- Parser ----------------------------------------------------------------------------------------


def _run(handler):
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ApiError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except OSError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except Exception as error:
            # httpx is imported lazily, so its errors are matched by name here.
            if type(error).__module__.startswith("httpx"):
                print(f"error: cannot reach the API at {args.api_url}: {error}", file=sys.stderr)
                return 2
            raise

    return run


def _connection_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--api-url", default=os.environ.get("W2S_API_URL", DEFAULT_API_URL), help=f"API base URL (env W2S_API_URL, default {DEFAULT_API_URL}).")
    parent.add_argument("--api-key", default=os.environ.get("W2S_API_KEY"), help="Bearer API key (env W2S_API_KEY).")
    return parent


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the API client commands and `w2s keys` to the `w2s` parser."""
    connection = _connection_options()

    submit = subparsers.add_parser("submit", parents=[connection], help="Queue a job through the API.")
    submit.add_argument("type", choices=["pipeline", "weak_label", "train", "evaluate", "score_dataset"], help="Job type.")
    submit.add_argument("config", help="YAML or JSON config file; dataset fields may be dataset:<id>, model fields model:<id or alias>.")
    submit.add_argument("--idempotency-key", help="Submitting again with the same key returns the same job.")
    submit.add_argument("--watch", action="store_true", help="Follow the job's progress until it ends.")
    submit.set_defaults(handler=_run(_submit))

    # `w2s jobs` alone lists jobs, like `w2s jobs list`.
    jobs = subparsers.add_parser("jobs", parents=[connection], help="List, show, cancel and rerun jobs, and read their logs.")
    jobs_sub = jobs.add_subparsers(dest="jobs_command")
    for parser in (jobs, jobs_sub.add_parser("list", parents=[connection], help="List your jobs, newest first.")):
        parser.add_argument("--state", action="append", choices=["queued", "running", "succeeded", "failed", "cancelled"], help="Only jobs in this state (repeatable).")
        parser.add_argument("--type", choices=["pipeline", "weak_label", "train", "evaluate", "score_dataset"], help="Only jobs of this type.")
        parser.add_argument("--limit", type=int, default=20, help="Jobs per page (default 20).")
        parser.add_argument("--offset", type=int, default=0, help="Jobs to skip (default 0).")
        parser.add_argument("--json", action="store_true", help="Print the raw JSON page.")
        parser.set_defaults(handler=_run(_jobs_list))
    for name, handler, help_text in (
        ("show", _jobs_show, "Print a job as JSON."),
        ("cancel", _jobs_cancel, "Cancel a queued or running job."),
        ("rerun", _jobs_rerun, "Queue a failed or cancelled job again with the same config."),
    ):
        parser = jobs_sub.add_parser(name, parents=[connection], help=help_text)
        parser.add_argument("job_id")
        parser.set_defaults(handler=_run(handler))
    logs = jobs_sub.add_parser("logs", parents=[connection], help="Print a job's log lines.")
    logs.add_argument("job_id")
    logs.add_argument("--offset", type=int, default=0, help="First line (default 0).")
    logs.add_argument("--limit", type=int, default=1000, help="Lines to print (default 1000).")
    logs.set_defaults(handler=_run(_jobs_logs))

    watch = subparsers.add_parser("watch", parents=[connection], help="Show a job's progress bar until it ends; exit 0 if it succeeded.")
    watch.add_argument("job_id")
    watch.set_defaults(handler=_run(_watch))

    report = subparsers.add_parser("report", parents=[connection], help="Print or download the report of a succeeded job.")
    report.add_argument("job_id")
    report.add_argument("--format", choices=["markdown", "json"], default="markdown", help="Printed format (default markdown).")
    report.add_argument("--out", help="Folder to write report.json, report.md and the PNG plots to, instead of printing.")
    report.set_defaults(handler=_run(_report))

    datasets = subparsers.add_parser("datasets", help="Upload and list datasets.")
    datasets_sub = datasets.add_subparsers(dest="datasets_command", required=True)
    upload = datasets_sub.add_parser("upload", parents=[connection], help="Upload and validate a preference file.")
    upload.add_argument("file", help="JSONL, JSON or Parquet file, optionally .gz.")
    upload.add_argument("--format", choices=["auto", "trl", "hh", "ranked"], default="auto", help="Row format (default: detected).")
    upload.set_defaults(handler=_run(_datasets_upload))
    listing = datasets_sub.add_parser("list", parents=[connection], help="List uploaded datasets.")
    listing.add_argument("--limit", type=int, default=50, help="Datasets to list (default 50).")
    listing.set_defaults(handler=_run(_datasets_list))

    keys = subparsers.add_parser("keys", help="Operator: create, list and revoke API keys in the job database.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="Create a key and print it once.")
    create.add_argument("--name", required=True, help="Who or what uses the key, e.g. 'ci' or 'alice'.")
    create.add_argument("--scopes", default="jobs", help="Comma-separated scopes: jobs, models, score, admin (default jobs).")
    create.set_defaults(handler=_keys_create)
    key_list = keys_sub.add_parser("list", help="List keys (never the keys themselves).")
    key_list.add_argument("--all", action="store_true", help="Include revoked keys.")
    key_list.set_defaults(handler=_keys_list)
    revoke = keys_sub.add_parser("revoke", help="Revoke a key by id or shown prefix.")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_keys_revoke)

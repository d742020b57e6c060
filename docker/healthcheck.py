"""Exit 0 when an HTTP health endpoint returns a 2xx status, 1 otherwise.

Used by the container healthchecks, because the slim Python images ship neither curl nor wget:

    python /opt/w2s/healthcheck.py http://127.0.0.1:8000/v1/health/live
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def check(url: str, timeout_s: float) -> tuple[bool, str]:
    """Request `url` once and return whether the status was 2xx, with a one-line reason."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= response.status < 300, f"{url} returned {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url} returned {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"{url} failed: {reason}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Exit 0 when the URL returns a 2xx status, 1 otherwise.")
    parser.add_argument("url", help="Health endpoint, e.g. http://127.0.0.1:8000/v1/health/live.")
    parser.add_argument("--timeout", type=float, default=5.0, help="Seconds to wait for the response (default 5).")
    args = parser.parse_args(argv)

    healthy, reason = check(args.url, args.timeout)
    print(reason)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())

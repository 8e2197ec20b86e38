"""Container healthcheck: exit 0 when ``GET http://127.0.0.1:$CLASSMEANS_PORT<path>`` answers 200, else 1.

Standard library only (the slim image has no curl). Proxies from the environment are ignored: the probe only
ever talks to the loopback address. Usage: ``python healthcheck.py [/v2/health/ready]``.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/v2/health/ready"
    port = os.environ.get("CLASSMEANS_PORT", "8000")
    url = f"http://127.0.0.1:{port}{path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "4"))) as resp:
            if resp.status == 200:
                return 0
            print(f"unhealthy: {url} answered {resp.status}", file=sys.stderr)
    except Exception as exc:  # any failure to get a 200 is "unhealthy"
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

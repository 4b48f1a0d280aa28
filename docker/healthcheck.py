"""HEALTHCHECK of the PAD image: exit 0 when GET /health answers 200.

Reads PAD_PORT (default 8000); /health needs no API key."""

import os
import sys
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('PAD_PORT', '8000')}/health"
try:
    with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 (fixed local URL)
        sys.exit(0 if response.status == 200 else 1)
except OSError as exc:  # URLError, HTTPError (503 while loading), timeouts
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)

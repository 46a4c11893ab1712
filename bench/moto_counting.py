"""moto's S3 server (as `moto_server` runs it) logging each request with the bytes of its response
body, so a benchmark can tell a whole GET from a ranged one and count what crossed the wire.

One line per request on standard output, in werkzeug's request-log form plus the body's bytes and
the Range asked for:

    "GET /bucket/key HTTP/1.1" 206 65536 bytes=-65536

    python -m bench.moto_counting PORT [LATENCY_MS]

LATENCY_MS (default 0) delays each response by that many milliseconds before its first byte, as a
real bucket's round trip would (requests in flight at once are each delayed, not queued).
"""
from __future__ import annotations

import os
import sys
import threading
import time

from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple

_LOCK = threading.Lock()


class _Quiet(MotoRequestHandler):
    def log_request(self, code="-", size="-") -> None:  # (the middleware logs each request)
        pass


def counting(app, latency_s: float = 0.0):
    def wrapped(environ, start_response):
        if latency_s:
            time.sleep(latency_s)  # (each request on its own server thread)
        status = []

        def start(code, headers, exc_info=None):
            status.append(code.split()[0])
            return start_response(code, headers, exc_info) if exc_info else start_response(code, headers)

        body = app(environ, start)
        n = 0
        try:
            for chunk in body:
                n += len(chunk)
                yield chunk
        finally:
            if hasattr(body, "close"):
                body.close()
            line = (f'"{environ["REQUEST_METHOD"]} {environ.get("PATH_INFO", "")} HTTP/1.1" '
                    f'{status[0] if status else "-"} {n} {environ.get("HTTP_RANGE", "-")}\n')
            with _LOCK:
                sys.stdout.write(line)
                sys.stdout.flush()
    return wrapped


def main() -> None:
    port = int(sys.argv[1])
    os.environ.setdefault("MOTO_PORT", str(port))  # (as moto_server sets it)
    app = DomainDispatcherApplication(create_backend_app)
    latency_ms = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    run_simple("127.0.0.1", port, counting(app, latency_ms / 1000), threaded=True, request_handler=_Quiet)


if __name__ == "__main__":
    main()

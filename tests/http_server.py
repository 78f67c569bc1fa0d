"""A local HTTP file server with Range support, for download tests (no network).

``with serve_files() as (server, base_url):`` then ``server.files["/a.zip"] = b"..."``;
``server.requests`` records ``(path, Range header)`` of every GET.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator

CONTENT_TYPES = {".html": "text/html", ".zip": "application/zip"}


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` with HTTP Range support; records each request's Range header."""

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        suffix = self.path[self.path.rfind("."):]
        self.send_header("Content-Type", CONTENT_TYPES.get(suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_files() -> Iterator[tuple[http.server.ThreadingHTTPServer, str]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.files, server.requests = {}, []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

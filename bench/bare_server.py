"""The benchmark's baseline: a bare stdlib HTTP server, as small as one can be.

    python bench/bare_server.py [--port 0]

A ``ThreadingHTTPServer`` whose one handler reads the body and answers
``1`` (HTTP/1.1 keep-alive, Nagle off), for any method and path.  Its first
stdout line names the port, as the fake's CLI does.  Standard library only.
"""

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", "1")
        self.end_headers()
        self.wfile.write(b"1")

    do_GET = do_POST

    def log_message(self, format, *args):
        pass


def main():
    port = int(sys.argv[sys.argv.index("--port") + 1]) if "--port" in sys.argv else 0
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"bare server listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

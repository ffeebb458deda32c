"""A stand-in for the vLLM server in supervisor tests.

    python child_server.py PORT|SOCKET PIDS_FILE [--ready-after S] [--exit-after S]

Answers GET /health with 200 once `--ready-after` seconds have passed, spawns a grandchild that
sleeps (as vLLM spawns its engine core), appends "<pid> <grandchild pid>" to PIDS_FILE, and
exits with code 3 after `--exit-after` seconds when given.
"""

import argparse
import http.server
import socketserver
import subprocess
import sys
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address", help="a loopback port, or the path of a UNIX socket (as vLLM's --uds)")
    parser.add_argument("pids_file")
    parser.add_argument("--ready-after", type=float, default=0.0)
    parser.add_argument("--exit-after", type=float, default=None)
    args = parser.parse_args()
    started = time.monotonic()
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(args.pids_file, "a") as handle:
        handle.write(f"{__import__('os').getpid()} {grandchild.pid}\n")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ready = time.monotonic() - started >= args.ready_after
            self.send_response(200 if ready and self.path == "/health" else 503)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    if args.address.isdigit():
        server: socketserver.BaseServer = http.server.ThreadingHTTPServer(("127.0.0.1", int(args.address)), Handler)
    else:
        server = socketserver.ThreadingUnixStreamServer(args.address, Handler)
    print(f"child listening on {args.address}", flush=True)
    if args.exit_after is not None:
        threading.Timer(args.exit_after, lambda: __import__("os")._exit(3)).start()
    server.serve_forever()


if __name__ == "__main__":
    main()

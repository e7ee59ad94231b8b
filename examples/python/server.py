#!/usr/bin/env python3
"""An HTTP server in Python's standard library, run on every CPU core by `ecewo-cluster run`.

    ecewo-cluster run --listen 127.0.0.1:8000 --workers 2 -- python3 examples/python/server.py
    curl http://127.0.0.1:8000/       # Hello from worker 0! pid=4242 tag=none
    ecewo-cluster status              # both workers, ready, with the STATUS= text each sent

Each worker takes the listening socket the master bound from fd 3 (the systemd convention:
LISTEN_FDS, LISTEN_PID), sends READY=1 to $NOTIFY_SOCKET once it serves, beats with WATCHDOG=1
while WATCHDOG_USEC is set (the master's worker timeout), and on SIGTERM stops accepting, finishes
the requests under way and exits. To deploy new code, replace this file and run
`ecewo-cluster restart --wait` (or `kill -USR2 <master>`): every worker runs it anew, one at a
time, and no request is dropped (the master keeps the socket).

GET /    -> "Hello from worker ID! pid=PID tag=TAG", TAG the first line of --tag-file (or of the
            file $TAG_FILE names) read at start, "none" without one
GET /env -> the variables the cluster gave this worker, one KEY=VALUE a line, after pid=PID

Run alone (`python3 server.py --port 8000`), it binds the port itself.
"""

import argparse
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
SHOWN = ("LISTEN_", "ECEWO_CLUSTER_", "NOTIFY_SOCKET", "WATCHDOG_", "EINHORN_", "SERVER_STARTER_")


class Notifier:
    """sd_notify(3) in a few lines: datagrams to $NOTIFY_SOCKET (a path, or @name: abstract)."""

    def __init__(self):
        address = os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sock = None
        self.complained = False
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def __call__(self, *assignments):
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as e:
            if not self.complained:  # once: a beat that fails fails again
                self.complained = True
                log(f"cannot notify {os.environ.get('NOTIFY_SOCKET')}: {e}")


def inherited_listener():
    """The first socket the master passed (fd 3), or None when none was passed to this process."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    # Family and type are read from the descriptor itself: TCP or unix, both work.
    return socket.socket(fileno=LISTEN_FDS_START)


def log(message):
    print(f"worker {os.environ.get('ECEWO_CLUSTER_WORKER_ID', '-')} (pid {os.getpid()}): {message}",
          file=sys.stderr, flush=True)


class Server(ThreadingHTTPServer):
    """A thread per request, on a socket it is given, beating from its serving loop."""

    # ThreadingHTTPServer's threads are daemons, which server_close() does not wait for: the
    # process would exit in the middle of the requests under way at SIGTERM. Joined instead.
    daemon_threads = False

    def __init__(self, sock, handler, notify, beat_every):
        super().__init__(("", 0), handler, bind_and_activate=False)
        self.socket.close()  # the unbound one TCPServer made: serve the given one instead
        self.socket = sock
        self.server_address = sock.getsockname()
        self.notify = notify
        self.beat_every = beat_every
        self.next_beat = 0.0

    def service_actions(self):
        # Called by serve_forever after every request and every poll interval: a loop that no
        # longer turns stops beating, and the master takes the worker for hung.
        if self.beat_every and time.monotonic() >= self.next_beat:
            self.notify("WATCHDOG=1")
            self.next_beat = time.monotonic() + self.beat_every


def make_handler(worker, tag):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/":
                self.answer(200, f"Hello from worker {worker}! pid={os.getpid()} tag={tag}")
            elif self.path == "/env":
                lines = [f"pid={os.getpid()}"]
                lines += [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(SHOWN)]
                self.answer(200, "\n".join(lines))
            else:
                self.answer(404, "not found")

        def answer(self, status, text):
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def address_string(self):
            # A unix socket's peer has no address to show.
            return self.client_address[0] if self.client_address else "unix"

        def log_message(self, format, *args):
            log(f"{self.address_string()} {format % args}")

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tag-file", default=os.environ.get("TAG_FILE"), help="show this file's first line")
    parser.add_argument("--port", type=int, default=8000, help="the port to bind when run alone")
    args = parser.parse_args()

    worker = os.environ.get("ECEWO_CLUSTER_WORKER_ID", "-")
    tag = "none"
    if args.tag_file:
        try:
            with open(args.tag_file) as f:
                tag = f.readline().strip() or "none"
        except OSError:
            pass
    sock = inherited_listener() or socket.create_server(("127.0.0.1", args.port))
    notify = Notifier()
    # systemd's rule is a beat within every half of WATCHDOG_USEC; a quarter leaves a margin.
    watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    beat_every = watchdog_usec / 4e6 if watchdog_usec else 0.0
    server = Server(sock, make_handler(worker, tag), notify, beat_every)

    def stop(signum, frame):
        notify("STOPPING=1", "STATUS=draining")
        # shutdown() waits for serve_forever to return: it must run on another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    notify("READY=1", f"STATUS=worker {worker} serving, tag {tag}")
    log(f"serving on {server.server_address or 'fd 3'}")
    server.serve_forever(poll_interval=min(0.5, beat_every) if beat_every else 0.5)
    server.server_close()  # waits for the requests under way
    log("stopped")


if __name__ == "__main__":
    main()

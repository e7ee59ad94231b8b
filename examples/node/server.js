#!/usr/bin/env node
// An HTTP server in Node's standard library (no npm package), run on every CPU core by
// `ecewo-cluster run`:
//
//   ecewo-cluster run --listen 127.0.0.1:8000 --workers 2 -- node examples/node/server.js
//   curl http://127.0.0.1:8000/       # Hello from worker 0! pid=4242 tag=none
//
// Each worker listens on the socket the master bound, passed as fd 3 (the systemd convention:
// LISTEN_FDS, LISTEN_PID). Node has no unix datagram sockets, so READY=1 (and WATCHDOG=1, the
// heartbeat, while WATCHDOG_USEC is set) go to $NOTIFY_SOCKET through `systemd-notify`, run as
// a child: the master takes notifications from a worker's direct children too. Without
// systemd-notify (the `systemd` package), run it with `--ready delay=MS` instead (ready MS after
// it started; no heartbeat then). On SIGTERM it stops accepting, finishes the requests under way
// and exits. To deploy new code, replace this file and run `ecewo-cluster restart --wait`.
//
// GET /    -> "Hello from worker ID! pid=PID tag=TAG", TAG the first line of --tag-file PATH (or
//             of the file $TAG_FILE names) read at start, "none" without one
// GET /env -> the variables the cluster gave this worker, one KEY=VALUE a line, after pid=PID
//
// Run alone (`node server.js --port 8000`), it binds the port itself.

'use strict';

const http = require('node:http');
const fs = require('node:fs');
const { execFile } = require('node:child_process');

const SHOWN = ['LISTEN_', 'ECEWO_CLUSTER_', 'NOTIFY_SOCKET', 'WATCHDOG_', 'EINHORN_', 'SERVER_STARTER_'];
const worker = process.env.ECEWO_CLUSTER_WORKER_ID ?? '-';

function option(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

function log(message) {
  process.stderr.write(`worker ${worker} (pid ${process.pid}): ${message}\n`);
}

function readTag(path) {
  if (!path) return 'none';
  try {
    return fs.readFileSync(path, 'utf8').split('\n')[0].trim() || 'none';
  } catch {
    return 'none';
  }
}

// sd_notify through systemd-notify (`--ready`, `--status=TEXT`, or `VARIABLE=VALUE`); it waits
// until the master has the message, so the master still sees it running, as this one's child.
let complained = false;
function notify(...args) {
  if (!process.env.NOTIFY_SOCKET) return;
  execFile('systemd-notify', args, (err) => {
    if (err && !complained) {
      complained = true; // once: a beat that fails fails again
      log(`systemd-notify ${args.join(' ')} failed (${err.message.trim()}); without it use --ready delay=MS`);
    }
  });
}

const tag = readTag(option('--tag-file', process.env.TAG_FILE));

const server = http.createServer((req, res) => {
  let status = 200;
  let body;
  if (req.method === 'GET' && req.url === '/') {
    body = `Hello from worker ${worker}! pid=${process.pid} tag=${tag}`;
  } else if (req.method === 'GET' && req.url === '/env') {
    const lines = Object.keys(process.env)
      .filter((k) => SHOWN.some((p) => k.startsWith(p)))
      .sort()
      .map((k) => `${k}=${process.env[k]}`);
    body = [`pid=${process.pid}`, ...lines].join('\n');
  } else {
    status = 404;
    body = 'not found';
  }
  res.writeHead(status, { 'Content-Type': 'text/plain; charset=utf-8', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
});

// The listeners were passed to this process (not to a parent that ran it).
const inherited = process.env.LISTEN_PID === String(process.pid) && Number(process.env.LISTEN_FDS) >= 1;
const where = inherited ? { fd: 3 } : { host: '127.0.0.1', port: Number(option('--port', '8000')) };

let beat = null;
server.listen(where, () => {
  log(`serving on ${inherited ? 'fd 3' : `127.0.0.1:${where.port}`}`);
  notify('--ready', `--status=worker ${worker} serving, tag ${tag}`);
  // systemd's rule is a beat within every half of WATCHDOG_USEC; a quarter leaves a margin. A
  // timer of the event loop: a loop that is stuck stops beating, and the master sees it hung.
  const usec = Number(process.env.WATCHDOG_USEC || 0);
  if (usec > 0) beat = setInterval(() => notify('WATCHDOG=1'), Math.max(usec / 4000, 50));
});

function stop() {
  notify('STOPPING=1', '--status=draining');
  if (beat) clearInterval(beat);
  // Stops accepting, closes idle keep-alive connections, and calls back once the others ended.
  server.close(() => log('stopped'));
  server.closeIdleConnections();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

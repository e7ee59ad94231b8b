"""Process, /proc and control-socket helpers shared by the benchmarks written after bench/run.

Python 3.11, standard library only. Imported by bench scripts with `sys.path.insert(0, bench/lib)`.
The older scripts (bench/run, bench/startup, bench/respawns, …) still carry their own copies of
some of these; new scripts use this module.
"""

import json
import os
import select
import signal
import socket
import shutil
import subprocess
import sys
import time
from pathlib import Path


class BenchError(Exception):
    """A benchmark cannot go on: the message says why."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def proc_stat(pid):
    """Fields of /proc/PID/stat as a list indexed like proc(5) (1-based: [1] = pid), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and parentheses: split around the last ')'.
    lpar, rpar = raw.index("("), raw.rindex(")")
    rest = raw[rpar + 2 :].split()
    return [None, raw[:lpar].strip(), raw[lpar + 1 : rpar]] + rest


def children(pid):
    """{pid: start time} of the live (non-zombie) children of `pid`."""
    out = {}
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            kids += Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        kids = [e for e in os.listdir("/proc") if e.isdigit()]  # no CONFIG_PROC_CHILDREN
    for entry in kids:
        st = proc_stat(int(entry))
        if st and int(st[4]) == pid and st[3] != "Z":
            out[int(entry)] = int(st[22])
    return out


def alive(pid, start):
    st = proc_stat(pid)
    return bool(st) and int(st[22]) == start and st[3] != "Z"


def kill_pid(pid, start, sig):
    """Signal `pid` only if it is still the process that started at `start` (PID reuse)."""
    if alive(pid, start):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def status_fields(pid):
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            fields[k] = v.strip()
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields


def rss_kib(pid):
    v = status_fields(pid).get("VmRSS")
    return int(v.split()[0]) if v else None


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, PermissionError):
        return None


def thread_ids(pid):
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise BenchError(f"process {pid} is gone")


def cpu_ns(pid):
    """CPU time in ns summed over all threads of `pid` (first field of each schedstat)."""
    total = 0
    for tid in thread_ids(pid):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            pass  # a thread that ended between the listing and the read
    return total


class Control:
    """A connection to a master's control socket: one JSON request, one JSON answer."""

    def __init__(self, path, timeout=10.0):
        self.path = str(path)
        self.timeout = timeout
        self.sock = None
        self.buf = b""

    def _connect(self):
        self.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)
        self.buf = b""

    def request(self, body, timeout=None):
        """Send `body` (a dict; `v` is added) and return (answer dict, answer size in bytes)."""
        if self.sock is None:
            self._connect()
        self.sock.settimeout(timeout or self.timeout)
        self.sock.sendall(json.dumps({"v": 1, **body}).encode() + b"\n")
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                self.close()
                raise BenchError("the control socket closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        reply = json.loads(line)
        if not reply.get("ok", True) or reply.get("error"):
            raise BenchError(f"control socket: {reply}")
        return reply, len(line) + 1

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Master:
    """One testbed master and every worker it ever had; `stop()` is safe to call any number of times.

    Started with stdout piped (for its `ready:` line), stderr to `log`. Appended to `live` at
    once so that the caller's `finally` stops it.
    """

    def __init__(self, argv, log, live, ready_timeout):
        self.argv = argv
        self.ready_timeout = ready_timeout
        self.workers = {}  # pid -> start time, every worker seen (guards against PID reuse)
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, bufsize=0)
        self.start = None
        live.append(self)
        st = proc_stat(self.proc.pid)
        self.start = int(st[22]) if st else None

    @property
    def pid(self):
        return self.proc.pid

    def wait_line(self, prefix):
        """Return the first stdout line starting with `prefix` and the seconds since spawn."""
        fd = self.proc.stdout.fileno()
        deadline = self.t0 + self.ready_timeout
        buf = b""
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(prefix):
                    return text, time.perf_counter() - self.t0
            left = deadline - time.perf_counter()
            if left <= 0:
                raise BenchError(f"no `{prefix}` line within {self.ready_timeout:.0f} s: {' '.join(self.argv)}")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise BenchError(f"the master exited (status {self.proc.wait()}) before its `{prefix}` line")
                buf += chunk

    def note_workers(self):
        kids = children(self.pid)
        for pid, st in kids.items():
            self.workers.setdefault(pid, st)
        return kids

    def stop(self, timeout=30.0):
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.note_workers()
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log(f"warning: master {self.pid} ignored SIGTERM for {timeout:.0f} s; SIGKILL")
                    self.note_workers()
                    self.proc.kill()
                    self.proc.wait()
            deadline = time.monotonic() + 5.0
            while any(alive(p, s) for p, s in self.workers.items()) and time.monotonic() < deadline:
                time.sleep(0.01)
            for pid, st in self.workers.items():
                if alive(pid, st):
                    log(f"warning: worker {pid} outlived its master; SIGKILL")
                    kill_pid(pid, st, signal.SIGKILL)
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None


def sh(cwd, *cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def environment(root, command):
    """Markdown bullet lines describing the machine, the toolchain and the tree."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rev = sh(root, "git", "rev-parse", "--short", "HEAD")
    dirty = " + uncommitted changes" if sh(root, "git", "status", "--porcelain", "--untracked-files=no") else ""
    return "\n".join(
        [
            f"- Date: {sh(root, 'date', '-u')}",
            f"- nproc: {sh(root, 'nproc')}; CPU: {cpu}; RAM: {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30} GiB",
            f"- Kernel: {sh(root, 'uname', '-r')}; {sh(root, 'rustc', '--version')}",
            f"- Tree: {rev}{dirty}",
            f"- Command: `{command}`",
        ]
    )


def replace_section(path, begin, end, heading, section):
    """Replace the text between the `begin` and `end` markers of `path` (added under `heading`
    at the end when missing)."""
    text = Path(path).read_text()
    b, e = text.find(begin), text.find(end)
    if b < 0 or e < b:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{begin}\n{end}\n"
        b, e = text.find(begin), text.find(end)
    text = text[: b + len(begin)] + "\n" + section + "\n" + text[e:]
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Load (wrk) and tools

WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""

APT_ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
_apt_updated = False


def apt_install(*packages):
    """`apt-get install -y PACKAGES` (after one `apt-get update`); False when it fails."""
    global _apt_updated
    cmds = ([] if _apt_updated else [["apt-get", "update"]]) + [["apt-get", "install", "-y", *packages]]
    for cmd in cmds:
        if subprocess.run(cmd, env=APT_ENV, stdin=subprocess.DEVNULL).returncode != 0:
            return False
        if cmd[1] == "update":
            _apt_updated = True
    return True


def ensure_matplotlib():
    """A Python that has matplotlib, or None: plots are drawn in a separate process with it.
    Debian's python3-matplotlib is installed when it is missing and we are root."""
    for py in (sys.executable, "/usr/bin/python3"):
        if py and subprocess.run([py, "-c", "import matplotlib"], capture_output=True).returncode == 0:
            return py
    if os.geteuid() == 0:
        log("installing python3-matplotlib (apt-get) for the plot")
        apt_install("-qq", "python3-matplotlib")
        if subprocess.run(["/usr/bin/python3", "-c", "import matplotlib"], capture_output=True).returncode == 0:
            return "/usr/bin/python3"
    return None


def find_nginx():

    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def ensure_tools(nginx=False):
    """wrk (and nginx) from Debian's packages when missing; a BenchError if impossible."""

    missing = [p for p, ok in (("wrk", shutil.which("wrk")), ("nginx", not nginx or find_nginx())) if not ok]
    if not missing:
        return
    log(f"installing {' '.join(missing)}: apt-get update; apt-get install -y {' '.join(missing)}")
    if not apt_install(*missing) or not shutil.which("wrk") or (nginx and not find_nginx()):
        raise BenchError(f"`apt-get install -y {' '.join(missing)}` failed (needs root and Debian's archive)")


def run_wrk(port, seconds, lua, threads=1, connections=64, path="/", timeout="2s", cpu=None):
    """One wrk run against 127.0.0.1:port; its summary as a dict (rps, errors, p50_us, p99_us…).
    With `cpu`, wrk runs on that CPU only (`taskset`)."""
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", timeout,
           "-s", str(lua), f"http://127.0.0.1:{port}{path}"]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu)] + cmd
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=seconds + 20)
    except subprocess.TimeoutExpired:
        raise BenchError("wrk did not finish in time")
    if p.returncode != 0:
        raise BenchError(f"wrk failed (status {p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    for line in p.stdout.splitlines():
        if line.startswith("WRKJSON "):
            r = json.loads(line[len("WRKJSON ") :])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
            r["errors"] = r["connect"] + r["read"] + r["write"] + r["timeout"] + r["status"]
            return r
    raise BenchError(f"no result line in wrk's output:\n{p.stdout}")


def pin_apart_from_wrk():
    """Keeps the first CPU this process may use for wrk and moves this process (and so every
    server it starts after this) to the others; returns (wrk's CPU, the servers' CPUs as text).
    `run_wrk(..., cpu=)` then runs wrk on its CPU. (CPUs as the kernel numbers them: on a machine
    with SMT, CPU 0's sibling thread is among the servers'.)"""
    if shutil.which("taskset") is None:
        raise BenchError("pinning runs wrk under taskset (util-linux), which is not installed")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise BenchError(f"pinning needs two CPUs or more; this process may use {len(cpus)}")
    os.sched_setaffinity(0, cpus[1:])
    servers = ",".join(map(str, cpus[1:]))
    log(f"pinned: wrk on CPU {cpus[0]}, the servers on CPU {servers}")
    return cpus[0], servers


def wait_port(port, timeout, proc=None):
    """Wait until 127.0.0.1:port accepts a connection (and `proc`, if given, is still running)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"the server exited (status {proc.returncode}) before it accepted connections")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"nothing accepts on port {port} after {timeout:.0f} s")
            time.sleep(0.01)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_cpu_ns(pids):
    """CPU time in ns (utime + stime of /proc/PID/stat: the whole thread group, ended threads
    included; 1/CLK_TCK resolution) of the live processes of `pids` ({pid: start time})."""
    tick = 1e9 / os.sysconf("SC_CLK_TCK")
    total = 0
    for pid, st in pids.items():
        s = proc_stat(pid)
        if s and int(s[22]) == st and s[3] != "Z":
            total += (int(s[14]) + int(s[15])) * tick
    return total


NGINX_CONF = """\
worker_processes {workers};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000000;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{ return 200 "Hello"; }}
    }}
}}
"""


class Tree:
    """A server process and every child it ever had (noted from /proc); `stop()` is idempotent.

    `argv` is started with stdout and stderr to `logf`; `port` is where it serves, waited for
    (and, with `children`, until it has that many live children)."""

    def __init__(self, argv, port, logf, live, children_expected=None, timeout=60):
        self.port = port
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        live.append(self)
        st = proc_stat(self.proc.pid)
        self.pids = {self.proc.pid: int(st[22])} if st else {}
        deadline = time.monotonic() + timeout
        while children_expected is not None and len(self.note()) < children_expected:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{argv[0]}: {len(self.note())} of {children_expected} children after start")
            time.sleep(0.01)
        wait_port(port, max(1, deadline - time.monotonic()), self.proc)
        self.note()

    def note(self):
        kids = children(self.proc.pid)
        for pid, st in kids.items():
            self.pids.setdefault(pid, st)
        return kids

    def cpu_ns(self):
        return group_cpu_ns(self.pids)

    def stop(self, timeout=20):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.note()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 5
        while any(alive(p, s) for p, s in self.pids.items()) and time.monotonic() < deadline:
            time.sleep(0.01)
        for p, s in self.pids.items():
            kill_pid(p, s, signal.SIGKILL)
        self.proc = None


def nginx_tree(nginx, tmp, workers, logf, live):
    """nginx with `workers` worker processes answering `return 200 "Hello"` on a free port."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, tmp=tmp, port=port))
    return Tree([nginx, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")], port, logf, live,
                children_expected=workers)

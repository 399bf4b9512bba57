#!/usr/bin/env python3
"""Container test: the real Dockerfile and deploy/docker-compose.yml on a real
Docker engine.

No image registry is reachable, so the test brings its own:
  1. starts Debian's dockerd as root on a private socket, data root and exec
     root under a temporary directory (--bridge=none --iptables=false: no
     default bridge and no NAT; builds and single containers use the host
     network, compose its own network with published ports);
  2. makes the base image with debootstrap --variant=minbase bookworm from the
     Debian mirror this machine's apt uses (read from the apt sources), cached
     as a tarball in --cache-dir, imported with docker import; the host's apt
     sources and configuration are layered on top so apt inside the builds
     reaches the same mirror;
  3. builds the repository's Dockerfile with that base (--network host), runs
     it, calls it with the engram client (health, create, store, retrieve),
     waits for the HEALTHCHECK to report healthy, stops it, starts a new
     container on the same named volume and finds the bank and its patterns;
  4. docker-compose up with deploy/docker-compose.yml plus
     tests/docker/compose.test.yml (free host ports, Prometheus from Debian's
     package built locally, Grafana left out), checks through Prometheus'
     HTTP API that it scrapes engramd:9464 as deploy/prometheus.yml says, the
     target is up and engram_ series are stored, then docker-compose down -v;
  5. docker-compose up with deploy/replicas/docker-compose.yml plus
     tests/docker/replicas.test.yml (NATS from Debian's nats-server built
     locally, free host ports): three NATS nodes and three replicas; a Store
     through one replica is read on all three; then docker-compose down -v.
Every wait is bounded; containers, volumes, images, the daemon (stopped by its
pid) and the temporary directory are removed at the end, also on failure.

Needs root, docker.io, docker-compose, debootstrap and python3-numpy (scripts/setup.sh installs them); run with /usr/bin/python3:

  /usr/bin/python3 tests/docker/docker_test.py --engram build/client/engram \\
      --repo . --cache-dir build/docker-cache
"""
import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np

RELEASE = "bookworm"
IMAGE_PREFIX = "engram-test"
T0 = time.monotonic()


def log(msg):
    print("[%7.1fs] %s" % (time.monotonic() - T0, msg), flush=True)


class TestFailure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def wait_for(what, probe, timeout, interval=1.0):
    """Calls probe() until it returns a true value; returns that value or
    raises TestFailure after timeout seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 -- the last error goes into the message
            last = e
        if time.monotonic() > deadline:
            raise TestFailure("timed out after %ds waiting for %s%s"
                              % (timeout, what, "" if last is None else " (last error: %s)" % last))
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path, lines=60):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------- apt sources

def _one_line_entries(path):
    """Entries of a one-line-style sources.list file."""
    out = []
    with open(path, errors="replace") as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            kind, _, rest = line.partition(" ")
            rest = rest.strip()
            options = {}
            if rest.startswith("["):
                opts, _, rest = rest[1:].partition("]")
                for item in opts.split():
                    key, _, value = item.partition("=")
                    options[key.lower()] = value
            words = rest.split()
            if kind not in ("deb", "deb-src") or len(words) < 2:
                continue
            out.append({"types": [kind], "uris": [words[0]], "suites": [words[1]],
                        "signed_by": options.get("signed-by", ""),
                        "text": raw.strip() + "\n", "format": "list"})
    return out


def _deb822_entries(path):
    """Entries of a deb822-style .sources file (paragraphs of Key: value,
    continuation lines indented, '#' comment lines, Enabled: no honoured)."""
    out = []
    with open(path, errors="replace") as f:
        text = f.read()
    for para in text.split("\n\n"):
        fields, raw_lines, key = {}, [], None
        for line in para.splitlines():
            if line.startswith("#"):
                continue
            if not line.strip():
                continue
            raw_lines.append(line)
            if line[0] in " \t" and key is not None:
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if not fields or fields.get("enabled", "yes").lower() == "no":
            continue
        signed_by = fields.get("signed-by", "")
        out.append({"types": fields.get("types", "").split(),
                    "uris": fields.get("uris", "").split(),
                    "suites": fields.get("suites", "").split(),
                    "signed_by": "" if "\n" in signed_by else signed_by,
                    "text": "\n".join(raw_lines) + "\n", "format": "sources"})
    return out


def apt_sources(root="/etc/apt"):
    """Every enabled entry of this machine's apt sources: sources.list and
    sources.list.d/*.list (one-line) and sources.list.d/*.sources (deb822)."""
    entries = []
    main = os.path.join(root, "sources.list")
    if os.path.isfile(main):
        entries += _one_line_entries(main)
    for path in sorted(glob.glob(os.path.join(root, "sources.list.d", "*.list"))):
        entries += _one_line_entries(path)
    for path in sorted(glob.glob(os.path.join(root, "sources.list.d", "*.sources"))):
        entries += _deb822_entries(path)
    return entries


def usable_in_base(entry):
    """True for binary Debian entries of RELEASE that a minbase image can use
    as is: plain http (minbase has no CA certificates) and a keyring file that
    exists here (it is copied along)."""
    return ("deb" in entry["types"] and entry["uris"]
            and all(u.startswith("http://") for u in entry["uris"])
            and entry["suites"] and all(s.split("-")[0] == RELEASE for s in entry["suites"])
            and (not entry["signed_by"] or os.path.isfile(entry["signed_by"])))


def debian_mirror(entries):
    """The mirror debootstrap should use: the first usable entry carrying the
    RELEASE suite itself."""
    for e in entries:
        if usable_in_base(e) and RELEASE in e["suites"]:
            return e["uris"][0].rstrip("/")
    raise TestFailure("no plain-http 'deb ... %s' entry in this machine's apt sources "
                      "(/etc/apt/sources.list, /etc/apt/sources.list.d/); entries found: %s"
                      % (RELEASE, [(e["uris"], e["suites"]) for e in entries]))


# ------------------------------------------------------------- docker daemon

class DockerDaemon:
    """A private dockerd: its own socket, data root, exec root and pid file
    under root_dir; stop() ends it by its pid."""

    def __init__(self, dockerd, docker, root_dir):
        self.dockerd = dockerd
        self.docker_bin = docker
        self.root = root_dir
        self.sock = os.path.join(root_dir, "d.sock")
        self.data_root = os.path.join(root_dir, "data")
        self.exec_root = os.path.join(root_dir, "x")
        self.pidfile = os.path.join(root_dir, "d.pid")
        self.log_path = os.path.join(root_dir, "dockerd.log")
        self.proc = None
        self.env = dict(os.environ, DOCKER_HOST="unix://" + self.sock, DOCKER_BUILDKIT="0",
                        COMPOSE_DOCKER_CLI_BUILD="0",
                        DOCKER_CONFIG=os.path.join(root_dir, "cli"))

    def start(self, timeout=60):
        if os.geteuid() != 0:
            raise TestFailure("the container test starts its own dockerd and must run as root "
                              "(uid %d)" % os.geteuid())
        for path in (self.dockerd, self.docker_bin):
            if not os.access(path, os.X_OK):
                raise TestFailure("%s is missing: install docker.io (scripts/setup.sh)" % path)
        check(len(self.sock) < 100, "socket path too long: " + self.sock)
        os.makedirs(self.env["DOCKER_CONFIG"], exist_ok=True)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [self.dockerd, "--bridge=none", "--iptables=false", "--ip-masq=false",
             "--data-root", self.data_root, "--exec-root", self.exec_root,
             "--pidfile", self.pidfile, "-H", "unix://" + self.sock],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise TestFailure("dockerd exited with %d:\n%s" % (self.proc.returncode,
                                                                   tail(self.log_path)))
            if os.path.exists(self.sock) and self.run("version", check=False,
                                                      timeout=10).returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise TestFailure("dockerd did not answer on %s within %ds:\n%s"
                                  % (self.sock, timeout, tail(self.log_path)))
            time.sleep(0.5)

    def run(self, *args, check=True, timeout=120, out=None, input=None):
        """Runs the docker CLI against this daemon; output captured (or to
        the file out). Raises TestFailure on a non-zero exit when check."""
        return run_cmd([self.docker_bin] + list(args), self.env, check=check,
                       timeout=timeout, out=out, input=input)

    def remove_everything(self, images=True):
        """Removes containers, volumes and (when images) images; best effort."""
        ids = self.run("ps", "-aq", check=False, timeout=60).stdout.split()
        if ids:
            self.run("rm", "-f", "-v", *ids, check=False, timeout=120)
        vols = self.run("volume", "ls", "-q", check=False, timeout=60).stdout.split()
        if vols:
            self.run("volume", "rm", "-f", *vols, check=False, timeout=120)
        if images:
            imgs = self.run("images", "-aq", check=False, timeout=60).stdout.split()
            if imgs:
                self.run("rmi", "-f", *sorted(set(imgs)), check=False, timeout=300)

    def stop(self, timeout=40):
        """Stops dockerd by its pid (SIGTERM, then SIGKILL), then any of its
        containerd / shim processes still running."""
        if self.proc is not None and self.proc.poll() is None:
            pid = self.proc.pid
            try:
                with open(self.pidfile) as f:
                    pid = int(f.read().strip() or pid)
            except (OSError, ValueError):
                pass
            os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        if getattr(self, "log", None):
            self.log.close()
        # containerd and shims of this daemon name the exec root on their
        # command line; end only those.
        for pid in processes_mentioning(self.exec_root):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def processes_mentioning(path):
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path in cmd:
            pids.append(int(d))
    return pids


def unmount_under(root):
    """Unmounts every mount point below root, deepest first."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == root or mp.startswith(root.rstrip("/") + "/"):
                points.append(mp)
    for mp in sorted(set(points), key=len, reverse=True):
        if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True)


def run_cmd(cmd, env, check=True, timeout=120, out=None, input=None):
    try:
        if out is None:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                               input=input)
        else:
            with open(out, "ab") as f:
                f.write(("$ %s\n" % " ".join(cmd)).encode())
                f.flush()
                p = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                   timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise TestFailure("timed out after %ds: %s%s" % (
            timeout, " ".join(cmd), "" if out is None else "\n" + tail(out)))
    if check and p.returncode != 0:
        detail = tail(out) if out is not None else (p.stdout or "") + (p.stderr or "")
        raise TestFailure("exit %d: %s\n%s" % (p.returncode, " ".join(cmd), detail))
    return p


# ---------------------------------------------------------------- base image

def debootstrap_tarball(cache_dir, work_dir, mirror):
    """Returns the path of a gzipped minbase RELEASE root file system from
    mirror, made with debootstrap unless the cache already holds one from the
    same mirror."""
    os.makedirs(cache_dir, exist_ok=True)
    tarball = os.path.join(cache_dir, "debootstrap-%s-minbase.tar.gz" % RELEASE)
    stamp = tarball + ".mirror"
    if os.path.isfile(tarball) and os.path.isfile(stamp) and open(stamp).read().strip() == mirror:
        log("base: cached %s (from %s)" % (tarball, mirror))
        return tarball
    rootfs = os.path.join(work_dir, "rootfs")
    log("base: debootstrap --variant=minbase %s %s" % (RELEASE, mirror))
    debootstrap_log = os.path.join(work_dir, "debootstrap.log")
    try:
        run_cmd(["debootstrap", "--variant=minbase", RELEASE, rootfs, mirror], os.environ,
                timeout=900, out=debootstrap_log)
        partial = tarball + ".partial"
        with open(partial, "wb") as f:
            tar = subprocess.Popen(["tar", "-C", rootfs, "--numeric-owner", "-c", "."],
                                   stdout=subprocess.PIPE)
            gz = subprocess.run(["gzip", "-1"], stdin=tar.stdout, stdout=f, timeout=600)
            tar.stdout.close()
            check(tar.wait(timeout=600) == 0 and gz.returncode == 0, "tar of the rootfs failed")
        os.replace(partial, tarball)
        with open(stamp, "w") as f:
            f.write(mirror + "\n")
    finally:
        unmount_under(rootfs)
        shutil.rmtree(rootfs, ignore_errors=True)
    return tarball


def make_base_image(daemon, tarball, entries, work_dir, tag):
    """Imports the debootstrap tarball and layers the host's apt sources
    (the entries the image can use), their keyrings and /etc/apt/apt.conf(.d)
    on it; tags the result."""
    raw = IMAGE_PREFIX + "/debootstrap:" + RELEASE
    daemon.run("import", tarball, raw, timeout=300)
    ctx = os.path.join(work_dir, "base-context")
    shutil.rmtree(ctx, ignore_errors=True)
    os.makedirs(os.path.join(ctx, "apt", "sources.list.d"))
    os.makedirs(os.path.join(ctx, "keyrings"))
    lists = [e["text"] for e in entries if usable_in_base(e) and e["format"] == "list"]
    paras = [e["text"] for e in entries if usable_in_base(e) and e["format"] == "sources"]
    if lists:
        with open(os.path.join(ctx, "apt", "sources.list.d", "host.list"), "w") as f:
            f.writelines(lists)
    if paras:
        with open(os.path.join(ctx, "apt", "sources.list.d", "host.sources"), "w") as f:
            f.write("\n".join(paras))
    if os.path.isdir("/etc/apt/apt.conf.d"):
        shutil.copytree("/etc/apt/apt.conf.d", os.path.join(ctx, "apt", "apt.conf.d"))
    if os.path.isfile("/etc/apt/apt.conf"):
        shutil.copy("/etc/apt/apt.conf", os.path.join(ctx, "apt", "apt.conf"))
    for e in entries:
        if usable_in_base(e) and e["signed_by"]:
            dest = os.path.join(ctx, "keyrings", e["signed_by"].lstrip("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy(e["signed_by"], dest)
    with open(os.path.join(ctx, "Dockerfile"), "w") as f:
        f.write("FROM %s\n"
                "RUN rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*\n"
                "COPY apt/ /etc/apt/\n"
                "COPY keyrings/ /\n" % raw)
    daemon.run("build", "-t", tag, ctx, timeout=300)
    return tag


# ------------------------------------------------------------------- engram

class Client:
    def __init__(self, engram, port):
        self.cmd = [engram, "--target", "127.0.0.1:%d" % port, "--timeout", "10"]

    def __call__(self, *args, check=True):
        p = subprocess.run(self.cmd + list(args), capture_output=True, text=True, timeout=60)
        if check and p.returncode != 0:
            raise TestFailure("engram %s: exit %d\n%s%s" % (" ".join(args), p.returncode,
                                                            p.stdout, p.stderr))
        return p

    def json(self, *args):
        return json.loads(self("--json", *args).stdout)

    def serving(self):
        return self("health", check=False).returncode == 0


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def http_post_json(url, body, timeout=10):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def container_logs(daemon, name):
    p = daemon.run("logs", name, check=False)
    return (p.stdout or "") + (p.stderr or "")


def container_state(daemon, name):
    return json.loads(daemon.run("inspect", "-f", "{{json .State}}", name).stdout)


def image_test(daemon, args, image, work_dir):
    """Runs the image, calls it, restarts it on the same volume."""
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    volume = "engram-test-data"
    client = Client(args.engram, grpc_port)
    rng = np.random.default_rng(7)
    patterns = rng.choice([-1.0, 1.0], size=(8, 128)).astype(np.float32)
    data = os.path.join(work_dir, "patterns.npy")
    np.save(data, patterns)

    def start(name):
        daemon.run("run", "-d", "--name", name, "--network", "host",
                   "-e", "ENGRAM_LISTEN=127.0.0.1:%d" % grpc_port,
                   "-e", "ENGRAM_METRICS_LISTEN=127.0.0.1:%d" % metrics_port,
                   "-e", "ENGRAM_HTTP_LISTEN=127.0.0.1:%d" % http_port,
                   "-v", volume + ":/data", image)
        try:
            wait_for("engramd in %s to serve on port %d" % (name, grpc_port), client.serving, 60)
        except TestFailure as e:
            raise TestFailure("%s\n%s" % (e, container_logs(daemon, name)))

    def stop(name):
        daemon.run("stop", "-t", "20", name, timeout=60)
        state = container_state(daemon, name)
        check(state["ExitCode"] == 0, "%s exited with %s after SIGTERM (graceful shutdown "
              "exits 0): %s\nlogs:\n%s" % (name, state["ExitCode"], state,
                                           container_logs(daemon, name)))
        daemon.run("rm", name)

    log("image: run (gRPC 127.0.0.1:%d, metrics %d, volume %s)" % (grpc_port, metrics_port,
                                                                  volume))
    start("engram-a")
    uid = daemon.run("exec", "engram-a", "id", "-u").stdout.strip()
    check(uid == "10001", "engramd runs as uid %s, not the image's engram user" % uid)
    created = client.json("bank", "create", "ops", "--dim", "128", "--kind", "bipolar",
                          "--energy", "polynomial", "--degree", "3")
    check(created["dim"] == 128, "CreateBank answered %s" % created)
    stored = client.json("store", "ops", data)
    check(stored["stored"] == 8 and stored["bank_patterns"] == 8, "Store answered %s" % stored)
    recalled = client.json("retrieve", "ops", data, "--flip", "0.1", "--seed", "1")
    check(recalled["recovered"] == 8, "Retrieve recovered %s of 8" % recalled.get("recovered"))
    metrics = http_get("http://127.0.0.1:%d/metrics" % metrics_port)
    check("engram_" in metrics and 'grpc_method="Store"' in metrics,
          "the metrics endpoint lacks engram_ or Store series:\n" + metrics[:2000])
    page = http_get("http://127.0.0.1:%d/ui/" % http_port)
    check("<html" in page.lower(), "the image serves no web page at /ui/:\n" + page[:500])
    bank = http_post_json("http://127.0.0.1:%d/v1/GetBank" % http_port, {"name": "ops"})
    check(bank.get("patterns") == "8", "POST /v1/GetBank answered %s" % bank)
    health = wait_for("the HEALTHCHECK of engram-a to report healthy",
                      lambda: container_state(daemon, "engram-a")["Health"]["Status"] == "healthy",
                      90, interval=2)
    log("image: health, create, store, retrieve, metrics, HEALTHCHECK healthy: %s" % health)
    stop("engram-a")

    log("image: new container on the same volume")
    start("engram-b")
    bank = client.json("bank", "get", "ops")
    check(int(bank["patterns"]) == 8, "after the restart the bank holds %s" % bank)
    back = os.path.join(work_dir, "back.npy")
    client("get", "ops", "--out", back)
    check(np.array_equal(np.load(back), patterns), "patterns changed across the restart")
    recalled = client.json("retrieve", "ops", data, "--flip", "0.1", "--seed", "2")
    check(recalled["recovered"] == 8, "Retrieve after restart recovered %s of 8"
          % recalled.get("recovered"))
    stop("engram-b")
    daemon.run("volume", "rm", volume)
    log("image: bank and patterns found again bit for bit; volume removed")


@contextlib.contextmanager
def compose_running(daemon, compose, env, out, project, label):
    """docker-compose up -d (images already built) for the body; on a failure
    in it, the services' logs; always down -v, and then nothing of `project`
    may be left."""
    try:
        run_cmd(compose + ["up", "-d", "--no-build"], env, timeout=180, out=out)
        yield
    except TestFailure:
        run_cmd(compose + ["logs", "--no-color"], env, check=False, timeout=60, out=out)
        print(tail(out, 80))
        raise
    finally:
        run_cmd(compose + ["down", "-v"], env, check=False, timeout=180, out=out)
    left = daemon.run("ps", "-aq").stdout.split()
    vols = [v for v in daemon.run("volume", "ls", "-q").stdout.split() if project in v]
    check(not left and not vols, "docker-compose down -v left containers %s volumes %s"
          % (left, vols))
    log("%s: down -v left no containers or volumes" % label)


def compose_test(daemon, args, image, base_image, work_dir):
    """docker-compose up with Prometheus; Prometheus scrapes engramd."""
    grpc_port, metrics_port, prom_port = free_port(), free_port(), free_port()
    env = dict(daemon.env,
               COMPOSE_PROJECT_NAME="engramtest",
               ENGRAM_TEST_IMAGE=image,
               ENGRAM_TEST_BASE_IMAGE=base_image,
               ENGRAM_TEST_PROMETHEUS_IMAGE=IMAGE_PREFIX + "/prometheus:latest",
               ENGRAM_GRPC_PORT=str(grpc_port),
               ENGRAM_METRICS_PORT=str(metrics_port),
               ENGRAM_HTTP_PORT=str(free_port()),
               PROMETHEUS_PORT=str(prom_port))
    compose = [args.compose,
               "-f", os.path.join(args.repo, "deploy", "docker-compose.yml"),
               "-f", os.path.join(args.repo, "tests", "docker", "compose.test.yml")]
    out = os.path.join(work_dir, "compose.log")
    run_cmd(compose + ["config", "-q"], env, timeout=60, out=out)
    log("compose: build the Prometheus image (Debian's prometheus package)")
    run_cmd(compose + ["build", "prometheus"], env, timeout=900, out=out)
    log("compose: up (host ports: gRPC %d, metrics %d, Prometheus %d)"
        % (grpc_port, metrics_port, prom_port))
    with compose_running(daemon, compose, env, out, "engramtest", "compose"):
        services = run_cmd(compose + ["ps", "--services", "--filter", "status=running"], env,
                           timeout=60).stdout.split()
        check(sorted(services) == ["engramd", "prometheus"],
              "running services: %s (Grafana should be left out)" % services)
        client = Client(args.engram, grpc_port)
        wait_for("engramd (compose) to serve on published port %d" % grpc_port,
                 client.serving, 60)
        client.json("bank", "create", "compose", "--dim", "16", "--kind", "continuous")
        api = "http://127.0.0.1:%d/api/v1/" % prom_port

        def target_up():
            targets = json.loads(http_get(api + "targets"))["data"]["activeTargets"]
            ours = [t for t in targets if t["labels"].get("job") == "engram"]
            return ours and ours[0]["health"] == "up" and ours[0]
        target = wait_for("Prometheus to report the engram target up", target_up, 120, 2)
        check(target["scrapeUrl"] == "http://engramd:9464/metrics",
              "Prometheus scrapes %s, not deploy/prometheus.yml's target" % target["scrapeUrl"])
        log("compose: Prometheus target %s is %s" % (target["scrapeUrl"], target["health"]))

        def engram_series():
            q = urllib.parse.quote('count by (__name__) ({__name__=~"engram_.+", job="engram"})')
            result = json.loads(http_get(api + "query?query=" + q))["data"]["result"]
            return sorted(r["metric"]["__name__"] for r in result)
        names = wait_for("an engram_ series in Prometheus", engram_series, 60, 2)
        log("compose: Prometheus stores %d engram_ series names, e.g. %s"
            % (len(names), names[:4]))
        q = urllib.parse.quote('grpc_server_handled_total{job="engram",grpc_method="CreateBank"}')
        wait_for("the CreateBank call in Prometheus",
                 lambda: json.loads(http_get(api + "query?query=" + q))["data"]["result"], 60, 2)
        engramd = run_cmd(compose + ["ps", "-q", "engramd"], env, timeout=60).stdout.strip()
        wait_for("the HEALTHCHECK of the compose engramd to report healthy",
                 lambda: container_state(daemon, engramd)["Health"]["Status"] == "healthy",
                 90, interval=2)


def replicas_compose_test(daemon, args, image, base_image, work_dir):
    """deploy/replicas/docker-compose.yml: three NATS nodes and three replicas;
    a write through one replica is read on another."""
    ports = [free_port() for _ in range(3)]
    env = dict(daemon.env,
               COMPOSE_PROJECT_NAME="engramreplicas",
               ENGRAM_TEST_IMAGE=image,
               ENGRAM_TEST_BASE_IMAGE=base_image,
               ENGRAM_TEST_NATS_IMAGE=IMAGE_PREFIX + "/nats:latest",
               ENGRAM_REPLICA1_PORT=str(ports[0]),
               ENGRAM_REPLICA2_PORT=str(ports[1]),
               ENGRAM_REPLICA3_PORT=str(ports[2]))
    compose = [args.compose,
               "-f", os.path.join(args.repo, "deploy", "replicas", "docker-compose.yml"),
               "-f", os.path.join(args.repo, "tests", "docker", "replicas.test.yml")]
    out = os.path.join(work_dir, "replicas.log")
    run_cmd(compose + ["config", "-q"], env, timeout=60, out=out)
    log("replicas: build the NATS image (Debian's nats-server package)")
    run_cmd(compose + ["build", "nats1"], env, timeout=900, out=out)
    log("replicas: up (host ports %s)" % ports)
    with compose_running(daemon, compose, env, out, "engramreplicas", "replicas"):
        clients = [Client(args.engram, p) for p in ports]
        for i, c in enumerate(clients):
            wait_for("replica %d to serve on published port %d" % (i + 1, ports[i]),
                     lambda c=c: c.serving() and c("bank", "list", check=False).returncode == 0,
                     120, 2)
        clients[0].json("bank", "create", "replicated", "--dim", "4", "--kind", "continuous")
        rows = os.path.join(work_dir, "rows.csv")
        with open(rows, "w") as f:
            f.write("1,0,0,0\n0,1,0,0\n0,0,1,0\n")
        clients[1]("store", "replicated", rows)

        def held_everywhere():
            return all(c("bank", "get", "replicated", check=False).returncode == 0
                       and c.json("bank", "get", "replicated").get("patterns") in (3, "3")
                       for c in clients)
        wait_for("every replica to hold the 3 patterns stored through replica 2",
                 held_everywhere, 60, 1)
        log("replicas: a Store through replica 2 is on replicas 1, 2 and 3")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engram", required=True, help="the engram client binary")
    ap.add_argument("--repo", required=True, help="the repository (build context)")
    ap.add_argument("--cache-dir", required=True, help="keeps the debootstrap tarball")
    ap.add_argument("--dockerd", default="/usr/sbin/dockerd")
    ap.add_argument("--docker", default="/usr/bin/docker")
    ap.add_argument("--compose", default="/usr/bin/docker-compose")
    ap.add_argument("--workdir", help="keep the daemon's state (and so its layer cache) here "
                    "between runs instead of a fresh temporary directory; images are kept")
    args = ap.parse_args()
    args.repo = os.path.abspath(args.repo)
    args.engram = os.path.abspath(args.engram)

    keep = args.workdir is not None
    work_dir = os.path.abspath(args.workdir) if keep else tempfile.mkdtemp(prefix="edk", dir="/tmp")
    os.makedirs(work_dir, exist_ok=True)
    daemon = DockerDaemon(args.dockerd, args.docker, work_dir)
    ok = False
    try:
        for tool, package in ((args.compose, "docker-compose"), ("debootstrap", "debootstrap")):
            if shutil.which(tool) is None:
                raise TestFailure("%s is missing: install %s (scripts/setup.sh)" % (tool, package))
        entries = apt_sources()
        mirror = debian_mirror(entries)
        log("daemon: dockerd -H unix://%s (work dir %s)" % (daemon.sock, work_dir))
        daemon.start()
        tarball = debootstrap_tarball(os.path.abspath(args.cache_dir), work_dir, mirror)
        base = make_base_image(daemon, tarball, entries, work_dir,
                               IMAGE_PREFIX + "/base:" + RELEASE)
        log("base: %s = debootstrap %s + this machine's apt sources and configuration"
            % (base, RELEASE))
        image = IMAGE_PREFIX + "/engram:latest"
        build_log = os.path.join(work_dir, "build.log")
        t = time.monotonic()
        daemon.run("build", "--network", "host", "--build-arg", "BASE_IMAGE=" + base,
                   "-t", image, "-f", os.path.join(args.repo, "Dockerfile"), args.repo,
                   timeout=1500, out=build_log)
        size = daemon.run("image", "inspect", "-f", "{{.Size}}", image).stdout.strip()
        log("image: docker build of the Dockerfile took %.0fs, %s is %.0f MB"
            % (time.monotonic() - t, image, int(size) / 1e6))
        image_test(daemon, args, image, work_dir)
        compose_test(daemon, args, image, base, work_dir)
        replicas_compose_test(daemon, args, image, base, work_dir)
        ok = True
    except TestFailure as e:
        log("FAIL: %s" % e)
    finally:
        if daemon.proc is not None:
            daemon.remove_everything(images=not keep)
        daemon.stop()
        unmount_under(work_dir)
        if not keep:
            shutil.rmtree(work_dir, ignore_errors=True)
        log("daemon stopped, containers%s removed" % ("" if keep else ", images, work dir"))
    print("PASS" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Bounded soak of engramd: a mixed concurrent load for a fixed time, with the
server's threads and resident memory sampled every second.

  /usr/bin/python3 bench/soak.py --engramd build/server/engramd \
      [--seconds 600] [--clients 64] [--cb-queries 100000] [--json OUT] [--check]

Starts engramd on free loopback ports (gRPC and /metrics) with a temporary
data directory, creates a continuous LSE bank (--patterns x --dim, beta 8,
random unit-norm patterns) and a small bipolar bank, then runs --clients
threads until --seconds have passed. The clients share --channels channels
(one TCP connection each) and loop over a mix of:

  Store             4 new patterns with fresh ids (and payloads) into the LSE
                    bank; each client deletes its oldest patterns again
                    (DeletePatterns) once it holds 16, so the bank stays
                    bounded and memory growth means a leak, not data;
  Retrieve          one query near a stored pattern, SYNC dynamics;
  Retrieve.batch    8-32 queries in one call (large enough to take the
                    server's path for long calls);
  Retrieve.async    ASYNC dynamics on the bipolar bank;
  Energy            4 states, with or without the gradient;
  Sample            count 4, 6 schedule steps;
  SampleStream      the same, every frame read.

Some clients instead make calls with a 1 ms deadline (rows "<kind>@1ms": they
are expected to end in DEADLINE_EXCEEDED most of the time) and two are slow
readers of SampleStream (32 samples, 16 steps, 200 ms sleep between frames,
every third stream cancelled by the client after two frames). Every call has
a deadline (--deadline, default 20 s), so the run ends at most that long
after --seconds. When the request messages have a `queue_timeout_ms` field,
a quarter of the normal calls set one (1, 10, 100 or 1000 ms).

Status codes: OK, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are expected,
CANCELLED only on a call the client cancelled; anything else (UNKNOWN,
INTERNAL, UNAVAILABLE, ...) and malformed replies count as unexpected.

After the soak, a continuous-batching phase (--cb-queries, --cb-threads)
sends single-query SYNC Retrieve calls from many threads until that many
have been answered, and reports queries/s, the mean batch the server formed
(engram_batch_queries) and the RSS before and after.

The report gives, per RPC kind, the calls, the OK calls and their p50 / p99
latency, and the other codes; the server's threads and RSS at warm-up (10 %
of the run), middle and end, the peak thread count and the RSS growth end vs
warm; and the scheduler metrics (engram_scheduler_queue_depth,
engram_scheduler_queue_wait_seconds, engram_scheduler_rejected_total) when
/metrics has them.

--check turns the report into pass / fail (exit 1 on a failure):
  - no unexpected status code, in the soak or the batching phase;
  - RSS growth at most --rss-growth-max percent (10): in the soak, the end
    against the peak of the first half after warm-up (warm .. middle: the
    number of bank versions pinned by readers varies, so single samples
    swing by a version's size); in the batching phase, after vs before (not asserted on a sanitizer build,
    whose allocator keeps freed memory in quarantine);
  - after warm-up, the thread count never above warm + --thread-slack (4)
    and at the end within --thread-slack of warm;
  - at least --min-ok-kinds (90 %) of the RPC kinds (the 1 ms rows aside)
    with one OK call;
  - the server alive at the end and exiting 0 on SIGTERM.
Latencies and throughput are reported, never asserted: a slow machine only
makes the figures worse.

To find which calls a growth comes from, narrow the load: --mix sets the
weights of the normal clients' kinds (e.g. --mix Store=0,Sample=0),
--tiny-clients and --slow-readers the number of clients in those roles.
The JSON report holds the per-second timeline of threads and RSS.
"""
import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import engram_harness  # noqa: E402
import grpc  # noqa: E402

EXPECTED = {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
LSE_BANK = "soak_lse"
BIPOLAR_BANK = "soak_bipolar"
BIPOLAR_DIM = 128
BIPOLAR_PATTERNS = 12
STORE_BATCH = 4
STORE_HELD = 16          # patterns each client keeps in the LSE bank
TINY_DEADLINE = 0.001    # seconds
SLOW_READ_SLEEP = 0.2    # seconds between frames of a slow reader
SCHEDULER_METRICS = ("engram_scheduler_queue_depth", "engram_scheduler_queue_wait_seconds",
                     "engram_scheduler_rejected_total")


class BadResponse(Exception):
    """A reply with the wrong shape: counted as an unexpected code."""


# ---------------------------------------------------------------------------
# Recording


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.lat = collections.defaultdict(list)          # kind -> OK latencies (s)
        self.codes = collections.defaultdict(collections.Counter)  # kind -> code -> n
        self.unexpected = collections.Counter()           # "kind code" -> n
        self.examples = {}                                # "kind code" -> first detail

    def ok(self, kind, seconds):
        with self.lock:
            self.lat[kind].append(seconds)
            self.codes[kind]["OK"] += 1

    def error(self, kind, code, detail="", expected=None):
        if expected is None:
            expected = code in EXPECTED
        with self.lock:
            self.codes[kind][code] += 1
            if not expected:
                key = "%s %s" % (kind, code)
                self.unexpected[key] += 1
                self.examples.setdefault(key, detail[:300])

    def kinds(self):
        return sorted(self.codes)

    def summary(self):
        out = {}
        with self.lock:
            for kind in sorted(self.codes):
                lat = np.array(self.lat.get(kind, []), dtype=np.float64) * 1e3
                c = self.codes[kind]
                out[kind] = {
                    "calls": int(sum(c.values())),
                    "ok": int(c.get("OK", 0)),
                    "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
                    "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
                    "codes": {k: int(v) for k, v in sorted(c.items()) if k != "OK"},
                }
        return out


def timed(rec, kind, fn, expect_cancel=False):
    """Runs fn(); records its latency when OK or its status code."""
    t = time.perf_counter()
    try:
        fn()
    except grpc.RpcError as e:
        code = e.code().name if e.code() is not None else "NONE"
        expected = code in EXPECTED or (code == "CANCELLED" and expect_cancel)
        rec.error(kind, code, "%s" % (e.details(),), expected)
        return False
    except BadResponse as e:
        rec.error(kind, "BAD_RESPONSE", str(e), False)
        return False
    except Exception as e:  # noqa: BLE001 -- a client bug must show, not kill the thread
        rec.error(kind, "CLIENT_" + type(e).__name__, repr(e), False)
        return False
    rec.ok(kind, time.perf_counter() - t)
    return True


# ---------------------------------------------------------------------------
# Server sampling


def proc_status(pid):
    """(threads, VmRSS, RssAnon in KiB) of a process, or None once it is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            text = f.read()
    except OSError:
        return None

    def field(name):
        m = re.search(r"^%s:\s+(\d+)" % name, text, re.M)
        return int(m.group(1)) if m else 0
    return field("Threads"), field("VmRSS"), field("RssAnon")


def thread_names(pid):
    """{thread name: count} of a process's threads ({} once it is gone)."""
    names = collections.Counter()
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            try:
                with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                    names[f.read().strip()] += 1
            except OSError:
                pass
    except OSError:
        return {}
    return dict(names)


def scrape(port, timeout=2.0):
    """Prometheus text of /metrics as {name: [(labels, value)]}; {} on failure."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=timeout) as r:
            text = r.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 -- metrics are optional
        return {}
    out = collections.defaultdict(list)
    line_re = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)")
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        try:
            out[m.group(1)].append((labels, float(m.group(4))))
        except ValueError:
            pass
    return dict(out)


def metric_sum(metrics, name, **match):
    vals = [v for labels, v in metrics.get(name, [])
            if all(labels.get(k) == w for k, w in match.items())]
    return sum(vals) if vals else None


def histogram(metrics, name):
    """{'count', 'sum', 'buckets': [(le, cumulative)]} summed over label sets, or None."""
    count = metric_sum(metrics, name + "_count")
    if count is None:
        return None
    buckets = collections.defaultdict(float)
    for labels, v in metrics.get(name + "_bucket", []):
        buckets[float(labels.get("le", "inf").replace("+Inf", "inf"))] += v
    return {"count": count, "sum": metric_sum(metrics, name + "_sum") or 0.0,
            "buckets": sorted(buckets.items())}


def hist_delta(after, before):
    if after is None:
        return None
    if before is None:
        return after
    b = dict(before["buckets"])
    return {"count": after["count"] - before["count"], "sum": after["sum"] - before["sum"],
            "buckets": [(le, v - b.get(le, 0.0)) for le, v in after["buckets"]]}


def hist_quantile(h, q):
    """Upper bucket bound holding quantile q (Prometheus-style, no interpolation)."""
    if not h or h["count"] <= 0:
        return None
    target = q * h["count"]
    for le, cum in h["buckets"]:
        if cum >= target:
            return le
    return float("inf")


class Sampler(threading.Thread):
    """Samples the server's /proc status (and queue depth) once a second."""

    def __init__(self, pid, metrics_port):
        super().__init__(daemon=True)
        self.pid = pid
        self.metrics_port = metrics_port
        self.t0 = time.monotonic()
        # (t, threads, rss_kib, queue_depth or None, rss_anon_kib, {thread name: count})
        self.samples = []
        self.stop_event = threading.Event()
        self.gone = False
        self.lock = threading.Lock()

    def sample_now(self):
        st = proc_status(self.pid)
        if st is None:
            self.gone = True
            return None
        depth = metric_sum(scrape(self.metrics_port, 0.5), "engram_scheduler_queue_depth", pool="compute")
        s = (time.monotonic() - self.t0, st[0], st[1], depth, st[2], thread_names(self.pid))
        with self.lock:
            self.samples.append(s)
        return s

    def run(self):
        while not self.stop_event.is_set():
            if self.sample_now() is None:
                return
            self.stop_event.wait(1.0)

    def stop(self):
        self.stop_event.set()
        self.join(timeout=10)

    def window(self, t_from, t_to):
        with self.lock:
            return [s for s in self.samples if t_from <= s[0] <= t_to]

    def at(self, t, half_width=1.5):
        """Median (threads, rss) of the samples within half_width of t (else the nearest)."""
        with self.lock:
            near = [s for s in self.samples if abs(s[0] - t) <= half_width]
            if not near and self.samples:
                near = [min(self.samples, key=lambda s: abs(s[0] - t))]
        if not near:
            return None, None, None
        return (int(np.median([s[1] for s in near])), int(np.median([s[2] for s in near])),
                int(np.median([s[4] for s in near])))


def sanitizer_build(binary, pid):
    try:
        with open("/proc/%d/maps" % pid) as f:
            if re.search(r"lib(asan|tsan|msan|hwasan)", f.read()):
                return True
    except OSError:
        pass
    try:
        with open(binary, "rb") as f:
            data = f.read()
        return b"__asan_init" in data or b"__tsan_init" in data or b"__msan_init" in data
    except OSError:
        return False


# ---------------------------------------------------------------------------
# The load


class Workload:
    def __init__(self, M, args, channels, rec, end_time):
        self.M = M
        self.pb = M["pb"]
        self.args = args
        self.channels = channels
        self.stubs = [M["rpc"].MemoryServiceStub(c) for c in channels]
        self.rec = rec
        self.end_time = end_time
        self.patterns = None      # the initial LSE patterns (for near queries)
        self.bipolar = None
        self.mix = tuple((k, args.mix.get(k, w)) for k, w in self.MIX)
        self.qt_fields = {
            name: "queue_timeout_ms" in getattr(self.pb, name).DESCRIPTOR.fields_by_name
            for name in ("RetrieveRequest", "EnergyRequest", "SampleRequest")}

    # -- setup ---------------------------------------------------------------

    def setup(self, seed=1):
        pb, stub = self.pb, self.stubs[0]
        rng = np.random.default_rng(seed)
        stub.CreateBank(pb.CreateBankRequest(
            name=LSE_BANK, dim=self.args.dim, kind=pb.STATE_KIND_CONTINUOUS,
            energy=pb.EnergyConfig(family=pb.ENERGY_FAMILY_LSE, beta=8.0)), timeout=30)
        x = rng.standard_normal((self.args.patterns, self.args.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        self.patterns = x
        for i in range(0, len(x), 500):
            chunk = x[i:i + 500]
            stub.Store(pb.StoreRequest(bank=LSE_BANK, patterns=chunk.ravel().tolist(),
                                       ids=list(range(1 + i, 1 + i + len(chunk)))), timeout=60)
        stub.CreateBank(pb.CreateBankRequest(
            name=BIPOLAR_BANK, dim=BIPOLAR_DIM, kind=pb.STATE_KIND_BIPOLAR), timeout=30)
        b = np.where(rng.random((BIPOLAR_PATTERNS, BIPOLAR_DIM)) < 0.5, -1.0, 1.0)
        self.bipolar = b.astype(np.float32)
        stub.Store(pb.StoreRequest(bank=BIPOLAR_BANK, patterns=self.bipolar.ravel().tolist()),
                   timeout=60)

    # -- helpers -------------------------------------------------------------

    def deadline(self):
        return self.args.deadline

    def near_queries(self, rng, count, noise=0.15):
        rows = self.patterns[rng.integers(0, len(self.patterns), count)]
        q = rows + noise * rng.standard_normal(rows.shape).astype(np.float32) / np.sqrt(
            self.args.dim)
        return q.astype(np.float32)

    def queue_timeout(self, msg, rng):
        if self.qt_fields.get(type(msg).__name__) and rng.random() < 0.25:
            msg.queue_timeout_ms = int(rng.choice([1, 10, 100, 1000]))
        return msg

    def sample_request(self, rng, count, steps, bank=LSE_BANK):
        pb = self.pb
        return pb.SampleRequest(
            bank=bank, count=count, seed=int(rng.integers(1, 1 << 62)),
            schedule=pb.Schedule(sigma_max=2.0, sigma_min=0.01, steps=steps))

    # -- the calls (each raises grpc.RpcError or BadResponse) ----------------

    def call_retrieve(self, stub, rng, timeout, qt=True):
        q = self.near_queries(rng, 1)
        req = self.pb.RetrieveRequest(bank=LSE_BANK, queries=q.ravel().tolist())
        if qt:
            self.queue_timeout(req, rng)
        r = stub.Retrieve(req, timeout=timeout)
        if len(r.results) != 1 or len(r.results[0].state) != self.args.dim:
            raise BadResponse("Retrieve: %d results" % len(r.results))

    def call_retrieve_batch(self, stub, rng, timeout, qt=True):
        b = int(rng.integers(8, 33))
        q = self.near_queries(rng, b)
        req = self.pb.RetrieveRequest(bank=LSE_BANK, queries=q.ravel().tolist())
        if qt:
            self.queue_timeout(req, rng)
        r = stub.Retrieve(req, timeout=timeout)
        if len(r.results) != b:
            raise BadResponse("Retrieve.batch: %d results for %d queries" % (len(r.results), b))

    def call_retrieve_async(self, stub, rng, timeout, qt=True):
        pb = self.pb
        x = self.bipolar[rng.integers(0, BIPOLAR_PATTERNS)].copy()
        flip = rng.random(BIPOLAR_DIM) < 0.1
        x[flip] = -x[flip]
        req = pb.RetrieveRequest(
            bank=BIPOLAR_BANK, queries=x.tolist(),
            options=pb.RetrieveOptions(dynamics=pb.DYNAMICS_ASYNC, max_steps=10,
                                       seed=int(rng.integers(1, 1 << 62))))
        if qt:
            self.queue_timeout(req, rng)
        r = stub.Retrieve(req, timeout=timeout)
        if len(r.results) != 1:
            raise BadResponse("Retrieve.async: %d results" % len(r.results))

    def call_energy(self, stub, rng, timeout, qt=True):
        x = self.near_queries(rng, 4, noise=0.5)
        grad = bool(rng.random() < 0.5)
        req = self.pb.EnergyRequest(bank=LSE_BANK, states=x.ravel().tolist(),
                                    return_gradient=grad)
        if qt:
            self.queue_timeout(req, rng)
        r = stub.Energy(req, timeout=timeout)
        if len(r.energies) != 4 or (grad and len(r.gradients) != 4 * self.args.dim):
            raise BadResponse("Energy: %d energies" % len(r.energies))

    def call_sample(self, stub, rng, timeout, qt=True):
        req = self.sample_request(rng, 4, 6)
        if qt:
            self.queue_timeout(req, rng)
        r = stub.Sample(req, timeout=timeout)
        if len(r.samples) != 4:
            raise BadResponse("Sample: %d samples" % len(r.samples))

    def call_stream(self, stub, rng, timeout, qt=True, count=4, steps=6, sleep=0.0,
                    cancel_after=None):
        req = self.sample_request(rng, count, steps)
        if qt:
            self.queue_timeout(req, rng)
        call = stub.SampleStream(req, timeout=timeout)
        frames, last = 0, None
        for frame in call:
            frames += 1
            last = frame
            if cancel_after is not None and frames >= cancel_after:
                call.cancel()
                # The iterator now raises CANCELLED; drain it to see the code.
            if sleep:
                time.sleep(sleep)
        if cancel_after is not None:
            return  # the stream ended before the cancel took effect: a plain OK
        if last is None or len(last.result.samples) != count:
            raise BadResponse("SampleStream: %d frames, last without the result" % frames)

    def call_store(self, stub, rng, timeout, client):
        """Stores STORE_BATCH new patterns; deletes the client's oldest ones
        once it holds more than STORE_HELD. Two kinds: Store, DeletePatterns."""
        pb = self.pb
        held = client["held"]
        if len(held) >= STORE_HELD:
            ids = [held.popleft() for _ in range(STORE_BATCH)]
            # Ids whose delete did not come back OK are forgotten (it may or
            # may not have been applied): the bank stays bounded either way.
            timed(self.rec, "DeletePatterns", lambda: self._delete(stub, ids, timeout))
            return
        x = rng.standard_normal((STORE_BATCH, self.args.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [client["next_id"] + k for k in range(STORE_BATCH)]
        client["next_id"] += STORE_BATCH
        payloads = [b"soak-%d" % i for i in ids]

        def store():
            r = stub.Store(pb.StoreRequest(bank=LSE_BANK, patterns=x.ravel().tolist(), ids=ids,
                                           payloads=payloads), timeout=timeout)
            if list(r.ids) != ids:
                raise BadResponse("Store: ids %s for %s" % (list(r.ids)[:4], ids[:4]))

        if timed(self.rec, "Store", store):
            held.extend(ids)

    def _delete(self, stub, ids, timeout):
        r = stub.DeletePatterns(self.pb.DeletePatternsRequest(bank=LSE_BANK, ids=ids),
                                timeout=timeout)
        if r.deleted != len(ids):
            raise BadResponse("DeletePatterns: %d deleted of %d" % (r.deleted, len(ids)))

    # -- client loops ----------------------------------------------------------

    MIX = (("Retrieve", 3), ("Retrieve.batch", 1), ("Retrieve.async", 1), ("Energy", 2),
           ("Sample", 1), ("SampleStream", 1), ("Store", 1))
    TINY_KINDS = ("Retrieve", "Retrieve.batch", "Retrieve.async", "Energy", "Sample",
                  "SampleStream")

    def run_call(self, kind, stub, rng, timeout, qt=True):
        fn = {"Retrieve": self.call_retrieve, "Retrieve.batch": self.call_retrieve_batch,
              "Retrieve.async": self.call_retrieve_async, "Energy": self.call_energy,
              "Sample": self.call_sample, "SampleStream": self.call_stream}[kind]
        return lambda: fn(stub, rng, timeout, qt)

    def think(self, rng):
        if self.args.think_ms > 0:
            time.sleep(rng.uniform(0, 2 * self.args.think_ms) / 1e3)

    def normal_client(self, index):
        rng = np.random.default_rng(1000 + index)
        stub = self.stubs[index % len(self.stubs)]
        kinds = [k for k, _ in self.mix]
        w = np.array([w for _, w in self.mix], dtype=np.float64)
        w /= w.sum()
        client = {"held": collections.deque(), "next_id": (index + 1) << 32}
        while time.monotonic() < self.end_time:
            kind = kinds[rng.choice(len(kinds), p=w)]
            if kind == "Store":
                self.call_store(stub, rng, self.deadline(), client)
            else:
                timed(self.rec, kind, self.run_call(kind, stub, rng, self.deadline()))
            self.think(rng)

    def tiny_client(self, index):
        rng = np.random.default_rng(2000 + index)
        stub = self.stubs[index % len(self.stubs)]
        tiny_kinds = [k for k in self.TINY_KINDS if dict(self.mix).get(k, 0) > 0]
        if not tiny_kinds:
            return
        while time.monotonic() < self.end_time:
            kind = tiny_kinds[rng.integers(0, len(tiny_kinds))]
            timed(self.rec, kind + "@1ms", self.run_call(kind, stub, rng, TINY_DEADLINE, False))
            self.think(rng)

    def slow_reader(self, index):
        rng = np.random.default_rng(3000 + index)
        stub = self.stubs[index % len(self.stubs)]
        n = 0
        while time.monotonic() < self.end_time:
            n += 1
            cancel = 2 if n % 3 == 0 else None
            timed(self.rec, "SampleStream.slow",
                  lambda: self.call_stream(stub, rng, self.deadline(), qt=False, count=32,
                                           steps=16, sleep=SLOW_READ_SLEEP, cancel_after=cancel),
                  expect_cancel=cancel is not None)

    def roles(self):
        n = self.args.clients
        slow = min(self.args.slow_readers, n)
        tiny = self.args.tiny_clients
        if tiny is None:
            tiny = max(1, n // 8) if n > 2 else 0
        tiny = min(tiny, n - slow)
        roles = ["slow"] * slow + ["tiny"] * tiny
        return roles + ["normal"] * (n - len(roles))


def soak(args, M, server, sampler, channels):
    rec = Recorder()
    wl = Workload(M, args, channels, rec, time.monotonic() + args.seconds)
    wl.setup()
    roles = wl.roles()
    metrics_before = scrape(server.metrics_port)
    t_start = time.monotonic() - sampler.t0
    threads = []
    start = time.monotonic()
    wl.end_time = start + args.seconds
    for i, role in enumerate(roles):
        target = {"normal": wl.normal_client, "tiny": wl.tiny_client,
                  "slow": wl.slow_reader}[role]
        t = threading.Thread(target=target, args=(i,), daemon=True, name="%s-%d" % (role, i))
        t.start()
        threads.append(t)
    hard_stop = wl.end_time + args.deadline + 15
    for t in threads:
        t.join(timeout=max(0.0, hard_stop - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    t_end = time.monotonic() - sampler.t0
    load_seconds = time.monotonic() - start
    sampler.sample_now()
    metrics_after = scrape(server.metrics_port)

    T = args.seconds
    warm_t, mid_t, end_t = t_start + args.warm_fraction * T, t_start + 0.5 * T, t_start + T
    thr_warm, rss_warm, anon_warm = sampler.at(warm_t)
    thr_mid, rss_mid, anon_mid = sampler.at(mid_t)
    # End: the last samples while the load still ran.
    thr_end, rss_end, anon_end = sampler.at(end_t - 1.5)
    post = sampler.window(warm_t, end_t)
    first_half_peak = max((x[2] for x in sampler.window(warm_t, mid_t)), default=None)
    pre = sampler.window(0, t_start)
    return {
        "roles": dict(collections.Counter(roles)),
        "queue_timeout_ms_field": wl.qt_fields,
        "load_seconds": load_seconds,
        "hung_clients": hung,
        "rpc": rec.summary(),
        "unexpected": dict(rec.unexpected),
        "unexpected_examples": rec.examples,
        "threads": {
            "idle": pre[-1][1] if pre else None,
            "warm": thr_warm, "mid": thr_mid, "end": thr_end,
            "peak": max((s[1] for s in sampler.window(t_start, t_end)), default=None),
            "peak_after_warm": max((s[1] for s in post), default=None),
            "min_after_warm": min((s[1] for s in post), default=None),
            "names_warm": min(post, key=lambda s: abs(s[0] - warm_t))[5] if post else {},
            "names_peak": max(post, key=lambda s: s[1])[5] if post else {},
        },
        "rss_kib": {
            "idle": pre[-1][2] if pre else None,
            "warm": rss_warm, "mid": rss_mid, "end": rss_end,
            "peak": max((s[2] for s in sampler.window(t_start, t_end)), default=None),
            # Against the first half's peak: the server holds a varying
            # number of bank versions (a Store copies a bank that readers
            # have pinned), so single samples swing by a version's size; a
            # leak shows as an end above everything the first half reached.
            "first_half_peak": first_half_peak,
            "growth_pct": (100.0 * (rss_end - first_half_peak) / first_half_peak)
            if first_half_peak else None,
        },
        "rss_anon_kib": {"warm": anon_warm, "mid": anon_mid, "end": anon_end},
        "timeline": [{"t": round(x[0], 2), "threads": x[1], "rss_kib": x[2], "rss_anon_kib": x[4],
                      "queue_depth": x[3]} for x in sampler.window(0, t_end)],
        "queue_depth_peak": max((s[3] for s in sampler.window(t_start, t_end)
                                 if s[3] is not None), default=None),
        "metrics": metric_report(metrics_before, metrics_after),
        "kinds": [k for k in rec.kinds() if not k.endswith("@1ms")],
        "patterns": wl.patterns,
    }


def metric_report(before, after):
    out = {"scheduler_present": any(n in after or n + "_count" in after
                                    for n in SCHEDULER_METRICS)}
    rej_a = metric_sum(after, "engram_scheduler_rejected_total")
    if rej_a is not None:
        out["rejected"] = rej_a - (metric_sum(before, "engram_scheduler_rejected_total") or 0.0)
        reasons = collections.Counter()
        for sign, m in ((1, after), (-1, before)):
            for labels, v in m.get("engram_scheduler_rejected_total", []):
                reasons[labels.get("reason", "?")] += sign * v
        out["rejected_by_reason"] = {k: int(v) for k, v in sorted(reasons.items()) if v}
    execs = metric_sum(after, "engram_scheduler_executor_threads", pool="compute")
    if execs is not None:
        out["executor_threads"] = int(execs)
    wait = hist_delta(histogram(after, "engram_scheduler_queue_wait_seconds"),
                      histogram(before, "engram_scheduler_queue_wait_seconds"))
    if wait is not None:
        out["queue_wait"] = {
            "count": wait["count"],
            "mean_ms": 1e3 * wait["sum"] / wait["count"] if wait["count"] > 0 else None,
            "p50_le_ms": _ms(hist_quantile(wait, 0.5)),
            "p99_le_ms": _ms(hist_quantile(wait, 0.99)),
        }
    # The server's own view (grpc_server_handled_total), by code and by
    # method + code.
    handled, by_method = collections.Counter(), collections.Counter()
    for sign, m in ((1, after), (-1, before)):
        for labels, v in m.get("grpc_server_handled_total", []):
            code = labels.get("grpc_code", labels.get("code", "?"))
            handled[code] += sign * v
            by_method["%s %s" % (labels.get("grpc_method", "?"), code)] += sign * v
    if handled:
        out["server_handled"] = {k: int(v) for k, v in sorted(handled.items()) if v}
        out["server_handled_by_method"] = {k: int(v) for k, v in sorted(by_method.items()) if v}
    return out


def _ms(x):
    if x is None:
        return None
    return x * 1e3 if x != float("inf") else float("inf")


# ---------------------------------------------------------------------------
# Continuous batching phase


def cb_phase(args, M, server, sampler, channels, patterns):
    pb = M["pb"]
    stubs = [M["rpc"].MemoryServiceStub(c) for c in channels]
    rng = np.random.default_rng(7)
    pool = []
    for _ in range(1024):
        q = patterns[rng.integers(0, len(patterns))] + 0.15 * rng.standard_normal(
            args.dim).astype(np.float32) / np.sqrt(args.dim)
        pool.append(pb.RetrieveRequest(bank=LSE_BANK, queries=q.astype(np.float32).tolist()))
    rec = Recorder()
    lock = threading.Lock()
    state = {"issued": 0}

    def worker(i):
        stub = stubs[i % len(stubs)]
        n = i
        while True:
            with lock:
                if state["issued"] >= args.cb_queries:
                    return
                if time.monotonic() > stop_at:
                    state["capped"] = True
                    return
                state["issued"] += 1
            req = pool[n % len(pool)]
            n += 7

            def call():
                r = stub.Retrieve(req, timeout=args.deadline)
                if len(r.results) != 1:
                    raise BadResponse("Retrieve: %d results" % len(r.results))
            timed(rec, "Retrieve.cb", call)

    time.sleep(1.0)
    before = sampler.sample_now()
    m_before = scrape(server.metrics_port)
    t0 = time.monotonic()
    # Bounded in time too: no call starts after max(60 s, --seconds).
    stop_at = t0 + max(60.0, args.seconds)
    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.cb_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.monotonic() - t0
    after = sampler.sample_now()
    m_after = scrape(server.metrics_port)
    s = rec.summary().get("Retrieve.cb", {"ok": 0, "calls": 0, "codes": {}})
    bq = hist_delta(histogram(m_after, "engram_batch_queries"),
                    histogram(m_before, "engram_batch_queries"))
    window = sampler.window(before[0] if before else 0, after[0] if after else 1e18)
    rss_b = before[2] if before else None
    rss_a = after[2] if after else None
    return {
        "queries": args.cb_queries, "threads": args.cb_threads,
        "time_capped": state.get("capped", False),
        "answered": s["ok"], "seconds": elapsed,
        "qps": s["ok"] / elapsed if elapsed > 0 else None,
        "p50_ms": s.get("p50_ms"), "p99_ms": s.get("p99_ms"),
        "codes": s["codes"],
        "unexpected": dict(rec.unexpected), "unexpected_examples": rec.examples,
        "mean_batch_queries": (bq["sum"] / bq["count"]) if bq and bq["count"] > 0 else None,
        "threads_before": before[1] if before else None,
        "threads_peak": max((w[1] for w in window), default=None),
        "threads_after": after[1] if after else None,
        "rss_kib_before": rss_b, "rss_kib_after": rss_a,
        "rss_growth_pct": 100.0 * (rss_a - rss_b) / rss_b if rss_a and rss_b else None,
    }


# ---------------------------------------------------------------------------
# Report


def fmt(x, spec="%.1f"):
    if x is None:
        return "-"
    if isinstance(x, float) and x == float("inf"):
        return "inf"
    return spec % x


def mib(kib):
    return fmt(kib / 1024.0 if kib is not None else None, "%.1f")


def print_report(rep):
    s = rep["soak"]
    print()
    print("engramd soak: %d s, %d clients (%s), %d channels; load ran %.1f s" % (
        rep["config"]["seconds"], rep["config"]["clients"],
        ", ".join("%d %s" % (v, k) for k, v in sorted(s["roles"].items())),
        rep["config"]["channels"], s["load_seconds"]))
    qt = [k for k, v in s["queue_timeout_ms_field"].items() if v]
    print("queue_timeout_ms set on: %s" % (", ".join(qt) if qt else "none (field absent)"))
    print()
    hdr = "%-20s %8s %8s %9s %9s  %s" % ("kind", "calls", "ok", "p50 ms", "p99 ms",
                                          "other codes")
    print(hdr)
    print("-" * len(hdr))
    for kind, r in s["rpc"].items():
        codes = ", ".join("%s %d" % kv for kv in r["codes"].items()) or "-"
        print("%-20s %8d %8d %9s %9s  %s" % (kind, r["calls"], r["ok"], fmt(r["p50_ms"], "%.2f"),
                                             fmt(r["p99_ms"], "%.2f"), codes))
    print()
    t, m = s["threads"], s["rss_kib"]
    print("server threads: idle %s, warm %s, mid %s, end %s; peak %s (after warm: %s..%s)" % (
        fmt(t["idle"], "%d"), fmt(t["warm"], "%d"), fmt(t["mid"], "%d"), fmt(t["end"], "%d"),
        fmt(t["peak"], "%d"), fmt(t["min_after_warm"], "%d"), fmt(t["peak_after_warm"], "%d")))
    print("  by name, warm: %s" % ", ".join("%s %d" % kv for kv in sorted(t["names_warm"].items())))
    print("  by name, peak: %s" % ", ".join("%s %d" % kv for kv in sorted(t["names_peak"].items())))
    print("server RSS MiB: idle %s, warm %s, mid %s, end %s; peak %s; growth end vs first-half "
          "peak (%s) %s %%" % (
              mib(m["idle"]), mib(m["warm"]), mib(m["mid"]), mib(m["end"]), mib(m["peak"]),
              mib(m["first_half_peak"]), fmt(m["growth_pct"], "%+.1f")))
    a = s["rss_anon_kib"]
    print("  of which anonymous: warm %s, mid %s, end %s" % (mib(a["warm"]), mib(a["mid"]),
                                                          mib(a["end"])))
    mt = s["metrics"]
    if mt.get("scheduler_present"):
        w = mt.get("queue_wait") or {}
        rej = ", ".join("%s %d" % kv for kv in mt.get("rejected_by_reason", {}).items())
        print("scheduler: %s executors, queue depth peak %s, rejected %s%s, queue wait n=%s "
              "mean %s ms p50 <= %s ms p99 <= %s ms" % (
                  fmt(mt.get("executor_threads"), "%d"),
                  fmt(s["queue_depth_peak"], "%g"), fmt(mt.get("rejected"), "%d"),
                  " (%s)" % rej if rej else "",
                  fmt(w.get("count"), "%d"), fmt(w.get("mean_ms"), "%.2f"),
                  fmt(w.get("p50_le_ms"), "%g"), fmt(w.get("p99_le_ms"), "%g")))
    else:
        print("scheduler: no engram_scheduler_* metrics on /metrics")
    if mt.get("server_handled"):
        print("server-side codes: %s" % ", ".join(
            "%s %d" % kv for kv in mt["server_handled"].items()))
        odd = {k: v for k, v in mt["server_handled_by_method"].items()
               if not k.endswith((" OK", " DeadlineExceeded", " ResourceExhausted"))}
        if odd:
            print("  of which: %s" % ", ".join("%s %d" % kv for kv in odd.items()))
    if s["unexpected"]:
        print("UNEXPECTED:")
        for k, v in sorted(s["unexpected"].items()):
            print("  %-40s %6d  e.g. %s" % (k, v, s["unexpected_examples"].get(k, "")))
    cb = rep.get("cb")
    if cb:
        print()
        print("continuous batching: %d single-query Retrieve from %d threads: %d answered in "
              "%.1f s = %s q/s; p50 %s ms p99 %s ms; mean batch %s queries" % (
                  cb["queries"], cb["threads"], cb["answered"], cb["seconds"],
                  fmt(cb["qps"], "%.0f"), fmt(cb["p50_ms"], "%.2f"), fmt(cb["p99_ms"], "%.2f"),
                  fmt(cb["mean_batch_queries"], "%.1f")))
        if cb["time_capped"]:
            print("  stopped at the time cap of max(60 s, --seconds)")
        print("  other codes: %s; threads %s -> peak %s -> %s; RSS MiB %s -> %s (%s %%)" % (
            ", ".join("%s %d" % kv for kv in cb["codes"].items()) or "-",
            fmt(cb["threads_before"], "%d"), fmt(cb["threads_peak"], "%d"),
            fmt(cb["threads_after"], "%d"), mib(cb["rss_kib_before"]),
            mib(cb["rss_kib_after"]), fmt(cb["rss_growth_pct"], "%+.1f")))
        for k, v in sorted(cb["unexpected"].items()):
            print("  UNEXPECTED %-30s %6d  e.g. %s" % (k, v, cb["unexpected_examples"].get(k, "")))
    print()
    print("server: exit code %s after SIGTERM%s" % (
        rep["server"]["exit_code"], ", sanitizer build" if rep["server"]["sanitizer"] else ""))
    if rep.get("checks"):
        print()
        for c in rep["checks"]:
            print("%-5s %-28s %s" % ("ok" if c["ok"] else "FAIL", c["name"], c["detail"]))
        print("soak: %s" % ("PASSED" if rep["passed"] else "FAILED"))


def checks(args, rep):
    s, cb, out = rep["soak"], rep.get("cb"), []

    def add(name, ok, detail):
        out.append({"name": name, "ok": bool(ok), "detail": detail})

    unexpected = dict(s["unexpected"])
    if cb:
        unexpected.update({"cb " + k: v for k, v in cb["unexpected"].items()})
    add("unexpected status codes", not unexpected,
        ", ".join("%s x%d" % kv for kv in sorted(unexpected.items())) or "none")
    add("clients finished", not s["hung_clients"],
        "%d still running" % len(s["hung_clients"]) if s["hung_clients"] else "all")
    sanitizer = rep["server"]["sanitizer"]
    g = s["rss_kib"]["growth_pct"]
    if args.rss_growth_max < 0 or sanitizer:
        add("RSS growth (soak)", True, "not asserted (%s): %s %%" % (
            "sanitizer build" if sanitizer else "disabled", fmt(g, "%+.1f")))
    else:
        add("RSS growth (soak)", g is not None and g <= args.rss_growth_max,
            "%s %% end vs first-half peak (limit %g %%)" % (fmt(g, "%+.1f"),
                                                             args.rss_growth_max))
    if cb:
        g = cb["rss_growth_pct"]
        if args.rss_growth_max < 0 or sanitizer:
            add("RSS growth (batching)", True, "not asserted: %s %%" % fmt(g, "%+.1f"))
        else:
            add("RSS growth (batching)", g is not None and g <= args.rss_growth_max,
                "%s %% after vs before (limit %g %%)" % (fmt(g, "%+.1f"), args.rss_growth_max))
    t = s["threads"]
    if t["warm"] is None or t["end"] is None:
        add("thread count", False, "no samples")
    else:
        up = t["peak_after_warm"] - t["warm"]
        drift = t["end"] - t["warm"]
        add("thread count", up <= args.thread_slack and abs(drift) <= args.thread_slack,
            "warm %d, peak after warm %d (+%d), end %d (%+d); slack %d" % (
                t["warm"], t["peak_after_warm"], up, t["end"], drift, args.thread_slack))
    kinds = s["kinds"]
    with_ok = [k for k in kinds if s["rpc"][k]["ok"] > 0]
    frac = len(with_ok) / len(kinds) if kinds else 0.0
    add("RPC kinds with an OK call", frac >= args.min_ok_kinds,
        "%d of %d (%s)" % (len(with_ok), len(kinds),
                           ", ".join(k for k in kinds if k not in with_ok) or "all"))
    add("server alive and exit 0", rep["server"]["alive_at_end"] and rep["server"]["exit_code"] == 0,
        "alive at end: %s, exit code %s" % (rep["server"]["alive_at_end"],
                                           rep["server"]["exit_code"]))
    return out


def _die_with_parent():
    """In the child before exec: SIGKILL when this script dies (e.g. killed
    by a test timeout), so no engramd is left behind."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 -- best effort
        pass


def start_server(args, data_dir, timeout=30.0):
    """engram_harness.Engramd.start, with the engramd tied to this process."""
    server = engram_harness.Engramd(args.engramd, data_dir, extra_args=args.server_arg)
    os.makedirs(data_dir, exist_ok=True)
    server.log = open(server.log_path, "ab")
    server.proc = subprocess.Popen(
        [server.binary, "--listen", server.target, "--data_dir", data_dir,
         "--metrics_listen", "127.0.0.1:%d" % server.metrics_port] + server.extra_args,
        stdout=server.log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    channel = server.channel()
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        server.kill()
        raise RuntimeError("engramd did not start: " + open(server.log_path).read())
    finally:
        channel.close()
    return server


def parse_mix(text):
    known = dict(Workload.MIX)
    out = {}
    for item in filter(None, text.split(",")):
        k, _, w = item.partition("=")
        if k not in known:
            raise argparse.ArgumentTypeError("unknown kind %r (known: %s)" % (k, ", ".join(known)))
        out[k] = float(w)
    if not any(out.get(k, w) > 0 for k, w in known.items()):
        raise argparse.ArgumentTypeError("every weight is 0")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600, help="length of the soak")
    ap.add_argument("--clients", type=int, default=64, help="concurrent client threads")
    ap.add_argument("--channels", type=int, default=8,
                    help="gRPC channels (connections) the clients share")
    ap.add_argument("--engramd", default=os.path.join(ROOT, "build", "server", "engramd"))
    ap.add_argument("--proto-dir", default=os.path.join(ROOT, "proto"))
    ap.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    ap.add_argument("--check", action="store_true", help="exit 1 when a check fails")
    ap.add_argument("--cb-queries", type=int, default=100000,
                    help="queries of the continuous-batching phase (0 skips it)")
    ap.add_argument("--cb-threads", type=int, default=32)
    ap.add_argument("--patterns", type=int, default=2000, help="rows of the LSE bank")
    ap.add_argument("--dim", type=int, default=784, help="dimension of the LSE bank")
    ap.add_argument("--deadline", type=float, default=20.0,
                    help="deadline of every normal call, seconds")
    ap.add_argument("--think-ms", type=float, default=10.0,
                    help="mean pause of a client between calls (uniform 0..2x)")
    ap.add_argument("--slow-readers", type=int, default=2,
                    help="clients that read SampleStream slowly")
    ap.add_argument("--tiny-clients", type=int, default=None,
                    help="clients whose calls have a 1 ms deadline (default: --clients / 8)")
    ap.add_argument("--mix", type=parse_mix, default={},
                    help="weights of the normal clients' mix, e.g. Retrieve=3,Store=0 (defaults: "
                         + ",".join("%s=%g" % kw for kw in Workload.MIX) + "); a kind at 0 is "
                         "also left out of the 1 ms calls")
    ap.add_argument("--warm-fraction", type=float, default=0.1,
                    help="the warm-up point, as a fraction of --seconds")
    ap.add_argument("--rss-growth-max", type=float, default=10.0,
                    help="--check: largest RSS growth in percent (negative: not asserted)")
    ap.add_argument("--thread-slack", type=int, default=4,
                    help="--check: thread count change allowed after warm-up")
    ap.add_argument("--min-ok-kinds", type=float, default=0.9,
                    help="--check: fraction of RPC kinds that need an OK call")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra engramd flag (repeatable), e.g. --server-arg=--batching=0")
    ap.add_argument("--keep", action="store_true", help="keep the data directory and log")
    args = ap.parse_args()
    if args.seconds <= 0 or args.clients < 1 or args.channels < 1:
        ap.error("--seconds, --clients and --channels must be positive")

    work = tempfile.mkdtemp(prefix="engram_soak_")
    M = engram_harness.generate_stubs(args.proto_dir, os.path.join(work, "stubs"))
    server = start_server(args, os.path.join(work, "data"))
    pid = server.proc.pid
    sanitizer = sanitizer_build(args.engramd, pid)
    options = [("grpc.max_receive_message_length", 64 << 20),
               ("grpc.max_send_message_length", 64 << 20),
               ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(server.target, options=options)
                for _ in range(args.channels)]
    sampler = Sampler(pid, server.metrics_port)
    sampler.start()
    rep = {"config": {k: v for k, v in vars(args).items()}, "server": {"sanitizer": sanitizer}}
    exit_code = None
    try:
        time.sleep(1.5)  # idle samples
        s = soak(args, M, server, sampler, channels)
        patterns = s.pop("patterns")
        rep["soak"] = s
        if args.cb_queries > 0 and server.proc.poll() is None:
            rep["cb"] = cb_phase(args, M, server, sampler, channels, patterns)
        rep["server"]["alive_at_end"] = server.proc.poll() is None
    finally:
        sampler.stop()
        for c in channels:
            c.close()
        if server.proc.poll() is None:
            try:
                exit_code = server.terminate(timeout=30)
            except Exception:  # noqa: BLE001 -- a hang on shutdown is reported
                server.kill()
                exit_code = "hung on SIGTERM"
        else:
            exit_code = server.proc.returncode
            server._close_log()
        rep["server"]["exit_code"] = exit_code
        rep["server"].setdefault("alive_at_end", False)
        log_tail = ""
        try:
            with open(server.log_path, errors="replace") as f:
                log_tail = f.read()[-3000:]
        except OSError:
            pass
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print("kept %s" % work, file=sys.stderr)

    if args.check:
        rep["checks"] = checks(args, rep)
        rep["passed"] = all(c["ok"] for c in rep["checks"])
    print_report(rep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2, sort_keys=True, default=str)
    if args.check and not rep["passed"]:
        if log_tail:
            print("\nengramd log (tail):\n" + log_tail, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())

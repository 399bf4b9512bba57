#!/usr/bin/env python3
"""Static checks of the Kubernetes manifests in deploy/k8s/ (no cluster here):
a StatefulSet with a volume claim template mounted at the data directory, a
headless Service governing it and a client Service for gRPC and metrics,
readiness / liveness / startup probes through gRPC health, resource requests
and limits, configuration through a ConfigMap whose keys engramd reads, and a
user that matches the image's.

  /usr/bin/python3 tests/docker/k8s_manifest_test.py --repo .
"""
import argparse
import glob
import os
import re
import sys
import unittest

import yaml

ARGS = None

_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}


def quantity(q):
    """A Kubernetes resource quantity ("500m", "2Gi", 3) as a float."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    if not m or m.group(2) not in _UNITS:
        raise ValueError("not a quantity: %r" % (q,))
    return float(m.group(1)) * _UNITS[m.group(2)]


def port_of(address):
    return int(address.rsplit(":", 1)[1])


class K8sManifestTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.docs = []
        files = sorted(glob.glob(os.path.join(ARGS.repo, "deploy", "k8s", "*.yaml")))
        assert files, "no manifests under deploy/k8s"
        for path in files:
            with open(path) as f:
                cls.docs += [d for d in yaml.safe_load_all(f) if d]
        cls.by_kind = {}
        for d in cls.docs:
            cls.by_kind.setdefault(d["kind"], []).append(d)
        cls.sts = cls.by_kind["StatefulSet"][0]
        cls.pod = cls.sts["spec"]["template"]["spec"]
        cls.container = next(c for c in cls.pod["containers"] if c["name"] == "engramd")
        cls.ports = {p["name"]: p["containerPort"] for p in cls.container["ports"]}
        cls.config = {}
        for src in cls.container.get("envFrom", []):
            name = src["configMapRef"]["name"]
            cm = next(d for d in cls.by_kind["ConfigMap"] if d["metadata"]["name"] == name)
            cls.config.update(cm["data"])
        for e in cls.container.get("env", []):
            cls.config[e["name"]] = e.get("value")

    def test_every_document_has_api_version_kind_and_name(self):
        for d in self.docs:
            self.assertIn("apiVersion", d)
            self.assertIn("kind", d)
            self.assertTrue(d["metadata"]["name"], d)

    def test_statefulset_selects_its_pods(self):
        self.assertEqual(self.sts["apiVersion"], "apps/v1")
        labels = self.sts["spec"]["template"]["metadata"]["labels"]
        for k, v in self.sts["spec"]["selector"]["matchLabels"].items():
            self.assertEqual(labels.get(k), v)
        self.assertGreaterEqual(self.sts["spec"]["replicas"], 1)

    def test_statefulset_is_governed_by_a_headless_service(self):
        name = self.sts["spec"]["serviceName"]
        svc = [s for s in self.by_kind["Service"] if s["metadata"]["name"] == name]
        self.assertEqual(len(svc), 1, "serviceName %s names no Service" % name)
        self.assertEqual(svc[0]["spec"].get("clusterIP"), "None",
                         "the governing Service of a StatefulSet is headless")

    def test_data_lives_on_a_volume_claim_template_mounted_at_the_data_dir(self):
        claims = {c["metadata"]["name"]: c for c in self.sts["spec"]["volumeClaimTemplates"]}
        mounts = {m["name"]: m["mountPath"] for m in self.container["volumeMounts"]}
        data_dir = self.config["ENGRAM_DATA_DIR"]
        names = [n for n, path in mounts.items() if path == data_dir]
        self.assertEqual(len(names), 1, "nothing mounted at ENGRAM_DATA_DIR=%s" % data_dir)
        claim = claims.get(names[0])
        self.assertIsNotNone(claim, "the data mount is not a volumeClaimTemplate")
        self.assertIn("ReadWriteOnce", claim["spec"]["accessModes"])
        self.assertGreater(quantity(claim["spec"]["resources"]["requests"]["storage"]), 0)

    def test_services_expose_grpc_and_metrics(self):
        pod_labels = self.sts["spec"]["template"]["metadata"]["labels"]
        clients = [s for s in self.by_kind["Service"] if s["spec"].get("clusterIP") != "None"]
        self.assertTrue(clients, "no client Service")
        for svc in self.by_kind["Service"]:
            for k, v in svc["spec"]["selector"].items():
                self.assertEqual(pod_labels.get(k), v, svc["metadata"]["name"])
            for p in svc["spec"]["ports"]:
                target = p.get("targetPort", p["port"])
                if isinstance(target, str):
                    self.assertIn(target, self.ports, "targetPort %s is no container port" % target)
        ports = {p["name"]: p for p in clients[0]["spec"]["ports"]}
        self.assertEqual(ports["grpc"]["port"], 50051)
        self.assertEqual(ports["metrics"]["port"], 9464)

    def test_probes_use_grpc_health_on_the_grpc_port(self):
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            p = self.container.get(probe)
            self.assertIsNotNone(p, probe)
            self.assertIn("grpc", p, "%s is not a gRPC health probe" % probe)
            self.assertEqual(p["grpc"]["port"], self.ports["grpc"], probe)
        # Ready means the engram service itself is SERVING.
        self.assertEqual(self.container["readinessProbe"]["grpc"].get("service"),
                         "engram.v1.MemoryService")

    def test_resources_have_requests_within_limits(self):
        res = self.container["resources"]
        for r in ("cpu", "memory"):
            self.assertLessEqual(quantity(res["requests"][r]), quantity(res["limits"][r]), r)
        budget = float(self.config.get("ENGRAM_MEMORY_BUDGET_BYTES", 0))
        self.assertGreater(budget, 0, "set a memory budget under the memory limit")
        self.assertLess(budget, quantity(res["limits"]["memory"]),
                        "the bank memory budget must leave room under the memory limit")

    def test_config_is_env_that_engramd_reads_and_matches_the_ports(self):
        main_cc = open(os.path.join(ARGS.repo, "server", "main.cc")).read()
        for key in self.config:
            self.assertIn('"%s"' % key, main_cc, "engramd reads no %s" % key)
        self.assertEqual(port_of(self.config["ENGRAM_LISTEN"]), self.ports["grpc"])
        self.assertEqual(port_of(self.config["ENGRAM_METRICS_LISTEN"]), self.ports["metrics"])
        self.assertTrue(self.config["ENGRAM_LISTEN"].startswith("0.0.0.0:"),
                        "listen on every pod address, or probes and the Service cannot reach it")

    def test_runs_as_the_images_non_root_user(self):
        dockerfile = open(os.path.join(ARGS.repo, "Dockerfile")).read()
        uid = int(re.search(r"useradd[^\n]*--uid (\d+)", dockerfile).group(1))
        sc = self.pod["securityContext"]
        self.assertTrue(sc["runAsNonRoot"])
        self.assertEqual(sc["runAsUser"], uid)
        self.assertEqual(sc["fsGroup"], uid, "the data volume must be writable by that user")


class ShardedManifestTest(unittest.TestCase):
    """deploy/k8s/sharded: shard StatefulSet + router Deployment + Services."""

    @classmethod
    def setUpClass(cls):
        path = os.path.join(ARGS.repo, "deploy", "k8s", "sharded", "engram-sharded.yaml")
        with open(path) as f:
            cls.docs = [d for d in yaml.safe_load_all(f) if d]
        cls.by_kind = {}
        for d in cls.docs:
            cls.by_kind.setdefault(d["kind"], []).append(d)
        cls.sts = cls.by_kind["StatefulSet"][0]
        cls.router = cls.by_kind["Deployment"][0]
        cls.main_cc = open(os.path.join(ARGS.repo, "server", "main.cc")).read()

    def config_of(self, workload):
        container = workload["spec"]["template"]["spec"]["containers"][0]
        config = {}
        for src in container.get("envFrom", []):
            name = src["configMapRef"]["name"]
            cm = next(d for d in self.by_kind["ConfigMap"] if d["metadata"]["name"] == name)
            config.update(cm["data"])
        return container, config

    def test_roles_and_keys_engramd_reads(self):
        for workload, role in ((self.sts, "node"), (self.router, "router")):
            _, config = self.config_of(workload)
            self.assertEqual(config["ENGRAM_ROLE"], role)
            for key in config:
                self.assertIn('"%s"' % key, self.main_cc, "engramd reads no %s" % key)

    def test_router_names_every_shard_pod_through_the_headless_service(self):
        _, config = self.config_of(self.router)
        m = re.fullmatch(r"([a-z0-9-]+)-\{0\.\.(\d+)\}\.([a-z0-9-]+):(\d+)",
                         config["ENGRAM_SHARDS"])
        self.assertIsNotNone(m, config["ENGRAM_SHARDS"])
        self.assertEqual(m.group(1), self.sts["metadata"]["name"])
        self.assertEqual(int(m.group(2)), self.sts["spec"]["replicas"] - 1,
                         "the router must name exactly the StatefulSet's pods")
        self.assertEqual(m.group(3), self.sts["spec"]["serviceName"])
        headless = next(s for s in self.by_kind["Service"]
                        if s["metadata"]["name"] == m.group(3))
        self.assertEqual(headless["spec"].get("clusterIP"), "None")
        shard_container, _ = self.config_of(self.sts)
        ports = {p["name"]: p["containerPort"] for p in shard_container["ports"]}
        self.assertEqual(int(m.group(4)), ports["grpc"])

    def test_clients_reach_the_routers_and_every_pod_has_health_probes(self):
        clients = [s for s in self.by_kind["Service"] if s["spec"].get("clusterIP") != "None"]
        self.assertEqual(len(clients), 1)
        router_labels = self.router["spec"]["template"]["metadata"]["labels"]
        for k, v in clients[0]["spec"]["selector"].items():
            self.assertEqual(router_labels.get(k), v)
        for workload in (self.sts, self.router):
            container, _ = self.config_of(workload)
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            for probe in ("readinessProbe", "livenessProbe"):
                self.assertEqual(container[probe]["grpc"]["port"], ports["grpc"], probe)
            self.assertEqual(container["readinessProbe"]["grpc"].get("service"),
                             "engram.v1.MemoryService")
        self.assertIn("volumeClaimTemplates", self.sts["spec"])


class ReplicasManifestTest(unittest.TestCase):
    """deploy/k8s/replicas: NATS JetStream StatefulSet + engramd replicas."""

    @classmethod
    def setUpClass(cls):
        path = os.path.join(ARGS.repo, "deploy", "k8s", "replicas", "engram-replicas.yaml")
        with open(path) as f:
            cls.docs = [d for d in yaml.safe_load_all(f) if d]
        cls.by_name = {(d["kind"], d["metadata"]["name"]): d for d in cls.docs}
        cls.nats = cls.by_name[("StatefulSet", "nats")]
        cls.engram = cls.by_name[("StatefulSet", "engram-replica")]
        cls.main_cc = open(os.path.join(ARGS.repo, "server", "main.cc")).read()

    def engram_config(self):
        container = self.engram["spec"]["template"]["spec"]["containers"][0]
        name = container["envFrom"][0]["configMapRef"]["name"]
        return container, self.by_name[("ConfigMap", name)]["data"]

    def test_replicas_name_every_nats_pod_and_keys_engramd_reads(self):
        _, config = self.engram_config()
        for key in config:
            self.assertIn('"%s"' % key, self.main_cc, "engramd reads no %s" % key)
        n = self.nats["spec"]["replicas"]
        service = self.nats["spec"]["serviceName"]
        self.assertEqual(self.by_name[("Service", service)]["spec"].get("clusterIP"), "None")
        want = ["nats://nats-%d.%s:4222" % (i, service) for i in range(n)]
        self.assertEqual(config["ENGRAM_LOG"].split(","), want)
        self.assertLessEqual(int(config["ENGRAM_LOG_REPLICAS"]), n)
        conf = self.by_name[("ConfigMap", "nats-config")]["data"]["nats.conf"]
        self.assertIn("jetstream", conf)
        for i in range(n):
            self.assertIn("nats://nats-%d.%s:6222" % (i, service), conf)

    def test_clients_round_robin_over_a_headless_service_and_probes_use_health(self):
        container, _ = self.engram_config()
        service = self.by_name[("Service", self.engram["spec"]["serviceName"])]
        self.assertEqual(service["spec"].get("clusterIP"), "None",
                         "round_robin over DNS needs every replica's address")
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            self.assertEqual(container[probe]["grpc"]["port"], ports["grpc"], probe)
        self.assertEqual(container["readinessProbe"]["grpc"].get("service"),
                         "engram.v1.MemoryService")
        self.assertIn("volumeClaimTemplates", self.engram["spec"])
        self.assertIn("volumeClaimTemplates", self.nats["spec"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", required=True)
    ARGS, rest = parser.parse_known_args()
    ARGS.repo = os.path.abspath(ARGS.repo)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)

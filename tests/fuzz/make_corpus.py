#!/usr/bin/env python3
"""Writes the seed corpus of service_fuzz: valid requests of every RPC, alone
and in short sequences, in the target's record format
([rpc byte][2-byte little-endian length][request bytes])*.

  /usr/bin/python3 tests/fuzz/make_corpus.py --proto-dir proto --out tests/fuzz/corpus

The banks the target preloads: "bip" (bipolar, N = 16) and "cont"
(continuous, N = 8), ids 1..6.
"""
import argparse
import os
import shutil
import struct
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import engram_harness  # noqa: E402

# Must match the Rpc enum of service_fuzz.cc.
RPCS = ["CreateBank", "GetBank", "ListBanks", "DeleteBank", "Store", "DeletePatterns",
        "GetPatterns", "Retrieve", "Energy", "Sample", "Backup", "SampleStream", "Auth"]


def record(rpc, msg):
    body = msg if isinstance(msg, bytes) else msg.SerializeToString()
    return bytes([RPCS.index(rpc)]) + struct.pack("<H", len(body)) + body


def seeds(pb):
    bip = [1.0 if (i * 5 + 3) % 3 else -1.0 for i in range(16)]
    cont = [0.5, -0.25, 1.0, 0.0, 2.0, -1.5, 0.125, 3.0]
    s = {}
    for fam in range(1, 7):
        s["create_bipolar_family%d" % fam] = [record("CreateBank", pb.CreateBankRequest(
            name="b%d" % fam, dim=12, kind=pb.STATE_KIND_BIPOLAR,
            energy=pb.EnergyConfig(family=fam, degree=3, beta=2.0)))]
        s["create_continuous_family%d" % fam] = [record("CreateBank", pb.CreateBankRequest(
            name="c%d" % fam, dim=5, kind=pb.STATE_KIND_CONTINUOUS,
            energy=pb.EnergyConfig(family=fam, beta=4.0, similarity=2, separation=3)))]
    s["create_store_retrieve"] = [
        record("CreateBank", pb.CreateBankRequest(name="n", dim=4, kind=pb.STATE_KIND_CONTINUOUS)),
        record("Store", pb.StoreRequest(bank="n", patterns=[1, 0, 0, 0, 0, 1, 0, 0],
                                        ids=[10, 11], payloads=[b"a", b"b"])),
        record("Retrieve", pb.RetrieveRequest(bank="n", queries=[0.9, 0.1, 0, 0])),
        record("GetPatterns", pb.GetPatternsRequest(bank="n", ids=[11])),
        record("DeletePatterns", pb.DeletePatternsRequest(bank="n", ids=[10])),
        record("Retrieve", pb.RetrieveRequest(bank="n", queries=[0.9, 0.1, 0, 0])),
        record("DeleteBank", pb.DeleteBankRequest(name="n")),
        record("ListBanks", pb.ListBanksRequest())]
    for prec, kind, name in ((2, pb.STATE_KIND_CONTINUOUS, "bf16"),
                             (3, pb.STATE_KIND_BIPOLAR, "bit_packed"),
                             (4, pb.STATE_KIND_CONTINUOUS, "f32_screened")):
        n = 70  # more than one 64-bit word of bits, odd for SIMD tails
        x = [1.0 if (i * 5 + 1) % 3 else -1.0 for i in range(3 * n)]
        s["precision_%s_store_retrieve_energy" % name] = [
            record("CreateBank", pb.CreateBankRequest(name=name.replace("_", "-"), dim=n, kind=kind,
                                                      precision=prec)),
            record("Store", pb.StoreRequest(bank=name.replace("_", "-"), patterns=x)),
            record("Retrieve", pb.RetrieveRequest(bank=name.replace("_", "-"), queries=x[:n])),
            record("Energy", pb.EnergyRequest(bank=name.replace("_", "-"), states=x[n:2 * n],
                                              return_gradient=True)),
            record("Sample", pb.SampleRequest(bank=name.replace("_", "-"), count=1,
                                              schedule=pb.Schedule(steps=4)))]
    s["get_bank"] = [record("GetBank", pb.GetBankRequest(name="bip"))]
    s["list_banks"] = [record("ListBanks", pb.ListBanksRequest())]
    s["delete_bank_then_retrieve"] = [
        record("DeleteBank", pb.DeleteBankRequest(name="cont")),
        record("Retrieve", pb.RetrieveRequest(bank="cont", queries=cont))]
    s["store_bipolar"] = [record("Store", pb.StoreRequest(
        bank="bip", patterns=bip + [-x for x in bip], payloads=[b"x", b"y"]))]
    s["store_continuous_ids"] = [record("Store", pb.StoreRequest(
        bank="cont", patterns=cont, ids=[77], payloads=[b"\x00\xff"]))]
    s["delete_all_then_sample"] = [
        record("DeletePatterns", pb.DeletePatternsRequest(bank="cont", ids=[1, 2, 3, 4, 5, 6])),
        record("Sample", pb.SampleRequest(bank="cont", count=2, seed=1))]
    s["get_patterns_page"] = [record("GetPatterns", pb.GetPatternsRequest(
        bank="bip", page_start=2, page_size=3))]
    for dyn in range(1, 5):
        s["retrieve_bipolar_dynamics%d" % dyn] = [record("Retrieve", pb.RetrieveRequest(
            bank="bip", queries=bip, clamp=[i < 4 for i in range(16)],
            options=pb.RetrieveOptions(dynamics=dyn, max_steps=20, alpha=0.1, dt=0.1,
                                       tau_v=1.0, tau_h=0.5, seed=3, return_trace=True)))]
        s["retrieve_continuous_dynamics%d" % dyn] = [record("Retrieve", pb.RetrieveRequest(
            bank="cont", queries=cont + cont[::-1],
            energy=pb.EnergyConfig(family=pb.ENERGY_FAMILY_GENERAL, similarity=3, separation=4),
            options=pb.RetrieveOptions(dynamics=dyn, max_steps=20, alpha=0.5, dt=0.2,
                                       tau_v=1.0, tau_h=0.5, tol=1e-3, return_trace=True)))]
    s["energy_gradient"] = [record("Energy", pb.EnergyRequest(
        bank="cont", states=cont, return_gradient=True,
        energy=pb.EnergyConfig(family=pb.ENERGY_FAMILY_GAUSSIAN, beta=3.0)))]
    s["energy_bipolar"] = [record("Energy", pb.EnergyRequest(bank="bip", states=bip))]
    for sampler in range(1, 6):
        for sched in range(1, 4):
            s["sample_cont_sampler%d_schedule%d" % (sampler, sched)] = [record(
                "Sample", pb.SampleRequest(
                    bank="cont", count=2, seed=sampler, sampler=sampler,
                    schedule=pb.Schedule(kind=sched, sigma_max=10, sigma_min=0.01, rho=7,
                                         steps=8, stop_at_sigma_min=sched == 2),
                    churn=5, s_tmin=0.1, s_tmax=5, s_noise=1.0, langevin_steps=2,
                    langevin_eta=0.1, am_iterations=2, trajectory_every=2))]
    s["sample_bipolar_query_clamp"] = [record("Sample", pb.SampleRequest(
        bank="bip", count=1, query=bip, clamp=[i % 2 == 0 for i in range(16)], sigma_start=2.0,
        schedule=pb.Schedule(steps=6)))]
    # Three full batches of 16 bipolar patterns pass the 3 KiB memory budget.
    s["store_until_memory_budget"] = [record("Store", pb.StoreRequest(
        bank="bip", patterns=[1.0 if (i * 7 + j * 3 + b) % 5 < 2 else -1.0
                              for i in range(16) for j in range(16)],
        ids=[1000 * (b + 1) + i for i in range(16)])) for b in range(3)]
    # Paging at the top of the 64-bit range: empty pages at the end, never
    # other memory.
    s["get_patterns_page_overflow"] = [
        record("GetPatterns", pb.GetPatternsRequest(bank="bip", page_start=2**64 - 2, page_size=3)),
        record("GetPatterns", pb.GetPatternsRequest(bank="bip", page_start=2**63 + 5)),
        record("GetPatterns", pb.GetPatternsRequest(bank="cont", page_start=2**63 - 1,
                                                    page_size=16))]
    s["sample_stream_frames"] = [record("SampleStream", pb.SampleRequest(
        bank="cont", count=2, seed=3, schedule=pb.Schedule(steps=8), trajectory_every=1))]
    s["auth_headers"] = [record("Auth", b"Bearer fuzz-token"), record("Auth", b"Bearer fuzz-tokeX"),
                         record("Auth", b"bearer fuzz-token"), record("Auth", b"")]
    kv = [0.5, 0.0, -1.0, 0.25, 1.0, 1.0, 0.0, -0.5]
    fr = pb.Filter(conditions=[pb.Condition(key="lang", equals="fr")])
    s["values_labels_filters_ttl"] = [
        record("CreateBank", pb.CreateBankRequest(name="kv", dim=4, kind=pb.STATE_KIND_CONTINUOUS,
                                                  value_dim=2, ttl_seconds=3600)),
        record("Store", pb.StoreRequest(
            bank="kv", patterns=kv, values=[1, 2, 3, 4], ttl_seconds=5,
            labels=[pb.Labels(strings={"lang": "en"}, ints={"year": 1999}),
                    pb.Labels(strings={"lang": "fr"}, ints={"year": 2001})])),
        record("Retrieve", pb.RetrieveRequest(bank="kv", queries=kv[:4], filter=fr)),
        record("Energy", pb.EnergyRequest(bank="kv", states=kv, filter=pb.Filter(conditions=[
            pb.Condition(key="year", int_range=pb.Int64Range(min=2000, max=2010)),
            pb.Condition(key="lang", any_of=pb.StringList(values=["fr", "de"]))]))),
        record("Sample", pb.SampleRequest(bank="kv", count=1, schedule=pb.Schedule(steps=4),
                                          filter=pb.Filter(conditions=[pb.Condition(
                                              key="year", int_any_of=pb.Int64List(values=[1999]))]))),
        record("Retrieve", pb.RetrieveRequest(bank="kv", queries=kv[:4], filter=pb.Filter(
            conditions=[pb.Condition(key="lang", int_equals=3)]))),
        record("GetPatterns", pb.GetPatternsRequest(bank="kv"))]
    s["backup"] = [record("Backup", pb.BackupRequest(file="snap.db")),
                   record("Backup", pb.BackupRequest(file="snap.db"))]
    return s


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--proto-dir", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    stubs = tempfile.mkdtemp(prefix="engram_fuzz_stubs_")
    try:
        pb = engram_harness.generate_stubs(a.proto_dir, stubs)["pb"]
        os.makedirs(a.out, exist_ok=True)
        for name, recs in sorted(seeds(pb).items()):
            with open(os.path.join(a.out, name), "wb") as f:
                f.write(b"".join(recs))
            print(name)
    finally:
        shutil.rmtree(stubs)


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""Engram core side by side with numpy/OpenBLAS and FAISS, in one run.

For each size it builds one bank (K random unit-norm patterns of dimension
N) and queries (stored patterns plus noise), writes them for the Engram
side (build/bench/engram_compare), times the same maths in numpy (Debian's
python3-numpy on OpenBLAS) and FAISS (python3-faiss, exact flat indexes),
and measures the two roofline figures of this machine in the same run: the
read bandwidth (a STREAM-like sum over 1 GiB) and the OpenBLAS sgemm rate
(numpy matmul of the batch's shapes). Prints a Markdown table of medians
and ratios.

    /usr/bin/python3 bench/compare.py            # full sizes (~10 min)
    /usr/bin/python3 bench/compare.py --quick    # one small size
    /usr/bin/python3 bench/compare.py --sampling-only   # the sampling table
    /usr/bin/python3 bench/compare.py --baseline OTHER/engram_compare
        # also an A/B table: every Engram figure of this build (A) against
        # another build's (B) on the same data, the two run in turn
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BETA = 40.0  # sharp enough that retrieval converges on K = 10^6 random patterns


def median_time(fn, repeats):
    fn()
    t = []
    for _ in range(repeats):
        a = time.perf_counter()
        fn()
        t.append(time.perf_counter() - a)
    return float(np.median(t))


def np_step(xi, x, beta):
    s = xi @ x
    w = np.exp(beta * (s - s.max()))
    return (w @ xi) / w.sum()


def np_step_batch(xi, q, beta):
    s = q @ xi.T
    s -= s.max(axis=1, keepdims=True)
    w = np.exp(beta * s)
    return (w @ xi) / w.sum(axis=1, keepdims=True)


def np_retrieve(xi, x, beta, tol=1e-6, max_steps=100):
    for step in range(1, max_steps + 1):
        nxt = np_step(xi, x, beta)
        done = np.abs(nxt - x).max() < tol
        x = nxt
        if done:
            break
    return x, step


def np_retrieve_batch(xi, q, beta, tol=1e-6, max_steps=100):
    x = q.copy()
    active = np.arange(len(q))
    for _ in range(max_steps):
        nxt = np_step_batch(xi, x[active], beta)
        done = np.abs(nxt - x[active]).max(axis=1) < tol
        x[active] = nxt
        active = active[~done]
        if len(active) == 0:
            break
    return x


def np_denoise(xi, half_sq, x, sigma):
    """The ideal denoiser of a Gaussian bank: softmax(-|x - xi|^2 / 2 sigma^2) @ xi."""
    s = (x @ xi.T - half_sq) * np.float32(1.0 / (sigma * sigma))
    s -= s.max(axis=1, keepdims=True)
    w = np.exp(s)
    return (w @ xi) / w.sum(axis=1, keepdims=True)


def np_heun(xi, half_sq, x0, sigmas):
    """Heun's probability-flow sampler over `sigmas` (Karras et al. 2022,
    Algorithm 1 without churn): Euler on the last step to sigma = 0."""
    x = x0.copy()
    for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
        d = (x - np_denoise(xi, half_sq, x, s0)) / np.float32(s0)
        nxt = x + np.float32(s1 - s0) * d
        if s1 > 0:
            d2 = (nxt - np_denoise(xi, half_sq, nxt, s1)) / np.float32(s1)
            nxt = x + np.float32(0.5 * (s1 - s0)) * (d + d2)
        x = nxt
    return x


def engram(tool, args):
    out = subprocess.run([tool] + [str(a) for a in args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def machine_line(tool):
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bw = engram(tool, ["--bandwidth", "1", "--repeats", "5"])
    return cpu, bw


def numpy_blas_kernel():
    """The OpenBLAS kernel family numpy's matmul runs on, from the library it loaded."""
    import ctypes
    with open("/proc/self/maps") as maps:
        libs = {line.split()[-1] for line in maps if "blas" in line and ".so" in line}
    for lib in sorted(libs):
        try:
            fn = ctypes.CDLL(lib).openblas_get_corename
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_char_p
        return fn().decode()
    return "not OpenBLAS"


def fmt_ms(s):
    return f"{s * 1e3:.3g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tool", default=os.path.join(ROOT, "build", "bench", "engram_compare"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--baseline", help="another build's engram_compare: adds an A/B table")
    ap.add_argument("--sampling-only", action="store_true", help="only the diffusion-sampling table")
    args = ap.parse_args()
    import faiss  # python3-faiss

    faiss.omp_set_num_threads(os.cpu_count())
    sample_sizes = [(784, 10_000, 64), (784, 100_000, 64)]
    if args.quick:
        sizes = [(784, 10_000, 64)]
        bipolar_sizes = [(784, 10_000)]
        sample_sizes = [(784, 10_000, 64)]
        args.repeats = 3
    elif args.sampling_only:
        sizes, bipolar_sizes = [], []
    else:
        sizes = [(784, 1_000, 256), (784, 10_000, 256), (784, 100_000, 256), (784, 1_000_000, 0),
                 (4096, 1_000, 256), (4096, 10_000, 256), (4096, 100_000, 0)]
        bipolar_sizes = [(784, 10_000), (784, 100_000), (784, 1_000_000), (4096, 100_000)]
    rng = np.random.default_rng(7)
    cpu, bw = machine_line(args.tool)
    read_bw = bw["read_bytes_per_s"]
    np.ones((64, 64), dtype=np.float32) @ np.ones((64, 64), dtype=np.float32)  # loads BLAS
    print(f"machine: {cpu}, {os.cpu_count()} threads; Engram kernels {bw['simd']}, "
          f"{bw['threads']} compute threads, OpenBLAS {bw['blas']}; numpy {np.__version__} "
          f"(OpenBLAS {numpy_blas_kernel()}), faiss {faiss.__version__}; "
          f"read bandwidth {read_bw / 1e9:.1f} GB/s; {time.strftime('%Y-%m-%d')}")
    rows, batch_rows, bip_rows, screen_rows, sample_rows = [], [], [], [], []
    ab_rows = []  # (size label, figure, A seconds, B seconds)

    def run_engram(label, tool_args):
        """This build's figures; with --baseline also the baseline's, B then A
        then B again (the median of B's two runs), so drift hits both."""
        if not args.baseline:
            return engram(args.tool, tool_args)
        b1 = engram(args.baseline, tool_args)
        a = engram(args.tool, tool_args)
        b2 = engram(args.baseline, tool_args)
        for key in sorted(a):
            if key.endswith("_steps") or not isinstance(a[key], float) or key not in b1:
                continue
            ab_rows.append((label, key, a[key], 0.5 * (b1[key] + b2[key])))
        return a
    tmp = tempfile.mkdtemp(prefix="engram_compare_")
    try:
        for n, k, b in sizes:
            xi = rng.standard_normal((k, n), dtype=np.float32)
            xi /= np.linalg.norm(xi, axis=1, keepdims=True)
            nq = max(b, 1)
            q = xi[rng.integers(0, k, nq)] + rng.standard_normal((nq, n), dtype=np.float32) * (0.3 / np.sqrt(n))
            q = q.astype(np.float32)
            pf, qf = os.path.join(tmp, "xi.f32"), os.path.join(tmp, "q.f32")
            xi.tofile(pf)
            q.tofile(qf)
            e = run_engram(f"{n} x {k:,}", ["--patterns", pf, "--queries", qf, "--dim", n,
                                            "--batch", max(b, 1), "--beta", BETA,
                                            "--repeats", args.repeats])
            x = q[0]
            t_np_step = median_time(lambda: np_step(xi, x, BETA), args.repeats)
            t_np_ret = median_time(lambda: np_retrieve(xi, x, BETA), max(3, args.repeats // 2))
            _, np_steps = np_retrieve(xi, x, BETA)
            ip = faiss.IndexFlatIP(n)
            ip.add(xi)
            l2 = faiss.IndexFlatL2(n)
            l2.add(xi)
            t_ip = median_time(lambda: ip.search(x[None, :], 1), args.repeats)
            t_l2 = median_time(lambda: l2.search(x[None, :], 1), args.repeats)
            bytes_ = k * n * 4
            rows.append((n, k, e["step_b1"], t_np_step, bytes_ / e["step_b1"] / read_bw,
                         e["nearest_b1"], t_ip, t_l2, e["retrieve_b1"], t_np_ret,
                         int(e["retrieve_b1_steps"]), np_steps, e["step_b1_bf16"]))
            screen_rows.append((n, k, e["step_b1"], e["step_b1_screened"], e["retrieve_b1_screened"],
                                t_np_ret, int(e["retrieve_b1_screened_steps"]), np_steps))
            if b > 1:
                qb = q[:b]
                t_gemm = median_time(lambda: qb @ xi.T, args.repeats)
                sgemm_rate = 2.0 * b * k * n / t_gemm
                t_np_b = median_time(lambda: np_step_batch(xi, qb, BETA), args.repeats)
                t_np_rb = median_time(lambda: np_retrieve_batch(xi, qb, BETA), 3)
                flops = 4.0 * b * k * n
                batch_rows.append((n, k, b, e["step_batch"], t_np_b, flops / e["step_batch"] / 1e9,
                                   sgemm_rate / 1e9, flops / e["step_batch"] / sgemm_rate,
                                   e["retrieve_batch"], t_np_rb))
            del xi, q, ip, l2
        for n, k in bipolar_sizes:
            xi = (rng.integers(0, 2, (k, n), dtype=np.int8) * 2 - 1).astype(np.float32)
            q = xi[:1].copy()
            flip = rng.choice(n, n // 10, replace=False)
            q[0, flip] *= -1
            pf, qf = os.path.join(tmp, "xi.f32"), os.path.join(tmp, "q.f32")
            xi.tofile(pf)
            q.tofile(qf)
            e = run_engram(f"{n} x {k:,} bipolar", ["--patterns", pf, "--queries", qf, "--dim", n,
                                                    "--bipolar", 1, "--repeats", args.repeats])
            bip_rows.append((n, k, e["bipolar_step_f32"], e["bipolar_step_bits"],
                             e["bipolar_exp_step_f32"], e["bipolar_exp_step_bits"]))
            del xi
        for n, k, count in sample_sizes:
            xi = rng.standard_normal((k, n), dtype=np.float32)
            xi /= np.linalg.norm(xi, axis=1, keepdims=True)
            pf = os.path.join(tmp, "xi.f32")
            xi.tofile(pf)
            half_sq = 0.5 * (xi * xi).sum(axis=1)
            nearest = lambda x: np.argmax(x @ xi.T - half_sq, axis=1)
            timed = None
            # The same bank stored in f32 and in bf16 (rows rounded to 8
            # significant bits); numpy samples the f32 rows from the initial
            # states each Engram run drew (the same seed: the same states).
            for precision in ("f32", "bf16"):
                # This build only: a baseline may predate the sampling workload.
                e = engram(args.tool, ["--sample", 1, "--patterns", pf, "--dim", n,
                                       "--count", count, "--steps", 64, "--out", tmp,
                                       "--precision", precision,
                                       "--repeats", max(1, args.repeats // 3)])
                final = np.fromfile(os.path.join(tmp, "final.f32"),
                                    dtype=np.float32).reshape(count, n)
                drawn = np.fromfile(os.path.join(tmp, "x0.f32"), dtype=np.float32).reshape(count, n)
                if timed is not None and not np.array_equal(drawn, x0):
                    sys.exit(f"the {precision} run drew other initial states than the f32 run")
                if timed is None:
                    x0 = drawn
                    sigmas = np.fromfile(os.path.join(tmp, "sigmas.f64"))
                    unit = np.fromfile(os.path.join(tmp, "unit.f32"),
                                       dtype=np.float32).reshape(count, n)
                    ref = [None]

                    def np_sample():
                        ref[0] = np_heun(xi, half_sq, x0, sigmas)
                    t_np = median_time(np_sample, max(1, args.repeats // 3))
                    t_np_den = median_time(lambda: np_denoise(xi, half_sq, unit, 1.0), args.repeats)
                    t_gemm = median_time(lambda: unit @ xi.T, args.repeats)
                    timed = (ref[0], t_np, t_np_den, 2.0 * count * k * n / t_gemm)
                ref_final, t_np, t_np_den, sgemm_rate = timed
                same = float(np.mean(nearest(final) == nearest(ref_final)))
                diff = float(np.abs(final - ref_final).max())
                flops = 4.0 * count * k * n
                sample_rows.append((n, k, precision, count, e["sample_heun"], t_np,
                                    e["sample_heun_one"], e["denoise_batch"], t_np_den,
                                    flops / e["denoise_batch"] / 1e9, sgemm_rate / 1e9, same, diff))
            del xi
    finally:
        for f in os.listdir(tmp):
            os.remove(os.path.join(tmp, f))
        os.rmdir(tmp)

    if rows:
        print()
        print("Single query (B = 1), lse, beta = 40; times are medians in ms; ratio > 1 means Engram is faster.")
        print()
        print("| N | K | Engram step | numpy step | ratio | % of read bw | Engram top-1 | FAISS IP top-1 | FAISS L2 top-1 | ratio vs IP | Engram retrieve | numpy retrieve | ratio | steps (E/np) | bf16 step | bf16 speed-up |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (n, k, es, ns, frac, en, fip, fl2, er, nr, est, nst, e16) in rows:
            print(f"| {n} | {k:,} | {fmt_ms(es)} | {fmt_ms(ns)} | {ns / es:.2f} | {100 * frac:.0f} % | "
                  f"{fmt_ms(en)} | {fmt_ms(fip)} | {fmt_ms(fl2)} | {fip / en:.2f} | {fmt_ms(er)} | {fmt_ms(nr)} | "
                  f"{nr / er:.2f} | {est}/{nst} | {fmt_ms(e16)} | {es / e16:.2f} |")
        print()
        print("The same banks with precision f32_screened (f32 results; an int8 screen with per-row error "
              "bounds decides which f32 rows a pass reads).")
        print()
        print("| N | K | f32 step | screened step | speed-up | screened retrieve | numpy retrieve | ratio | steps (E/np) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for (n, k, es, ss, sr, nr, sst, nst) in screen_rows:
            print(f"| {n} | {k:,} | {fmt_ms(es)} | {fmt_ms(ss)} | {es / ss:.2f} | {fmt_ms(sr)} | {fmt_ms(nr)} | "
                  f"{nr / sr:.2f} | {sst}/{nst} |")
    if batch_rows:
        print()
        print("Batched queries: one step for B queries (4·B·K·N flops) and retrieval of all B to convergence.")
        print()
        print("| N | K | B | Engram step | numpy step | ratio | Engram GFLOP/s | sgemm GFLOP/s | % of sgemm | Engram retrieve | numpy retrieve | ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (n, k, b, es, ns, gf, sg, frac, er, nr) in batch_rows:
            print(f"| {n} | {k:,} | {b} | {fmt_ms(es)} | {fmt_ms(ns)} | {ns / es:.2f} | {gf:.0f} | {sg:.0f} | "
                  f"{100 * frac:.0f} % | {fmt_ms(er)} | {fmt_ms(nr)} | {nr / er:.2f} |")
    if bip_rows:
        print()
        print("Bipolar bank, one sync step (Krotov-Hopfield drive), f32 against bit-packed, for the "
              "classical energy and the exponential energy (beta = 0.1).")
        print()
        print("| N | K | classical f32 | classical bit-packed | speed-up | exponential f32 | "
              "exponential bit-packed | speed-up |")
        print("|---|---|---|---|---|---|---|---|")
        for (n, k, f, bts, fe, be) in bip_rows:
            print(f"| {n} | {k:,} | {fmt_ms(f)} | {fmt_ms(bts)} | {f / bts:.2f} | {fmt_ms(fe)} | "
                  f"{fmt_ms(be)} | {fe / be:.2f} |")
    if sample_rows:
        print()
        print("Diffusion sampling on a Gaussian bank (ideal denoiser): Heun over a Karras schedule "
              "of 64 levels (sigma 80 -> 0.002, then 0; 127 denoiser evaluations per sample), "
              "Engram's Sample against the same sampler in numpy (f32 rows) from the same initial "
              "noise, for the bank stored in f32 and in bf16. "
              "'one sample' is an Engram call of count 1; the denoiser columns are one "
              "evaluation for the whole batch at sigma = 1, where every row carries weight "
              "(4·B·K·N flops). 'same memory' is the share of samples whose final state has the "
              "same nearest memory on both sides; 'max diff' the largest coordinate difference.")
        print()
        print("| N | K | bank | samples | Engram sample | numpy sample | ratio | Engram one sample | "
              "Engram denoiser | numpy denoiser | ratio | Engram GFLOP/s | sgemm GFLOP/s | "
              "% of sgemm | same memory | max diff |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (n, k, prec, c, es, ns, e1, ed, nd, gf, sg, same, diff) in sample_rows:
            print(f"| {n} | {k:,} | {prec} | {c} | {fmt_ms(es)} | {fmt_ms(ns)} | {ns / es:.2f} | "
                  f"{fmt_ms(e1)} | "
                  f"{fmt_ms(ed)} | {fmt_ms(nd)} | {nd / ed:.2f} | {gf:.0f} | {sg:.0f} | "
                  f"{100 * gf / sg:.0f} % | {100 * same:.0f} % | {diff:.2g} |")
    if ab_rows:
        print()
        print(f"A/B: this build (A, {args.tool}) against the baseline (B, {args.baseline}), same "
              "data, run B A B; B is the mean of its two runs. Ratio B/A > 1 means A is faster.")
        print()
        print("| size | figure | A ms | B ms | B/A |")
        print("|---|---|---|---|---|")
        for label, key, a, b in ab_rows:
            print(f"| {label} | {key} | {fmt_ms(a)} | {fmt_ms(b)} | {b / a:.2f} |")
        ratios = sorted(b / a for _, _, a, b in ab_rows)
        print()
        print(f"median B/A over {len(ratios)} figures: {ratios[len(ratios) // 2]:.3f} "
              f"(range {ratios[0]:.2f} .. {ratios[-1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

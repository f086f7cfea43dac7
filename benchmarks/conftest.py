"""pytest-benchmark suite of instdisc_kernels: `pytest benchmarks/ --benchmark-only`.

Options: --bench-size=smoke|default|full, --bench-device=auto|cpu|cuda,
--bench-backends=LIST (library backends to run; default: the device's real ones),
--bench-compile (torch.compile provider also where skipped by default).
Each benchmark's extra_info holds the bank bytes read, GB/s, the percentage of
the session's bandwidth probe, the peak extra memory and the speedup over the
eager baseline of the same case measured in the same run; a table of them is
printed at the end and stored (with the probe) in the JSON under "instdisc".
"""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import time

import bench_cases
import bench_measure
import bench_ops
import bench_peers
import pytest
import report
import torch

PROBE_BYTES = {"smoke": 16 << 20, "default": 1 << 30, "full": 1 << 30}
GEMM_N = {"smoke": 256, "default": 2048, "full": 2048}
SLOW_CALL_S = 2.0       # a step slower than this is timed over PEDANTIC_ROUNDS rounds only
PEDANTIC_ROUNDS = 3
# rounds of one provider call then one embedding_bag call (the gather limit, bench_peers.py) after
# the timed rounds of a gather-bound case: the ratio of their medians does not move with the
# machine's state between the two rows (about 2x on a shared 2-core machine)
PAIRED_ROUNDS = 9


def pytest_addoption(parser):
    g = parser.getgroup("instdisc benchmarks")
    g.addoption("--bench-size", choices=("smoke", "default", "full"), default="default",
                help="shape set: smoke (tiny, make test), default, full (all shapes of the issue)")
    g.addoption("--bench-device", choices=("auto", "cpu", "cuda"), default="auto",
                help="device to benchmark (auto: cuda when present)")
    g.addoption("--bench-backends", default=None,
                help="comma-separated library backends to run as fused-<backend> providers "
                     "(default: cpu on CPU, triton,cuda on CUDA, each replaced by eager for an op "
                     "without that kernel). 'eager' is allowed for comparison.")
    g.addoption("--bench-compile", action="store_true",
                help="run the torch.compile provider where it is skipped by default "
                     "(the smoke size; CPU below --bench-size=full)")


def _device(config):
    want = config.getoption("--bench-device")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def pytest_generate_tests(metafunc):
    if "case_id" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    dev = _device(cfg).type
    op = metafunc.function.__name__.removeprefix("test_")
    backends = cfg.getoption("--bench-backends")
    params = bench_cases.params(op, dev, cfg.getoption("--bench-size"))
    if backends:
        keep = {b.strip() for b in backends.split(",")}
        extra = [f"fused-{b.strip()}" for b in backends.split(",")
                 if f"fused-{b.strip()}" not in bench_cases.op_providers(op, dev)]
        params = [(c, p) for c, p in params    # eager, compile and the peers stay
                  if not p.startswith("fused-") or bench_cases.split_provider(p)[0] in keep]
        params = _insert_after_eager(params, extra)
    # the case travels as its id (a JSON-friendly benchmark param); the `case` fixture looks it up
    metafunc.parametrize("case_id,provider", [pytest.param(c.id, p, id=f"{c.id}-{p}") for c, p in params])


def _insert_after_eager(params, extra):
    out = []
    for c, p in params:
        out.append((c, p))
        if p == "eager":
            out.extend((c, e) for e in extra)
    return out


class BenchSession:
    """Session state: device, size, probe (lazy), eager times per case, records."""

    def __init__(self, config):
        self.config = config
        self.device = _device(config)
        self.size = config.getoption("--bench-size")
        self._probe = None
        self._reasons = {}
        self.eager_time = {}
        self.records = []

    @property
    def probe(self):
        if self._probe is None:
            p = bench_measure.bandwidth_probe(self.device, PROBE_BYTES[self.size])
            p["gemm_n"] = GEMM_N[self.size]
            p["gemm_gflops"] = bench_measure.gemm_probe(self.device, GEMM_N[self.size])
            self._probe = p
        return self._probe

    # ----------------------------------------------------------------------- #
    def skip_reason(self, op, provider):
        key = (op, provider)
        if key not in self._reasons:
            self._reasons[key] = self._skip_reason(op, provider)
        return self._reasons[key]

    def _skip_reason(self, op, provider):
        dev = self.device
        if provider == "eager":
            return None
        if bench_cases.is_peer(provider):
            if provider == "faiss" and dev.type != "cpu":
                return "faiss-cpu searches CPU arrays only"
            return bench_peers.skip_reason(provider)
        if provider == "compile":
            if self.config.getoption("--bench-compile"):
                pass
            elif self.size == "smoke":
                return "torch.compile: skipped by the smoke run (compile time; --bench-compile forces it)"
            elif dev.type == "cpu" and self.size != "full":
                return ("torch.compile on CPU: --bench-size=full only (6-40 s of C++ compilation "
                        "per graph here, several graphs per op: the default CPU run would pass 10 minutes; "
                        "--bench-compile forces it)")
            if dev.type == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
                return "torch.compile on CPU needs a C++ compiler"
            return None
        be = bench_cases.split_provider(provider)[0]
        if be == "triton" and dev.type == "cpu":
            return "triton on CPU tensors runs only in the interpreter (tests), never benchmarked"
        if be == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
            return "TRITON_INTERPRET=1 is set: interpreter timings are meaningless"
        try:
            bench_ops.tiny_call(op, be, dev)
        except ValueError as e:
            if "not available" in str(e):
                return f"backend {be!r} not available for {op}: {e}"
            raise
        return None

    # ----------------------------------------------------------------------- #
    def run(self, benchmark, case, provider):
        why = self.skip_reason(case.op, provider)
        if why:
            pytest.skip(why)
        dev = self.device
        torch.manual_seed(0)
        g = bench_ops.inputs(case, dev)
        fn = bench_ops.step(case, provider, g, dev)
        t0 = time.perf_counter()
        fn()                                                  # warm-up (compiles for "compile")
        warm_s = time.perf_counter() - t0
        peak, method = bench_measure.peak_extra_memory(fn, dev)
        benchmark.group = f"{case.op} {case.id}"
        benchmark.extra_info.update(
            op=case.op, provider=provider, case=case.id, N=case.N, B=case.B, K=case.K, D=case.D,
            dtype=case.dtype, device=str(dev), threads=torch.get_num_threads(),
            bank_bytes=bench_cases.bank_bytes(case), peak_extra_bytes=peak, peak_method=method)
        if warm_s > SLOW_CALL_S:
            benchmark.pedantic(fn, rounds=PEDANTIC_ROUNDS, iterations=1)
        else:
            benchmark(fn)
        if benchmark.stats is None:                           # --benchmark-disable: no timings
            return
        t = benchmark.stats.stats.median
        key = (case.op, case.id)
        if provider == "eager":
            self.eager_time[key] = t
        kind = bench_cases.access(case)
        row_bytes = case.D * torch.empty((), dtype=case.torch_dtype).element_size()
        probe = bench_measure.probe_gbps(self.probe, kind, row_bytes)
        gbps = bench_cases.bank_bytes(case) / t / 1e9
        eager = self.eager_time.get(key)
        flops = bench_cases.flops(case)
        gemm_dt = report.gemm_rate_dtype(gemm_dtype(case, provider) == "bf16", self.probe["gemm_gflops"])
        gemm = self.probe["gemm_gflops"][gemm_dt]
        info = dict(time_median_s=t, gbps=gbps, probe_kind=f"{kind}{row_bytes if kind == 'gather' else ''}",
                    probe_gbps=probe, pct_of_probe=100.0 * gbps / probe,
                    speedup_vs_eager=(eager / t) if eager else None,
                    gflops=None if flops is None else flops / t / 1e9, gemm_dtype=gemm_dt if flops else None,
                    pct_of_gemm=None if flops is None else 100.0 * flops / t / 1e9 / gemm)
        info.update(self.paired_with_limit(case, provider, g, dev, fn))
        benchmark.extra_info.update(info)
        self.records.append(dict(benchmark.extra_info))

    def paired_with_limit(self, case, provider, g, dev, fn):
        """For this library's kernel on a gather-bound case (the op's peer is embedding_bag, on
        the same bank: not the 4k-page variant): PAIRED_ROUNDS rounds of one ``fn`` call then one
        embedding_bag call over the op's rows, and the embedding_bag median as a percentage of
        fn's median over those rounds."""
        if (report.GATHER_LIMIT not in bench_cases.PEERS.get(case.op, ()) or not provider.startswith("fused-")
                or bench_cases.split_provider(provider)[1] == "4k"):
            return {}
        limit = bench_peers.step(case, report.GATHER_LIMIT, g, dev)
        limit()
        own, lim = [], []
        for _ in range(PAIRED_ROUNDS):
            for f, ts in ((fn, own), (limit, lim)):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
        m_own, m_lim = statistics.median(own), statistics.median(lim)
        return dict(paired_rounds=PAIRED_ROUNDS, paired_time_median_s=m_own, paired_limit_median_s=m_lim,
                    paired_pct_of_embag=100.0 * m_lim / m_own)


def gemm_dtype(case, provider):
    """Which square-GEMM rate a compute-bound case is held against: bf16 for the kNN ops (the
    library multiplies in bf16 there, and bf16 is the machine's best rate) and for the bf16-precision
    providers, fp32 otherwise."""
    return "bf16" if case.op in bench_cases.KNN_OPS or provider.endswith("+bf16") else "fp32"


@pytest.fixture(autouse=True)
def _seed():
    """Every test and benchmark starts from the same RNG state (as in python_tests/)."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def case(request, case_id):
    op = request.function.__name__.removeprefix("test_")
    return next(c for c in bench_cases.cases(op, _device(request.config).type, request.config.getoption("--bench-size"))
                if c.id == case_id)


@pytest.fixture(scope="session")
def bench(request):
    s = BenchSession(request.config)
    request.config._instdisc_bench = s
    return s


# --------------------------------------------------------------------------- #
# Reporting hooks                                                              #
# --------------------------------------------------------------------------- #
def pytest_benchmark_update_json(config, benchmarks, output_json):
    s = getattr(config, "_instdisc_bench", None)
    output_json["instdisc"] = {
        "bench_size": config.getoption("--bench-size"),
        "device": str(_device(config)),
        "device_name": torch.cuda.get_device_name() if _device(config).type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": " ".join(["pytest"] + sys.argv[1:]),
        "probe": s._probe if s else None,
    }


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    s = getattr(config, "_instdisc_bench", None)
    if not s or not s.records:
        return
    tr = terminalreporter
    tr.section("instdisc: speedup over the eager baseline (same run, median times)")
    if s._probe:
        p = s._probe
        gat = ", ".join(f"{k} B rows {v:.1f}" for k, v in p["gather_gbps"].items())
        tr.write_line(f"bandwidth probe ({p['bytes'] >> 20} MiB): read {p['read_gbps']:.1f} GB/s; "
                      f"random-row gather {gat} GB/s")
        gm = p.get("gemm_gflops", {})
        tr.write_line(f"square GEMM ({p.get('gemm_n')}^3 torch.mm): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in gm.items()))
    tr.write_line(f"{'op':<12}{'case':<50}{'provider':<15}{'median ms':>11}{'GB/s':>9}{'% probe':>9}"
                  f"{'GFLOP/s':>9}{'% GEMM':>8}{'peak MB':>10}{'speedup':>9}")
    for r in s.records:
        peak = None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20
        tr.write_line(f"{r['op']:<12}{r['case']:<50}{r['provider']:<15}{_fmt(r['time_median_s'] * 1e3, '11.3f')}"
                      f"{_fmt(r['gbps'], '9.3g')}{_fmt(r['pct_of_probe'], '9.2g')}{_fmt(r.get('gflops'), '9.4g')}"
                      f"{_fmt(r.get('pct_of_gemm'), '8.2g')}{_fmt(peak, '10.1f')}{_fmt(r['speedup_vs_eager'], '9.2f')}")
    skipped = sorted({(p, why) for (op, p), why in s._reasons.items() if why and bench_cases.is_peer(p)})
    for p, why in skipped:
        tr.write_line(f"peer provider {p!r} skipped: {why}")

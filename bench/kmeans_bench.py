"""kmeans mode at catalog scale: the product end to end against a FAISS baseline, in one run.

    python bench/kmeans_bench.py --n 1000000 [--device cpu|cuda] [--out DIR]   (or BENCH_OUT=DIR)
    python bench/kmeans_bench.py --n 1000000 --sides product --id_type string   (string ItemIDs)

Both sides run as subprocesses over the same synthetic parquet catalog (bench/synth.py,
generated once under /tmp/bench):
- product:  ``python -m semid_dist train --mode kmeans --n_layers 3 --n_clusters 256`` (read ->
  sample -> fit -> encode every item -> dedup -> JSON + Parquet export); stage times come from
  its training_results.json.
- baseline: bench/faiss_baseline.py (whole matrix in memory, faiss.Kmeans per level, search).

Peak memory: a sampler thread walks each side's whole process tree every 0.2 s (for the
product: the CLI driver, Ray's gcs_server, raylet, agents and every Ray worker, all of which
descend from the driver) and adds up, per sample, each process's PSS from smaps_rollup (without
its shared-memory part) plus, once, the allocated size of every shared-memory file they map.
PSS (proportional set size) splits each shared page among the processes mapping it, so shared
libraries (libtorch, libarrow mapped by several workers) count once, where an RSS sum would
count them in every process and a USS sum would leave them out. Ray's object store is a tmpfs
file in /dev/shm: objects stay in it while no process maps their pages, so it is counted by
its allocated size (st_blocks of the file, via /proc/PID/map_files), exactly once. Plain PSS,
USS and RSS sums are reported alongside. smaps_rollup costs the kernel a walk of the process's
mappings (costly for a Ray worker's many mappings), so a process is re-read only when its RSS
(statm) moved by more than 1%; the sampler's own CPU time is recorded (sampler_cpu_s). CPU
time of each side is the user + system time of all its processes, as last sampled. The driver's
own peak is its PSS without shared memory: its VmHWM (training_results.json's ``driver``) also
counts the object store pages it wrote or read, which the tree's figure counts once.

Writes <out>/kmeans_<n>_<device>[_str]_<timestamp>.json and .md (the table) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import synth  # noqa: E402

GB = 1e9


def _rollup(pid: int) -> dict[str, int]:
    """Fields of /proc/PID/smaps_rollup in bytes (Rss, Pss, Pss_Shmem, Private_*, ...)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f.read().splitlines()[1:]:
            key, _, val = line.partition(":")
            out[key] = int(val.split()[0]) * 1024
    return out


def _shm_files(pid: int) -> dict[tuple[str, int], str]:
    """Shared-memory files a process maps ((dev, inode) -> a map_files path that opens them):
    Ray's object store is a deleted file in /dev/shm mapped by the raylet and by workers."""
    out = {}
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            if (
                len(parts) >= 6
                and parts[1][3] == "s"
                and parts[4] != "0"
                and (parts[5].startswith("/dev/shm/") or parts[5].startswith("/memfd:"))
            ):
                out.setdefault((parts[3], int(parts[4])), f"/proc/{pid}/map_files/{parts[0]}")
    return out


class TreeMemory:
    """Peak memory of a process and all its descendants, sampled every `interval` seconds.

    total = sum over processes of (PSS - PSS of shared-memory mappings)
            + bytes allocated in each distinct shared-memory file (counted once).
    PSS splits shared pages (libraries mapped by several workers) among the processes that map
    them, so the sum counts them once. Ray's object store is a tmpfs file: its pages stay
    allocated even when no process has them mapped at the moment, so PSS alone would miss
    objects nobody is reading; its allocated size (st_blocks) is added once instead.
    """

    def __init__(self, pid: int, interval: float = 0.2):
        self.root, self.interval = psutil.Process(pid), interval
        self.peak = {"total": 0, "pss": 0, "uss": 0, "rss": 0, "shm": 0}
        self.at_peak: list[dict] = []
        self.max_procs = 0
        self.samples = 0
        self.sampler_cpu_s = 0.0
        self._cache: dict[int, tuple] = {}
        self._names: dict[int, str] = {}
        self._cpu: dict[int, float] = {}  # last CPU seconds (user + system) seen per process
        self.driver_peak = 0  # the root process's peak PSS without shared memory
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _procs(self) -> list[psutil.Process]:
        try:
            return [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def _read(self, pid: int) -> tuple[dict, dict]:
        """smaps_rollup and shared-memory files of a process. Walking smaps costs the kernel
        time in proportion to the mapping (large for a Ray worker), so a process whose
        RSS (statm, cheap) moved by less than 1% since its last full read reuses that read."""
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1])
        last = self._cache.get(pid)
        if last is not None and abs(rss - last[0]) <= max(last[0] // 100, 256):
            return last[1], last[2]
        roll, shm = _rollup(pid), _shm_files(pid)
        self._cache[pid] = (rss, roll, shm)
        return roll, shm

    def sample(self) -> None:
        tot = {"total": 0, "pss": 0, "uss": 0, "rss": 0, "shm": 0}
        detail, shm = [], {}
        for p in self._procs():
            try:
                r, files = self._read(p.pid)
                shm.update(files)
                name = self._names.get(p.pid) or " ".join(p.cmdline()[:3])[:80] or p.name()
                self._names[p.pid] = name
                ct = p.cpu_times()
                self._cpu[p.pid] = ct.user + ct.system
            except (OSError, psutil.Error):
                continue
            uss = r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)
            tot["total"] += r["Pss"] - r.get("Pss_Shmem", 0)
            if p.pid == self.root.pid:  # the driver without the object store pages it maps
                self.driver_peak = max(self.driver_peak, r["Pss"] - r.get("Pss_Shmem", 0))
            tot["pss"] += r["Pss"]
            tot["uss"] += uss
            tot["rss"] += r["Rss"]
            detail.append(
                {
                    "pid": p.pid,
                    "name": name,
                    "pss_mb": round(r["Pss"] / 1e6),
                    "pss_shmem_mb": round(r.get("Pss_Shmem", 0) / 1e6),
                    "uss_mb": round(uss / 1e6),
                    "rss_mb": round(r["Rss"] / 1e6),
                }
            )
        for key, path in shm.items():
            try:
                size = os.stat(path).st_blocks * 512
            except OSError:
                continue
            tot["shm"] += size
            detail.append(
                {
                    "pid": None,
                    "name": f"shared-memory file {key} (e.g. Ray object store)",
                    "allocated_mb": round(size / 1e6),
                }
            )
        tot["total"] += tot["shm"]
        self.samples += 1
        self.max_procs = max(self.max_procs, sum(1 for d in detail if d["pid"]))
        if tot["total"] > self.peak["total"]:
            self.at_peak = sorted(detail, key=lambda d: -d.get("pss_mb", d.get("allocated_mb", 0)))
        for k in tot:
            self.peak[k] = max(self.peak[k], tot[k])

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the whole tree (each process as last sampled, up to 0.2 s before it
        exited): a load-independent view of the work, next to the wall time."""
        return sum(self._cpu.values())

    def _run(self) -> None:
        cpu0 = time.thread_time()
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)
        self.sampler_cpu_s = time.thread_time() - cpu0


def run_side(name: str, cmd: list[str], log_path: str, env: dict, cwd: str = REPO) -> dict:
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        with TreeMemory(proc.pid) as mem:
            rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"[{name}] exited with {rc}; log {log_path}:\n{tail}")
    print(f"[{name}] done in {wall:.1f} s, peak memory {mem.peak['total'] / GB:.2f} GB", flush=True)
    return {
        "wall_s": round(wall, 2),
        "peak_gb": round(mem.peak["total"] / GB, 3),
        "peak_pss_gb": round(mem.peak["pss"] / GB, 3),
        "peak_shm_gb": round(mem.peak["shm"] / GB, 3),
        "peak_uss_gb": round(mem.peak["uss"] / GB, 3),
        "peak_rss_gb": round(mem.peak["rss"] / GB, 3),
        "driver_peak_gb": round(mem.driver_peak / GB, 3),
        "cpu_s": round(mem.cpu_s, 1),
        "processes_max": mem.max_procs,
        "memory_samples": mem.samples,
        "sampler_cpu_s": round(mem.sampler_cpu_s, 2),
        "processes_at_peak": mem.at_peak[:20],
        "log": log_path,
    }


def pythonpath(src: str) -> str:
    """src first, then whatever PYTHONPATH already holds (bench/gpu_device.sh puts Ray there)."""
    return os.pathsep.join([src] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def run_product(data: str, work: str, device: str, env: dict, src: str = REPO, flags: list[str] = ()) -> dict:
    out = os.path.join(work, "product_out")
    cmd = [
        sys.executable,
        "-m",
        "semid_dist",
        "train",
        "--data_path",
        data,
        "--output_dir",
        out,
        "--mode",
        "kmeans",
        "--n_layers",
        "3",
        "--n_clusters",
        "256",
        "--device",
        device,
        "--log_dir",
        os.path.join(work, "product_logs"),
        *flags,
    ]
    side = run_side(
        "product", cmd, os.path.join(work, "product.log"), dict(env, PYTHONPATH=pythonpath(src)), cwd=src
    )
    side["source"] = src
    with open(os.path.join(out, "training_results.json")) as f:
        res = json.load(f)
    t = res["timings_s"]
    m = res["metrics"]
    side["stages_s"] = t
    side["aligned_s"] = {
        "read + sample": t["inspect"] + t["scan"],
        "fit": t["fit"],
        "assign all (encode)": t["encode"],
        "dedup + metrics": t["dedup"],
        "export": t["export"],
        "total (in process)": t["total"],
    }
    side["metrics"] = {
        "collision_rate": m["collision_rate"],
        "max_bucket": m["max_bucket"],
        "relative_reconstruction_error": m["relative_reconstruction_error"],
        "codes_used": [lv["codes_used"] for lv in m["levels"]],
    }
    side["policy"] = m.get("collisions")
    side["quality_s"] = t.get("quality", 0.0) + t.get("report", 0.0)  # beyond the export's time
    side["driver"] = res.get("driver")
    side["output_bytes"] = sum(
        os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if os.path.isfile(os.path.join(out, f))
    )
    return side


def run_baseline(data: str, work: str, device: str, env: dict) -> dict:
    result = os.path.join(work, "baseline_result.json")
    cmd = [
        sys.executable,
        os.path.join(HERE, "faiss_baseline.py"),
        "--data",
        data,
        "--out",
        os.path.join(work, "baseline_out"),
        "--result",
        result,
        "--device",
        device,
    ]
    side = run_side("baseline", cmd, os.path.join(work, "baseline.log"), env)
    with open(result) as f:
        res = json.load(f)
    t = res["stages_s"]
    side["stages_s"] = t
    side["aligned_s"] = {
        "read + sample": t["read"],
        "fit": t["fit"],
        "assign all (encode)": t["assign"],
        "dedup + metrics": t["dedup"],
        "export": t["export"],
        "total (in process)": t["total"],
    }
    side["metrics"] = res["metrics"]
    side["faiss"] = {k: res[k] for k in ("faiss", "faiss_gpu", "faiss_threads")}
    return side


def cpu_info() -> dict:
    """The first CPU's model name, family/model numbers and widest vector unit, from /proc/cpuinfo.
    A cloud VM's model name can be just "AMD EPYC": the family/model and the SIMD level tell
    the generations apart (Zen 3 has no AVX-512, Zen 4 does; GEMM speed and float rounding in
    the BLAS kernels differ between them)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if not ln.strip():
                    break  # the first processor is enough
                key, _, val = ln.partition(":")
                fields[key.strip()] = val.strip()
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    simd = next((s for s, f in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx")) if f in flags), "")
    return {
        "cpu_model": fields.get("model name") or platform.processor(),
        "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        "simd": simd or "unknown",
    }


def machine() -> dict:
    info = {
        **cpu_info(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
    }
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0:
            info["gpus"] = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def machine_line(m: dict) -> str:
    return (
        f"{m['cpu_model']} (family/model {m.get('cpu_family_model', '?')}, {m.get('simd', '?')}, "
        f"{m['cpus']} CPUs, {m['memory_gib']} GiB)"
    )


def save(base: str, res: dict, md: str) -> str:
    """<base>.json (every number, the machine and its load at the end) and <base>.md (the table)."""
    res["machine"]["load_avg_at_end"] = os.getloadavg()
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(md + "\n")
    return base


def _ratio(a, b):
    return round(a / b, 3) if b else None


def table(res: dict) -> str:
    p, b = res["sides"].get("product"), res["sides"].get("baseline")
    sides = [s for s in (p, b) if s]
    head = (
        "| | "
        + " | ".join(n for n in ("product", "baseline") if res["sides"].get(n))
        + (" | product / baseline |" if p and b else " |")
    )
    lines = [head, "|" + "---|" * (len(sides) + 1 + (1 if p and b else 0))]

    def row(label, vals, fmt, ratio=True):
        cells = [fmt(v) for v in vals]
        extra = (
            f" | {_ratio(vals[0], vals[1]):.2f}"
            if (p and b and ratio and vals[1])
            else (" | " if p and b else "")
        )
        lines.append(f"| {label} | " + " | ".join(cells) + extra + " |")

    for stage in sides[0]["aligned_s"]:
        row(f"{stage} (s)", [s["aligned_s"][stage] for s in sides], lambda v: f"{v:.1f}")
    row("**wall, whole process (s)**", [s["wall_s"] for s in sides], lambda v: f"**{v:.1f}**")
    row("CPU time, all processes (s)", [s["cpu_s"] for s in sides], lambda v: f"{v:.1f}")
    row("**peak memory, all processes (GB)**", [s["peak_gb"] for s in sides], lambda v: f"**{v:.2f}**")
    row(
        "  of which shared memory / object store (GB)",
        [s["peak_shm_gb"] for s in sides],
        lambda v: f"{v:.2f}",
        ratio=False,
    )
    row("peak sum of PSS (GB)", [s["peak_pss_gb"] for s in sides], lambda v: f"{v:.2f}")
    row(
        "  driver's own peak (PSS without the object store, GB)",
        [s.get("driver_peak_gb", 0) for s in sides],
        lambda v: f"{v:.2f}",
        ratio=False,
    )
    row("peak sum of USS (GB)", [s["peak_uss_gb"] for s in sides], lambda v: f"{v:.2f}")
    row("peak sum of RSS (GB, double counts shared)", [s["peak_rss_gb"] for s in sides], lambda v: f"{v:.2f}")
    row("processes (max)", [s["processes_max"] for s in sides], lambda v: str(v), ratio=False)
    row(
        "collision rate before dedup",
        [s["metrics"]["collision_rate"] for s in sides],
        lambda v: f"{100 * v:.3f}%",
    )
    row("max bucket", [s["metrics"]["max_bucket"] for s in sides], lambda v: str(v))
    row(
        "relative reconstruction error",
        [s["metrics"]["relative_reconstruction_error"] for s in sides],
        lambda v: f"{v:.4f}",
    )
    row(
        "codes used per level",
        [s["metrics"]["codes_used"] for s in sides],
        lambda v: "/".join(map(str, v)),
        ratio=False,
    )
    return "\n".join(lines)


def targets(res: dict) -> dict:
    p, b = res["sides"].get("product"), res["sides"].get("baseline")
    if not (p and b):
        return {}
    pm, bm = p["metrics"], b["metrics"]
    return {
        "wall <= 0.5 x baseline": p["wall_s"] <= 0.5 * b["wall_s"],
        "peak memory <= 2.5 GB": p["peak_gb"] <= 2.5,
        "collision rate <= baseline": pm["collision_rate"] <= bm["collision_rate"],
        "recon error <= baseline": pm["relative_reconstruction_error"] <= bm["relative_reconstruction_error"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="kmeans benchmark: product vs FAISS baseline")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--data", default=None, help="catalog dir (default /tmp/bench/catalog_<n>[_str])")
    ap.add_argument(
        "--id_type",
        default="int",
        choices=synth.ID_TYPES,
        help='ItemIDs of the synthetic catalog: int, or string ("SKU-%%012d", 16 bytes)',
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT") or os.path.join(REPO, "bench_out"))
    ap.add_argument("--sides", default="product,baseline", help="comma list: product, baseline")
    ap.add_argument("--keep", action="store_true", help="keep both sides' output folders")
    ap.add_argument(
        "--product-src",
        default=REPO,
        help="run the product from this source tree (e.g. an exported older commit)",
    )
    ap.add_argument(
        "--product-flags",
        default="",
        help="more semid flags for the product, e.g. '--kmeans_full_dim_levels 2'",
    )
    a = ap.parse_args()
    if a.id_type == "string" and "baseline" in a.sides:
        ap.error("the FAISS baseline reads integer ItemIDs: --id_type string needs --sides product")

    data = synth.ensure(a.n, a.data or synth.default_out(a.n, a.id_type), a.shards, a.dim, id_type=a.id_type)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    tag = f"{a.n}_{a.device}" + ("_str" if a.id_type == "string" else "")
    os.makedirs(a.out, exist_ok=True)
    work = os.path.join(a.out, f"work_{tag}_{stamp}")
    os.makedirs(work)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=pythonpath(REPO))
    res = {
        "n": a.n,
        "dim": a.dim,
        "levels": 3,
        "codes": 256,
        "device": a.device,
        "id_type": a.id_type,
        "data": data,
        "timestamp": stamp,
        "machine": machine(),
        "sides": {},
        "command": " ".join([os.path.relpath(sys.executable, REPO)] + sys.argv),
        "product_flags": a.product_flags,
    }
    for side in a.sides.split(","):
        if side.strip() == "product":
            res["sides"]["product"] = run_product(
                data, work, a.device, env, os.path.abspath(a.product_src), shlex.split(a.product_flags)
            )
        else:
            res["sides"]["baseline"] = run_baseline(data, work, a.device, env)
    res["ratios"] = {}
    if len(res["sides"]) == 2:
        p, b = res["sides"]["product"], res["sides"]["baseline"]
        res["ratios"] = {
            "wall": _ratio(p["wall_s"], b["wall_s"]),
            "peak_memory": _ratio(p["peak_gb"], b["peak_gb"]),
        }
    res["targets_met"] = targets(res)
    md = table(res)
    base = save(os.path.join(a.out, f"kmeans_{tag}_{stamp}"), res, md)
    if not a.keep:
        for d in ("product_out", "baseline_out"):
            shutil.rmtree(os.path.join(work, d), ignore_errors=True)
    print(
        f"\nkmeans benchmark: N={a.n}, D={a.dim}, 3 x 256, device {a.device}, {a.id_type} ItemIDs, "
        + (f"product flags '{a.product_flags}', " if a.product_flags else "")
        + f"{machine_line(res['machine'])}"
    )
    print(md)
    prod = res["sides"].get("product")
    if prod and prod.get("policy"):
        c, wall = prod["policy"], prod["wall_s"]
        print(
            f"  collision policy {c['policy']}: collision rate {100 * c['rate_before']:.3f}% -> "
            f"{100 * c['rate_after']:.3f}%, {c['moved']} moved, {c['suffix_items']} items need a suffix "
            f"({100 * c['suffix_items'] / a.n:.3f}%), "
            f"error {c['error_before']:.4f} -> {c['error_after']:.4f} "
            f"({100 * (c['error_after'] / c['error_before'] - 1):+.2f}%), {c['seconds']:.2f} s "
            f"({100 * c['seconds'] / wall:.1f}% of wall)"
        )
        print(f"  quality report: {prod['quality_s']:.2f} s ({100 * prod['quality_s'] / wall:.1f}% of wall)")
    if prod and prod.get("driver"):
        d = prod["driver"]
        print(f"  driver peak RSS {d['peak_rss_gb']:.2f} GB, {d['bytes_per_item']:.0f} bytes per item")
        stages = d.get("stage_peak_rss_gb") or {}
        print("  driver peak RSS per stage (GB): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    for k, v in res["targets_met"].items():
        print(f"  target {k}: {'met' if v else 'NOT met'}")
    print(f"results: {base}.json")


if __name__ == "__main__":
    main()

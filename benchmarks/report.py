"""What a run leaves behind: the JSON record, the markdown table, the plot, the results index.

Files under the output folder (default benchmarks/results/):

    <device>-<UTC stamp>.json / .md / .png    one run
    latest-<device>.json / .md / .png         copies of the device's latest run
    README.md                                 the latest table and plot of every device

<device> is "cpu" or the GPU's name as a slug (e.g. nvidia-h100-80gb-hbm3).
"""
from __future__ import annotations

import json
import os
import tempfile
import platform
import re
import subprocess
import time
from collections import defaultdict
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import torch

import moelora
from benchmarks.cases import Case, work
from benchmarks.harness import Row, Settings

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Where a run writes unless asked to --record into the tracked RESULTS_DIR: outside the tree,
# so running the benchmark never dirties a checkout.
DEFAULT_OUT = Path(os.environ.get("MOELORA_BENCH_OUT") or Path(tempfile.gettempdir()) / "moelora-benchmarks")


def busy_host(load: float | None, cores: int | None = None) -> str | None:
    """A warning when other work holds the CPU (load average above half the cores): every CPU
    timing, and the launch overhead of GPU ones, is then skewed."""
    cores = cores or os.cpu_count() or 1
    if load is None or load <= 0.5 * cores:
        return None
    return (f"warning: the host is busy (load average {load:.1f} on {cores} cores): timings are "
            f"skewed; rerun on a quiet machine before trusting them")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout. The GPU machine gets a copy of the working tree without
    .git: there MOELORA_GIT_COMMIT (and MOELORA_GIT_DIRTY=0/1), set by the caller, stand in."""
    commit = _git("rev-parse", "HEAD")
    if commit is not None:
        status = _git("status", "--porcelain")
        return commit, None if status is None else bool(status)
    dirty = os.environ.get("MOELORA_GIT_DIRTY")
    return os.environ.get("MOELORA_GIT_COMMIT") or None, None if dirty is None else dirty == "1"


def device_details(device: torch.device) -> dict:
    """What a GPU timing depends on beyond its name: capability, SMs, L2, memory."""
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    return {
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "l2_cache_mib": round(props.L2_cache_size / 2**20, 1),
        "memory_gib": round(props.total_memory / 2**30, 1),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def load_average() -> float | None:
    """The host's 1-minute load average: other work on the CPU skews every CPU timing."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def record(
    rows: list[Row], cases: list[Case], settings: Settings, command: str, load: tuple = (None, None),
) -> dict:
    """The JSON record of a run: environment, settings, cases with their floors, rows.
    load: the load average before the run (other work) and after it (this run's threads too)."""
    device = settings.device
    commit, dirty = _commit()
    dtypes_of = defaultdict(list)
    for r in rows:
        if r.dtype not in dtypes_of[r.case]:
            dtypes_of[r.case].append(r.dtype)
    return {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "device": {"type": device.type, "name": device_name(device), "slug": device_slug(device),
                   **device_details(device)},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "moelora": moelora.__version__,
            "peft": _version("peft"),
        },
        "git": {"commit": commit, "dirty": dirty},
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": {"before": load[0], "after": load[1]},
        "moelora_backends": moelora.available_backends(device),
        "settings": {
            "timer": "triton.testing.do_bench (CUDA events, L2 flushed), median"
            if device.type == "cuda" else "torch.utils.benchmark blocked_autorange, median",
            "min_run_time_s": settings.min_run_time,
            "warmup_ms": settings.warmup_ms,
            "rep_ms": settings.rep_ms,
            "max_input_sets": settings.max_sets,
            "passes": settings.passes,
            "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda"
            else "torch.profiler allocation events",
        },
        "cases": [
            {
                "name": c.name, "op": c.op, "title": c.title, "shape": c.shape, "routing": c.routing,
                "modes": list(settings.modes or c.modes), "dtypes": dtypes_of[c.name],
                "cuda_graph": c.graph, "sweep": list(c.sweep) if c.sweep else None, "target": c.target,
                "work": {d: work(c, getattr(torch, d)) for d in dtypes_of[c.name]},
            }
            for c in cases
        ],
        "rows": [asdict(r) for r in rows],
    }


# --------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------
def _num(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _spread(row: dict) -> str:
    """± the noise of a timing as a share of its median: half the interquartile range of its
    measurement or half the range between passes, whichever is larger. Differences smaller
    than it are noise."""
    median = row["median_ms"]
    if not median:
        return ""
    passes = row.get("pass_medians_ms") or [median]
    half = max(row["iqr_ms"] or 0.0, max(passes) - min(passes)) / 2
    return f" ±{100 * half / median:.0f}%"


def markdown_table(rows: list[dict]) -> str:
    """case, contestant, mode, median (ms, ± its noise) or peak (MiB), ratio over base,
    speed-up over the naive loop, status (with its reason), verdict against the case's target."""
    several_dtypes = len({r["dtype"] for r in rows}) > 1
    lines = [
        "| case | contestant | mode | median / peak | x base | speed-up vs naive | status | target |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        case = f"{r['case']} ({r['dtype']})" if several_dtypes else r["case"]
        value = ""
        if r["mode"] == "memory" and r["peak_mib"] is not None:
            value = f"{r['peak_mib']:.1f} MiB"
        elif r["median_ms"] is not None:
            value = f"{r['median_ms']:.3f} ms{_spread(r)}"
            if r.get("back_to_back_ms") is not None and not r["cuda_graph"]:
                # eager GPU call: device time alone, then per call issued back to back
                value += f" (b2b {r['back_to_back_ms']:.3f})"
        status = r["status"] + (f" ({r['reason']})" if r["reason"] else "")
        if r["cuda_graph"]:
            status += " [CUDA graph]"
        lines.append(
            f"| {case} | {r['contestant']} | {r['mode']} | {value} | {_num(r['ratio_over_base'], '.2f')} "
            f"| {_num(r['speedup_over_naive'], '.2f')} | {status.replace('|', '/')} "
            f"| {str(r.get('verdict', 'n.a.')).replace('|', '/')} |"
        )
    return "\n".join(lines)


def render_markdown(rec: dict, image: str | None, level: int = 1) -> str:
    h = "#" * level
    v, git = rec["versions"], rec["git"]
    commit = (git["commit"] or "unknown")[:12] + (" + uncommitted changes" if git["dirty"] else "")
    parts = [
        f"{h} moelora benchmarks: {rec['device']['name']}",
        "",
        f"{rec['created']} · `{rec['command']}` · commit {commit}  ",
        f"torch {v['torch']} · triton {v['triton']} · CUDA {v['cuda']} · python {v['python']} · "
        f"peft {v['peft']} · moelora backends here: {', '.join(rec['moelora_backends'])}  ",
        f"Timer: {rec['settings']['timer']}, {rec['settings']['passes']} pass(es) over the suite; "
        f"memory: {rec['settings']['memory']}. "
        "Ratios divide by the floor (the base linear `F.linear(x, W, b)`, or the K head GEMMs) "
        "measured in the same run on the same inputs; every contestant was checked against "
        "the float64 reference before it was timed. `±`: half the interquartile range or half "
        "the range between passes, whichever is larger; smaller differences are noise."
        + (" `b2b` (GPU, eager calls): ms per call issued back to back, launch overhead "
           "included; the median itself is device time (L2 flushed before each call)."
           if rec["device"]["type"] == "cuda" else ""),
        "",
    ]
    if rec.get("interrupted"):
        parts += ["**Interrupted**: the run was cut short; only the cases that finished are here.", ""]
    load = rec["load_average"]["before"]
    if load is not None and load > 0.5 * (rec["cpu_count"] or 1):
        parts += [
            f"**Busy host**: load average {load} on {rec['cpu_count']} CPUs when the run began; "
            "other work competed for the cores, so CPU-side timings are noisy.",
            "",
        ]
    parts += [
        f"{h}# Cases",
        "",
        "| case | shape | dtype | modes | what | target (docs/perf.md) |",
        "|---|---|---|---|---|---|",
    ]
    for c in rec["cases"]:
        shape = " ".join(f"{k}={val}" for k, val in c["shape"].items())
        parts.append(
            f"| {c['name']} | {shape} {c['routing'] if c['op'] == 'molora' else ''} | "
            f"{', '.join(c['dtypes'])} | {', '.join(c['modes'])} | {c['title']} | {c['target']} |"
        )
    parts += ["", f"{h}# Results", "", markdown_table(rec["rows"]), ""]
    if image:
        parts += [f"![time over the base linear in the sweeps]({image})", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------
def plot(rec: dict, path: Path) -> str | None:
    """Ratio over the base linear along each sweep, one line per contestant, error bars from
    the contestant's spread (interquartile range relative to its median), the shape held fixed
    in each panel's title. Returns why there is no plot, or None once written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    point = {c["name"]: c["sweep"] for c in rec["cases"] if c["sweep"]}
    axes_names = list(dict.fromkeys(axis for axis, _ in point.values()))
    if not axes_names:
        return "no sweep case was run: no plot"
    swept = [r for r in rec["rows"] if r["case"] in point and r["ratio_over_base"]]
    several_modes = len({r["mode"] for r in swept}) > 1
    several_dtypes = len({r["dtype"] for r in swept}) > 1
    floors = {"base linear", "K head GEMMs"}  # the dashed line at 1
    fig, axes = plt.subplots(1, len(axes_names), figsize=(6.5 * len(axes_names), 4.8), squeeze=False)
    for ax, axis in zip(axes[0], axes_names):
        series = defaultdict(list)
        for r in swept:
            if point[r["case"]][0] == axis and r["contestant"] not in floors:
                label = r["contestant"] + (f" {r['mode']}" if several_modes else "")
                label += f" ({r['dtype']})" if several_dtypes else ""
                spread = (r["iqr_ms"] / r["median_ms"]) if r.get("iqr_ms") and r.get("median_ms") else 0.0
                series[label].append((point[r["case"]][1], r["ratio_over_base"], r["ratio_over_base"] * spread))
        for label, pts in sorted(series.items()):
            xs, ys, errs = zip(*sorted(pts))
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="base linear")
        ax.set_xscale("log", base=2)
        values = sorted({v for a, v in point.values() if a == axis})
        ax.set_xticks(values, [str(v) for v in values])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
        ratios = [y for pts in series.values() for _, y, _ in pts]
        if ratios and max(ratios) / min(ratios) < 20:  # label minor ticks only where they don't crowd
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
        ax.set_xlabel(axis)
        ax.set_ylabel("time / base linear, same inputs (lower is better)")
        ax.set_title(f"sweep over {axis}" + _fixed_shape(rec, point, axis), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    dtypes = ", ".join(sorted({r["dtype"] for r in swept}))
    fig.suptitle(f"{rec['device']['name']} ({dtypes}): moelora vs its peers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _fixed_shape(rec: dict, point: dict, axis: str) -> str:
    """' (d_in=1024, E=8, ...)': the shape entries every case of the sweep shares."""
    shapes = [c["shape"] for c in rec["cases"] if c["name"] in point and point[c["name"]][0] == axis]
    if not shapes or not all(isinstance(sh, dict) for sh in shapes):
        return ""
    fixed = {k: v for k, v in shapes[0].items() if k != axis and all(sh.get(k) == v for sh in shapes)}
    return " (" + ", ".join(f"{k}={v}" for k, v in fixed.items()) + ")" if fixed else ""


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def write(rec: dict, out_dir: Path) -> tuple[list[Path], str | None]:
    """Write the run's files, refresh latest-<device>.* and the index. Returns the paths written
    and why there is no plot (None when there is one)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = rec["device"]["slug"]
    stamp = rec["created"].replace("-", "").replace(":", "")
    written = []
    png = out_dir / f"{slug}-{stamp}.png"
    no_plot = plot(rec, png)
    latest_png = out_dir / f"latest-{slug}.png"
    if no_plot is None:
        latest_png.write_bytes(png.read_bytes())
        written += [png, latest_png]
    else:
        latest_png.unlink(missing_ok=True)  # never leave an older run's plot beside this table
    for stem, image in ((f"{slug}-{stamp}", png.name), (f"latest-{slug}", latest_png.name)):
        (out_dir / f"{stem}.json").write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
        md = render_markdown(rec, image if no_plot is None else None)
        (out_dir / f"{stem}.md").write_text(md, encoding="utf-8")
        written += [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    written.append(write_index(out_dir))
    return written, no_plot


def write_index(out_dir: Path) -> Path:
    """README.md: the latest table and plot of every device recorded in out_dir."""
    parts = [
        "# Recorded benchmark results",
        "",
        "Regenerated by `python -m benchmarks` on every run (do not edit by hand). One section per "
        "device: its latest run. Every run is kept as `<device>-<UTC stamp>.json/.md/.png`; "
        "the JSON holds the environment, the shapes, the floors (FLOPs, bytes) and every row. "
        "Observations and floors: [../NOTES.md](../NOTES.md).",
        "",
    ]
    for path in sorted(out_dir.glob("latest-*.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        png = path.with_suffix(".png")
        parts.append(render_markdown(rec, png.name if png.exists() else None, level=2))
    index = out_dir / "README.md"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index

"""The harness every benchmark goes through: check first, then time, then compare.

For each case: build the input sets, compute the float64 reference on the first, then for
every contestant: set up, check against the reference (the output, and the gradients when a
mode differentiates), and only when right, measure each mode. A wrong contestant is reported
as WRONG and never timed. Every value is then divided by the floor's (the base linear) from the
same run on the same inputs, and compared with the naive loop's.

Modes:
    forward   inference: the call under torch.no_grad()
    backward  torch.autograd.grad of one retained forward graph
    fwd+bwd   the call, then torch.autograd.grad of its output
    memory    the peak of extra memory during one call (fwd+bwd for a training case, forward
              otherwise), above what was allocated before it

Timing. GPU: triton.testing.do_bench (CUDA events, warm-up, L2 flushed before every call,
median and quartiles), rotating through enough input sets to exceed twice the L2 cache; decode
cases time the replay of a CUDA graph of the call. CPU: torch.utils.benchmark's
blocked_autorange (median and quartiles) on all of torch's threads.
Memory. GPU: the caching allocator's peak counter. CPU: the allocation events of torch.profiler.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from benchmarks.cases import GRAD_MODES, Case, default_dtype
from benchmarks.ops import OPS, Contestant, InputSet, Prepared, Skip, brief

# Relative error ||out - ref|| / ||ref|| above which a contestant is WRONG. Generous on purpose:
# this check catches wrong answers (errors of 0.1 and up with these inputs), rounding is the
# unit tests' business. fp32 leaves room for TF32 dots in Triton kernels (~1e-3); 16-bit for
# the rounding of the rank-r intermediate and of gate gradients (sums of r products).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}

MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    device: torch.device
    min_run_time: float = 0.2  # CPU: seconds of calls per measurement (blocked_autorange)
    warmup_ms: int = 25  # GPU: do_bench warm-up and measurement budgets
    rep_ms: int = 100
    max_sets: int = 4  # GPU: most input sets rotated through
    backends: tuple | None = None  # moelora backends; None: those of the device type
    contestants: tuple | None = None  # contestant name patterns to keep; None: all
    modes: tuple | None = None  # overrides each case's modes
    passes: int = 1  # passes over the whole suite, minutes apart (the host's slow drift)
    rounds: int = 3  # rounds within a case: every contestant timed once per round, interleaved

    @classmethod
    def quick(cls, device: torch.device, **kw) -> "Settings":
        return cls(device, min_run_time=0.01, warmup_ms=5, rep_ms=20, **{"passes": 1, "rounds": 1, **kw})


@dataclass
class Row:
    case: str
    dtype: str
    contestant: str
    mode: str  # a mode, or "*" when the status holds for every mode of the case
    status: str  # ok | WRONG | error | unavailable | not applicable
    reason: str = ""
    median_ms: float | None = None
    iqr_ms: float | None = None
    peak_mib: float | None = None
    ratio_over_base: float | None = None
    speedup_over_naive: float | None = None
    rel_error: float | None = None
    tolerance: float | None = None
    cuda_graph: bool = False
    input_sets: int = 1
    pass_medians_ms: list | None = None  # each pass's median, when the suite ran several
    back_to_back_ms: float | None = None  # GPU: per call, issued back to back (launch overhead in)
    verdict: str = "n.a."  # a moelora row against its case's target: met / missed (why) / n.a.

    @property
    def value(self) -> float | None:
        """What the ratios compare: time, or peak memory in memory mode."""
        return self.peak_mib if self.mode == "memory" else self.median_ms


@dataclass
class Reference:
    out: torch.Tensor  # float64
    grads: dict = field(default_factory=dict)  # argument name -> float64 gradient


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.detach().double() - ref).norm().item()
    denom = ref.norm().item()
    return diff / denom if denom > 0 else diff


# --------------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------------
def _as_float64(args: dict, grad_names: tuple) -> dict:
    out = {}
    for name, v in args.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().double().requires_grad_(name in grad_names)
        out[name] = v
    return out


def reference(case: Case, inp: InputSet, with_grads: bool) -> Reference:
    op = OPS[case.op]
    names = op.grad_names(case) if with_grads else ()
    args = _as_float64(inp.args, names)
    with torch.set_grad_enabled(with_grads):
        out = op.reference()(**args)
    if not with_grads:
        return Reference(out.detach())
    grads = torch.autograd.grad(out, [args[n] for n in names], _grad_out_like(out, inp))
    return Reference(out.detach(), dict(zip(names, grads)))


def _flat(wrt: dict) -> list[torch.Tensor]:
    return [t for ts in wrt.values() for t in ts]


def _grad_out_like(out: torch.Tensor, inp: InputSet) -> torch.Tensor:
    """The input set's dy in out's dtype (log-probs come out in fp32, the float64 reference in
    float64); the floor may output another shape (the K head GEMMs: the logits)."""
    if out.shape != inp.grad_out.shape:
        return torch.randn_like(out)
    return inp.grad_out.to(out.dtype)


def check(p: Prepared, inp: InputSet, ref: Reference, with_grads: bool) -> dict[str, float]:
    """Relative error of the output and, with_grads, of each gradient the contestant computes."""
    if not with_grads or p.no_grad_reason:
        with torch.no_grad():
            return {"out": rel_error(p.forward(), ref.out)}
    out = p.forward()
    grads = iter(torch.autograd.grad(out, _flat(p.wrt), _grad_out_like(out, inp)))
    errors = {"out": rel_error(out, ref.out)}
    for name, tensors in p.wrt.items():
        grad = torch.stack([next(grads) for _ in tensors]).reshape(ref.grads[name].shape)
        errors[f"grad {name}"] = rel_error(grad, ref.grads[name])
    return errors


# --------------------------------------------------------------------------------------------
# what one mode runs, and how it is measured
# --------------------------------------------------------------------------------------------
def differentiates(case: Case, modes: tuple) -> bool:
    """Whether any of `modes` runs autograd (memory does for a training case)."""
    return any(m in GRAD_MODES or (m == "memory" and case.train) for m in modes)


def call_for(mode: str, case: Case, p: Prepared, inp: InputSet) -> Callable:
    """The zero-argument call that `mode` measures, on one input set."""
    if not differentiates(case, (mode,)):
        def forward():
            with torch.no_grad():
                return p.forward()

        return forward
    if p.no_grad_reason:
        raise Skip("not applicable", p.no_grad_reason)
    if mode == "backward" and p.no_retain_reason:
        raise Skip("not applicable", p.no_retain_reason)
    inputs = _flat(p.wrt)
    if mode == "backward":
        out = p.forward()  # one graph, differentiated again and again
        grad_out = _grad_out_like(out, inp)

        def backward():
            return torch.autograd.grad(out, inputs, grad_out, retain_graph=True)

        return backward
    grad_out = _grad_out_like(p.forward(), inp)

    def forward_backward():
        return torch.autograd.grad(p.forward(), inputs, grad_out)

    return forward_backward


def _cuda_graph(call: Callable) -> Callable:
    """The replay of a CUDA graph of call(), warmed up on a side stream first as capture needs
    (lazy initialisation, autotuning and allocator growth must not happen while capturing)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            out = call()
    except BaseException:
        # torch.cuda.graph.__exit__ skips restoring the stream when capture_end raises (a sync
        # or an uncapturable launch inside): without this, every later timing of the run would
        # run on the dead capture's side stream.
        torch.cuda.set_stream(current)
        torch.cuda.synchronize()
        raise

    def replay():
        graph.replay()
        return out  # lives in the graph's memory pool, rewritten by every replay

    return replay


def _rotate(calls: list[Callable]) -> Callable:
    if len(calls) == 1:
        return calls[0]
    nxt = itertools.cycle(calls).__next__
    return lambda: nxt()()


def measure_time(call: Callable, settings: Settings) -> tuple[float, float]:
    """(median, interquartile range) in milliseconds, after warm-up."""
    if settings.device.type == "cuda":
        import triton.testing

        q1, median, q3 = triton.testing.do_bench(
            call, warmup=settings.warmup_ms, rep=settings.rep_ms, quantiles=[0.25, 0.5, 0.75]
        )
        return median, q3 - q1
    from torch.utils import benchmark

    call()  # warm-up: a compile or a lazy initialisation is not the call's time
    timer = benchmark.Timer("call()", globals={"call": call}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=settings.min_run_time)
    return m.median * 1e3, m.iqr * 1e3


def measure_back_to_back(call: Callable, settings: Settings) -> float | None:
    """GPU: milliseconds per call of calls issued back to back (CUDA events around the loop, no
    L2 flush in between). do_bench's flush before every call gives the host a head start, so its
    median is device time alone and hides the launch overhead of eager calls (Python, several
    launches), which is what small T costs outside a CUDA graph; this number includes it.
    None on CPU, where blocked_autorange already times the host."""
    if settings.device.type != "cuda":
        return None
    call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    per_call = (time.perf_counter() - t0) / 3
    n = max(3, min(2000, int(settings.rep_ms / 2e3 / max(per_call, 1e-6))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def measure_peak_bytes(call: Callable, device: torch.device) -> int:
    """Peak of memory allocated during one call, above what was allocated before it."""
    call()  # warm-up: compile caches and lazy workspaces are not the call's memory
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # No peak counter for CPU tensors: replay the allocator's events that the profiler records.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    return max(itertools.accumulate((n for _, n in events), initial=0))


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
def input_sets(case: Case, dtype: torch.dtype, settings: Settings, seed: int) -> list[InputSet]:
    """One set on CPU (its caches are far smaller than any case); on GPU, enough sets that
    rotating through them reads at least twice the L2 cache (do_bench also flushes L2)."""
    make = OPS[case.op].make_inputs
    first = make(case, settings.device, dtype, seed)
    n = 1
    if settings.device.type == "cuda":
        size = sum(
            v.numel() * v.element_size() for v in first.args.values() if isinstance(v, torch.Tensor)
        )
        l2 = torch.cuda.get_device_properties(settings.device).L2_cache_size
        n = max(1, min(settings.max_sets, math.ceil(2 * l2 / max(size, 1))))
    return [first] + [make(case, settings.device, dtype, seed + i) for i in range(1, n)]


def _keep(name: str, floor: str, settings: Settings) -> bool:
    """Contestants selected by name pattern; the floor always stays, every ratio needs it."""
    patterns = settings.contestants
    return patterns is None or name == floor or any(fnmatch.fnmatchcase(name, p) for p in patterns)


class Wrong(Exception):
    """A contestant whose output or gradients are off the reference by more than the tolerance."""

    def __init__(self, errors: dict[str, float], tol: float):
        self.worst = max(errors.values())
        self.detail = ", ".join(f"{k} {v:.2e}" for k, v in errors.items() if not v <= tol)
        super().__init__(f"relative error {self.detail} > {tol:.0e}")


def prepare(
    case: Case, contestant: Contestant, sets: list[InputSet], ref: Reference | None,
    with_grads: bool, tol: float,
) -> tuple[list[Prepared], dict[str, float]]:
    """Set a contestant up on every input set and check it on the first; raises Skip or Wrong."""
    build = contestant.setup(case)
    prepared = [build(inp) for inp in sets]
    errors = check(prepared[0], sets[0], ref, with_grads) if contestant.checked else {}
    if any(not v <= tol for v in errors.values()):  # `not <=`: a NaN error is wrong too
        raise Wrong(errors, tol)
    return prepared, errors


def _maybe_graphed(case: Case, contestant: Contestant, mode: str, calls: list, settings: Settings):
    """Decode cases on a GPU time CUDA-graph replays. Returns (calls, graphed, note)."""
    if not (case.graph and settings.device.type == "cuda" and mode == "forward"):
        return calls, False, ""
    if not contestant.capturable:
        return calls, False, "timed eagerly: host sync, cannot be captured in a CUDA graph"
    try:
        return [_cuda_graph(c) for c in calls], True, ""
    except Exception as exc:
        return calls, False, f"timed eagerly: CUDA graph capture failed ({brief(exc)})"


def _prepare_contestant(
    case: Case, dtype: torch.dtype, contestant: Contestant, sets: list[InputSet],
    ref: Reference | None, modes: tuple, log: Callable[[str], None],
) -> tuple[list[Prepared] | None, dict, list[Row]]:
    """Set up and check one contestant: (prepared, checked fields, []) when right, else
    (None, {}, the one row saying why it is not timed)."""
    def row(status: str, **kw) -> Row:
        return Row(case.name, dtype_name(dtype), contestant.name, "*", status, **kw)

    tol = TOLERANCE[dtype]
    try:
        prepared, errors = prepare(case, contestant, sets, ref, differentiates(case, modes), tol)
    except Skip as s:
        return None, {}, [row(s.status, reason=s.reason)]
    except Wrong as w:
        log(f"  {contestant.name}: WRONG ({w}), not timed")
        return None, {}, [row("WRONG", reason=str(w), rel_error=w.worst, tolerance=tol)]
    except Exception as exc:
        log(f"  {contestant.name}: error {brief(exc)}")
        return None, {}, [row("error", reason=brief(exc))]
    return prepared, (dict(rel_error=max(errors.values()), tolerance=tol) if errors else {}), []


def _measure_mode(
    case: Case, dtype: torch.dtype, contestant: Contestant, prepared: list[Prepared],
    sets: list[InputSet], mode: str, checked: dict, settings: Settings,
    log: Callable[[str], None], calls_cache: dict,
) -> Row:
    """One measurement of one mode of a prepared contestant (the calls are built once per
    contestant and mode, then reused by every round)."""
    def row(status: str, **kw) -> Row:
        return Row(case.name, dtype_name(dtype), contestant.name, mode, status, **kw)

    note = "" if contestant.checked else "floor: not the op, not checked"
    try:
        if mode == "memory":
            call = call_for(mode, case, prepared[0], sets[0])
            peak = measure_peak_bytes(call, settings.device) / MIB
            log(f"  {contestant.name:<16} {mode:<8} {peak:.1f} MiB")
            return row("ok", reason=note, peak_mib=peak, **checked)
        if mode not in calls_cache:
            calls = [call_for(mode, case, p, inp) for p, inp in zip(prepared, sets)]
            calls_cache[mode] = _maybe_graphed(case, contestant, mode, calls, settings)
        calls, graphed, eager_note = calls_cache[mode]
        median, iqr = measure_time(_rotate(calls), settings)
        b2b = measure_back_to_back(_rotate(calls), settings)
    except Skip as s:
        return row(s.status, reason=s.reason)
    except Exception as exc:
        log(f"  {contestant.name} {mode}: error {brief(exc)}")
        return row("error", reason=brief(exc))
    shown = f"{median:.3f} ms" + (f" (back to back {b2b:.3f} ms)" if b2b is not None else "")
    log(f"  {contestant.name:<16} {mode:<8} {shown}")
    return row("ok", reason=note or eager_note, median_ms=median, iqr_ms=iqr, cuda_graph=graphed,
               input_sets=len(calls), back_to_back_ms=b2b, **checked)


def add_ratios(rows: list[Row], floor: str, naive: str) -> None:
    """ratio over the floor and speed-up over the naive loop, per (case, dtype, mode)."""
    ok = {(r.case, r.dtype, r.contestant, r.mode): r for r in rows if r.status == "ok"}
    for r in ok.values():
        base = ok.get((r.case, r.dtype, floor, r.mode))
        slow = ok.get((r.case, r.dtype, naive, r.mode))
        if base is not None and base.value and r.value is not None:
            r.ratio_over_base = r.value / base.value
        if slow is not None and slow.value is not None and r.value:
            r.speedup_over_naive = slow.value / r.value


def run_case(
    case: Case, dtype: torch.dtype, settings: Settings, log: Callable[[str], None],
    extra_contestants: list[Contestant] = (),
) -> list[Row]:
    """Check every contestant, then time them interleaved: settings.rounds rounds, each timing
    every contestant once per mode, so the floor and each contestant are measured seconds
    apart under the same host load; ratios are taken within a round, then merged by median
    (`merge_passes`). Memory is measured once (it does not drift with load)."""
    op = OPS[case.op]
    modes = settings.modes or case.modes
    contestants = [c for c in op.contestants(settings.device, dtype, settings.backends) if _keep(c.name, op.floor, settings)]
    contestants += list(extra_contestants)
    seed = sum(map(ord, case.name))  # inputs differ between cases, repeat between runs
    sets = input_sets(case, dtype, settings, seed)
    ref = reference(case, sets[0], differentiates(case, modes)) if any(c.checked for c in contestants) else None
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()  # the float64 reference's blocks are not the contestants'
    ready, failed = [], {}
    for c in contestants:
        prepared, checked, rows = _prepare_contestant(case, dtype, c, sets, ref, modes, log)
        if prepared is None:
            failed[c.name] = rows
        else:
            ready.append((c, prepared, checked, {}))
    rounds = []
    for n in range(settings.rounds):
        if settings.rounds > 1:
            log(f"  round {n + 1}/{settings.rounds}")
        rows = []
        for c, prepared, checked, calls_cache in ready:
            for mode in modes:
                if mode == "memory" and n > 0:
                    continue
                rows.append(_measure_mode(case, dtype, c, prepared, sets, mode, checked, settings,
                                          log, calls_cache))
        add_ratios(rows, op.floor, op.naive)
        rounds.append(rows)
    merged = {(r.contestant, r.mode): r for r in merge_passes(rounds, "round")}
    out = []
    for c in contestants:  # suite order: each contestant's rows together
        out += failed.get(c.name) or [merged[(c.name, m)] for m in modes if (c.name, m) in merged]
    return out


def stderr_log(start: float) -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    return log


def run_suite(
    cases: list[Case], dtypes: list[torch.dtype] | None, settings: Settings,
    log: Callable[[str], None] | None = None, extra_contestants: dict | None = None,
) -> list[Row]:
    """Every case at every dtype (a case with its own dtype keeps it unless dtypes are given),
    settings.passes times over the whole suite, merged by `merge_passes`.
    extra_contestants: op name -> contestants added to each case of that op (tests use it)."""
    log = log or stderr_log(time.perf_counter())
    passes = []
    units = [(case, dtype) for case in cases for dtype in dtypes or [case.dtype or default_dtype(settings.device)]]
    total, done, start = settings.passes * len(units), 0, time.perf_counter()
    try:
        for n in range(settings.passes):
            rows = []
            passes.append(rows)  # kept, as far as it got, if the run is interrupted
            for case, dtype in units:
                where = f"pass {n + 1}/{settings.passes} " if settings.passes > 1 else ""
                log(f"{where}({done + 1}/{total}) {case.name} [{dtype_name(dtype)}] {case.describe()}"
                    f"{eta(time.perf_counter() - start, done, total)}")
                rows += run_case(case, dtype, settings, log, (extra_contestants or {}).get(case.op, []))
                done += 1
    except KeyboardInterrupt:
        # SIGINT (e.g. `timeout -s INT` on a time-limited GPU machine): keep every case that
        # finished, so the record of a run cut short is still written.
        log("interrupted: recording the cases that finished")
        merged = SuiteRows(add_verdicts(merge_passes([p for p in passes if p]), cases))
        merged.interrupted = True
        return merged
    return SuiteRows(add_verdicts(merge_passes(passes), cases))


def eta(elapsed: float, done: int, total: int) -> str:
    """' · ETA 1m05s' from the mean time of the units done so far ('' before the first)."""
    if done == 0 or total <= done:
        return ""
    left = round(elapsed / done * (total - done))
    return f" · ETA {left // 60}m{left % 60:02d}s" if left >= 60 else f" · ETA {left}s"


def _is_moelora(name: str) -> bool:
    return name.startswith("moelora:")


def _faster(peer: Row, row: Row) -> bool:
    """Whether peer beat row. By their ratios over the floor where both have one: each is a
    median of per-round ratios (the floor timed seconds apart from the contestant), so a pass
    the host ran slow does not favour whichever contestant it spared; the medians of raw times
    across passes mix passes minutes apart (one run here had its base at 24 and 26 ms). Raw
    medians only where there is no ratio."""
    if peer.ratio_over_base is not None and row.ratio_over_base is not None:
        return peer.ratio_over_base < row.ratio_over_base
    return peer.median_ms is not None and row.median_ms is not None and peer.median_ms < row.median_ms


def verdict(row: Row, case: Case, peers: list[Row]) -> str:
    """A moelora row against its case's target (docs/perf.md): "met", "missed (why)", or "n.a."
    (not moelora, not measured, or no target for this mode). The target is the case's
    ratio limit over the floor in the modes it names, memory against the naive form, and, in
    every timed mode, being faster than every peer measured in the same run (`_faster`)."""
    if not _is_moelora(row.contestant) or row.status != "ok":
        return "n.a."
    misses, judged = [], False
    if row.mode == "memory":
        if case.memory_vs_naive is None:
            return "n.a."
        judged = True
        if row.speedup_over_naive is None or 1 / row.speedup_over_naive > case.memory_vs_naive:
            share = "?" if row.speedup_over_naive is None else f"{1 / row.speedup_over_naive:.2f}"
            misses.append(f"peak {share} of naive > {case.memory_vs_naive:g}")
        return ("missed (" + "; ".join(misses) + ")") if misses else "met"
    if case.limit is not None and row.mode in case.limit_modes:
        judged = True
        if row.ratio_over_base is None or row.ratio_over_base > case.limit:
            misses.append(f"{row.ratio_over_base or float('nan'):.2f}x > {case.limit:g}x")
    if case.beat_peers:
        judged = True
        faster = [p.contestant for p in peers if _faster(p, row)]
        if faster:
            misses.append("slower than " + ", ".join(faster))
    if not judged:
        return "n.a."
    return ("missed (" + "; ".join(misses) + ")") if misses else "met"


def add_verdicts(rows: list[Row], cases: list[Case]) -> list[Row]:
    """Fill each row's verdict (see `verdict`); returns rows."""
    by_name = {c.name: c for c in cases}
    for r in rows:
        case = by_name.get(r.case)
        if case is None:
            continue
        floor = OPS[case.op].floor
        peers = [p for p in rows if (p.case, p.dtype, p.mode) == (r.case, r.dtype, r.mode)
                 and p.status == "ok" and p.contestant != floor and not _is_moelora(p.contestant)]
        r.verdict = verdict(r, case, peers)
    return rows


class SuiteRows(list):
    """run_suite's rows; `interrupted` when SIGINT cut the run short (the rows of the cases
    that finished, the last pass possibly partial)."""

    interrupted = False


def merge_passes(passes: list[list[Row]], unit: str = "pass") -> list[Row]:
    """One row per (case, dtype, contestant, mode) from several passes over the suite.

    Passes are minutes apart, so they see the host's slow drift (other work, clocks), which
    one measurement's quartiles do not: the median of the passes is reported, every pass's
    median is kept, and ratios are the median of each pass's ratio (base and contestant
    measured seconds apart). A row that is not ok in some pass is reported as that pass saw it.
    """
    groups: dict[tuple, list[Row]] = {}
    for rows in passes:
        for r in rows:
            groups.setdefault((r.case, r.dtype, r.contestant, r.mode), []).append(r)
    merged = []
    for rs in groups.values():
        m = dataclasses.replace(rs[0])
        failed = [(n, r) for n, r in enumerate(rs, 1) if r.status != "ok"]
        if failed:
            n, r = failed[0]
            m = dataclasses.replace(r)
            if len(failed) < len(rs):
                m.reason = f"in {unit} {n} of {len(rs)}: {r.reason}"
            merged.append(m)
            continue
        if m.mode != "memory":
            m.pass_medians_ms = [t for r in rs for t in (r.pass_medians_ms or [r.median_ms])]
            m.median_ms = statistics.median(m.pass_medians_ms)
            m.iqr_ms = statistics.median(r.iqr_ms for r in rs)
            b2b = [r.back_to_back_ms for r in rs if r.back_to_back_ms is not None]
            m.back_to_back_ms = statistics.median(b2b) if b2b else None
        else:
            m.peak_mib = max(r.peak_mib for r in rs)
        for name in ("ratio_over_base", "speedup_over_naive"):
            values = [getattr(r, name) for r in rs if getattr(r, name) is not None]
            setattr(m, name, statistics.median(values) if values else None)
        m.rel_error = max((r.rel_error for r in rs if r.rel_error is not None), default=None)
        merged.append(m)
    return merged

"""Structure of the compiled CPU kernels, read from the built extension's machine code.

GCC has twice produced kernels that were correct but several times slower than their source
suggests, in ways no timing on a noisy 2-core host showed reliably (benchmarks/NOTES.md,
2026-12-03 bf16 section):
- accumulator arrays kept in memory: a vector store to the stack per accumulator on every
  iteration of the multiply-add loop (masked-load intrinsics and multi-loop bodies block GCC's
  store motion);
- bf16 widening lowered to two half-width zero-extensions, an insert and a round trip of the
  vector through the stack;
- a broadcast written `{} + s` kept a scalar add of 0 before every vbroadcastss (0 + s is not
  s for s = -0.0), two uops per rank in the expand and outer loops where one load does.
These tests disassemble the extension (objdump) and check every innermost loop that multiplies.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from moelora.ops import extension

if not extension.load():
    pytest.skip("compiled extension moelora._C not loaded", allow_module_level=True)
if shutil.which("objdump") is None:
    pytest.skip("objdump not on PATH", allow_module_level=True)

_C = extension.module()
if "avx512" not in _C.compiled_cpu_isas().split(","):
    pytest.skip("extension built without the x86-64 multi-ISA kernels", allow_module_level=True)

_FUNC = re.compile(r"^([0-9a-f]+) <(.*)>:$")
_INSN = re.compile(r"^\s+([0-9a-f]+):\s+(.*)$")
_JUMP = re.compile(r"j\w+\s+([0-9a-f]+) <")
_MULTIPLY = re.compile(r"v(fmadd|dpbf16ps)")
# a full-width vector (ymm / zmm) written to the stack
_STACK_STORE = re.compile(r"vmov\w*\s+%[yz]mm\d+,.*\(%rsp\)")


def _functions() -> dict[str, list[tuple[int, str]]]:
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", extension.module().__file__],
                         capture_output=True, text=True, check=True).stdout
    funcs: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in out.splitlines():
        if m := _FUNC.match(line):
            current = m.group(2) if "moelora::cpu::" in m.group(2) else None
            if current is not None:
                funcs[current] = []
        elif current is not None and (m := _INSN.match(line)):
            funcs[current].append((int(m.group(1), 16), m.group(2)))
    return funcs


def _innermost_loops(insns: list[tuple[int, str]]) -> list[list[str]]:
    """Bodies of the loops (a backward jump within the function) that hold no other loop."""
    if not insns:
        return []
    start = insns[0][0]
    loops = [(int(m.group(1), 16), a) for a, t in insns
             if (m := _JUMP.match(t)) and start <= int(m.group(1), 16) <= a]
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    return [[t for a, t in insns if lo <= a <= hi] for lo, hi in inner]


FUNCS = _functions()


def _kernels(isa: str, fp: str) -> list[str]:
    return [n for n in FUNCS if f"moelora::cpu::{isa}::" in n and "double" not in n and fp in n]


@pytest.mark.parametrize("isa", ["avx512bf16", "avx512", "avx2"])
def test_multiply_loops_keep_accumulators_in_registers(isa):
    """No innermost multiply-add loop of the fp32 / bf16 kernels stores a vector to the stack.

    (The fp64 copies are not checked: they serve the reference-precision path.) The one
    exception is the last, partial column tile of outer_pairs (masked loads; n % 32 columns)."""
    checked, bad = 0, []
    for name in _kernels(isa, ""):
        if "outer_pairs_tile<" in name and ", false>" in name:
            continue
        for body in _innermost_loops(FUNCS[name]):
            if not any(_MULTIPLY.match(t) for t in body):
                continue
            checked += 1
            stores = [t for t in body if _STACK_STORE.match(t)]
            if stores:
                bad.append(f"{name[:120]}: {len(stores)} stack stores, e.g. {stores[0]}")
    assert checked >= 10, f"found only {checked} multiply loops in the {isa} kernels"
    assert not bad, "\n".join(bad)


def test_bf16_kernels_multiply_on_dot_products():
    """The avx512bf16 copy's bf16 x bf16 kernels are built on vdpbf16ps, and the others not."""
    for kernel in ("shrink_block_pairs", "outer_pairs_tile", "expand_pairs_cols"):
        names = [n for n in FUNCS if f"avx512bf16::{kernel}" in n]
        bodies = [t for n in names for _, t in FUNCS[n]]
        # small kernels may be inlined into their caller: then look there
        if not bodies:
            bodies = [t for n in FUNCS if "avx512bf16::" in n for _, t in FUNCS[n]]
        assert any(t.startswith("vdpbf16ps") for t in bodies), kernel
    assert not any(t.startswith("vdpbf16ps") for n in FUNCS if "::avx512::" in n for _, t in FUNCS[n])


def test_bf16_widening_is_one_zero_extension():
    """Widening 16 bf16 to fp32 in the AVX-512 kernels is one vpmovzxwd to a zmm, never the
    split form (vextracti32x4 + a half-width vpmovzxwd + vinserti32x8)."""
    for isa in ("avx512", "avx512bf16"):
        split = [n for n in _kernels(isa, "unsigned short")
                 if any(t.startswith("vinserti32x8") for _, t in FUNCS[n])]
        assert not split, f"{isa}: split widening in {split[:3]}"


@pytest.mark.parametrize("isa", ["avx512bf16", "avx512", "avx2"])
def test_multiply_loops_broadcast_without_scalar_arithmetic(isa):
    """The fp32 multiply-add loops do no scalar float arithmetic: each broadcast is one
    vbroadcastss (or an embedded {1to16}) from memory, not an add of 0 and a register broadcast."""
    checked, bad = 0, []
    for name in _kernels(isa, "float"):
        for body in _innermost_loops(FUNCS[name]):
            if not any(re.match(r"vfmadd\w*ps\b.*%[xyz]mm", t) for t in body):
                continue  # scalar tails (n % L columns) are scalar on purpose
            checked += 1
            scalar = [t for t in body if re.match(r"v(add|sub|mul)ss\b", t)]
            if scalar:
                bad.append(f"{name[:120]}: {scalar[0]}")
    assert checked >= 6, f"found only {checked} fp32 multiply loops in the {isa} kernels"
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("isa", ["avx512bf16", "avx512", "avx2"])
def test_per_token_expand_keeps_vectors_off_the_stack(isa):
    """The panel expands run a small block per token and column vector. Left as a call of its
    own, expand_pairs' block zeroed, spilled and reloaded its 8 accumulators through the stack on
    every call (24 vector memory operations against its 16 vdpbf16ps; inlined, the kernel went
    from 0.163 to 0.130 ms, benchmarks.cpu_kernels). No vector may touch the stack in them."""
    names = [n for n in FUNCS if f"moelora::cpu::{isa}::" in n
             and ("expand_entry(" in n or "expand_pairs_impl(" in n or "expand_pairs_cols<" in n)]
    assert any("expand_entry(" in n for n in names), names
    if isa == "avx512bf16":
        assert not any("expand_pairs_cols<" in n for n in names), "expand_pairs_cols is not inlined"
    bad = []
    for name in names:
        touches = [t for _, t in FUNCS[name] if re.search(r"%[yz]mm\d+.*\(%rsp\)|\(%rsp\).*%[yz]mm\d+", t)]
        if touches:
            bad.append(f"{name[:100]}: {len(touches)}, e.g. {touches[0]}")
    assert not bad, "\n".join(bad)

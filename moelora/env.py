"""Environment report: `python -m moelora.env`.

Prints what a bug report needs: Python, torch / triton / CUDA versions, the integrations'
versions (transformers, peft, trl, safetensors, bitsandbytes, torchao, or "not installed"),
the devices, how the compiled extension was built (moelora/_build_info.py, written by setup.py)
and which backends of the core op are available on each device.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys


def _version(module: str) -> str:
    """The module's version, "not installed", or why it is installed but does not import."""
    try:
        if importlib.util.find_spec(module) is None:
            return "not installed"
    except (ImportError, ValueError):
        return "not installed"
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as exc:  # noqa: BLE001  (a report must not fail)
        return f"not available ({type(exc).__name__}: {exc})"


def build_info() -> dict:
    """Build metadata recorded by setup.py, or {} for a source tree never built."""
    try:
        info = importlib.import_module("moelora._build_info")
    except ImportError:
        return {}
    return {k: v for k, v in vars(info).items() if not k.startswith("_")}


def report() -> str:
    import torch

    import moelora
    from moelora.ops import dispatch, extension

    lines = [
        f"moelora          {moelora.__version__} ({os.path.dirname(moelora.__file__)})",
        f"python           {sys.version.split()[0]} ({platform.platform()})",
        f"torch            {torch.__version__} (CUDA {torch.version.cuda}, "
        f"threads {torch.get_num_threads()})",
        f"triton           {_version('triton')}",
    ]
    for name in ("transformers", "peft", "trl", "safetensors", "bitsandbytes", "torchao"):
        lines.append(f"{name:<16} {_version(name)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i}           {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        lines.append("cuda device      none")

    loaded = extension.load()
    lines.append(f"extension        {'loaded' if loaded else 'not loaded'} (moelora._C)")
    if loaded:
        ext = extension.module()
        lines.append(f"  cpu isa        {ext.cpu_isa()} (compiled: {ext.compiled_cpu_isas()})")
        lines.append(f"  cpu route      {ext.cpu_route()}")
        lines.append(f"  with cuda      {ext.with_cuda}")
    info = build_info()
    if info:
        lines.append("build info       (moelora/_build_info.py)")
        lines += [f"  {key:<14} {value}" for key, value in info.items()]
    else:
        lines.append("build info       none (not built by setup.py)")

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for op, table in dispatch.registry().items():
        for dev in devices:
            reasons = table.reasons(dev, (torch.float32,))
            usable = [n for n, why in reasons.items() if why is None]
            lines.append(f"{op} on {dev.type}: {', '.join(usable)}")
            lines += [f"  no {n:<8} {why}" for n, why in reasons.items()
                      if why is not None and "has no" not in why]
    switches = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MOELORA_")}
    lines.append("switches         " + (", ".join(f"{k}={v}" for k, v in switches.items()) or "none set"))
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m moelora.env",
        description="Print what a bug report needs: versions, devices, how the compiled extension "
                    "was built, and which backend of each op runs here (and why the others do not).")
    parser.parse_args(argv)
    print(report())


if __name__ == "__main__":
    main()

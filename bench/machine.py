"""What the figures were measured on: CPU, cores, load, Python and library versions, commit."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

PACKAGES = ("aiohttp", "uvloop", "msgspec", "onnxruntime", "numpy", "prometheus-client", "bidder",
            "fastapi", "starlette", "uvicorn", "httptools", "orjson", "mmh3")  # the last six: the fastapi baseline


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: Path) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def model_id(bundle: Path) -> str | None:
    try:
        return json.loads((bundle / "meta.json").read_text()).get("model_id")
    except (OSError, ValueError):
        return None


def machine_info(repo: Path, wrk_version: str) -> dict:
    # The load average is recorded because on a shared machine it says how noisy the figures are.
    return {"cpu_model": cpu_model(), "nproc": os.cpu_count(),
            "usable_cpus": sorted(os.sched_getaffinity(0)), "loadavg": list(os.getloadavg()),
            "kernel": platform.release(), "python": platform.python_version(),
            "implementation": platform.python_implementation(), "versions": package_versions(),
            "wrk": wrk_version, "commit": git_commit(repo)}

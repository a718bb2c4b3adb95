"""Install sizes: the full venv (``make setup``) against the runtime one (``pip install .``, no torch).

    .venv/bin/python bench/venv_size.py                              # measure .venv and the runtime venv if built
    .venv/bin/python bench/venv_size.py --build-runtime /tmp/rt-venv # build the runtime venv from PyPI, then measure
    .venv/bin/python bench/venv_size.py --full .venv --runtime /tmp/rt-venv

Sizes are bytes on disk of every file under the venv (links not followed, hard
links counted once), in MB (10^6 bytes). The CUDA share is what the ``nvidia``
packages and torch's CUDA libraries take: a CPU-only torch (``make setup``'s
default ``TORCH_INDEX``) does not install them. ``--build-runtime`` needs PyPI.
"""
from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parent.parent
MB = 1_000_000
FULL_VENV = Path(os.environ.get("BENCH_FULL_VENV", REPO / ".venv"))
RUNTIME_VENV = Path(os.environ.get("BENCH_RUNTIME_VENV", Path(tempfile.gettempdir()) / "photo-mining-runtime-venv"))
PRODUCT = ("photocore", "nomad", "anti_sus", "gallery_bridge", "models", "stack")


def tree_bytes(root: Path, only: Iterable[str] | None = None) -> int:
    """Bytes of the regular files under ``root`` (no link followed, each inode once); ``only``: names of top entries."""
    seen: set[tuple[int, int]] = set()
    total = 0
    tops = [root / n for n in only] if only is not None else [root]
    for top in tops:
        if not top.exists():
            continue
        for dirpath, _dirs, files in os.walk(top, followlinks=False):
            for name in files:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except OSError:  # removed while walking: another process is installing
                    continue
                if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def site_packages(venv: Path) -> Path | None:
    """The venv's site-packages folder (``lib/pythonX.Y/site-packages``), or None."""
    found = sorted(venv.glob("lib/python*/site-packages"))
    return found[0] if found else None


def cuda_bytes(venv: Path) -> int:
    """What the CUDA builds of torch bring: the ``nvidia`` packages, ``triton``, and torch's own CUDA libraries."""
    sp = site_packages(venv)
    if sp is None:
        return 0
    total = tree_bytes(sp, ["nvidia", "triton"])
    lib = sp / "torch" / "lib"
    if lib.is_dir():
        total += sum(p.lstat().st_size for p in lib.iterdir()
                     if p.is_file() and not p.is_symlink() and any(k in p.name for k in ("cuda", "cudnn", "nccl", "cublas")))
    return total


def largest(venv: Path, n: int = 5) -> list[tuple[str, int]]:
    """The ``n`` largest top-level entries of site-packages."""
    sp = site_packages(venv)
    if sp is None:
        return []
    sizes = [(p.name, tree_bytes(p) if p.is_dir() else p.lstat().st_size) for p in sp.iterdir() if not p.is_symlink()]
    return sorted(sizes, key=lambda kv: -kv[1])[:n]


def build_runtime(venv: Path) -> None:
    """``python -m venv`` + ``pip install .`` (from a copy of the sources: pip builds in the tree it is given)."""
    with tempfile.TemporaryDirectory(prefix="venv-size-src-") as tmp:
        src = Path(tmp)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        for pkg in PRODUCT:
            shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "*.npz"))
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        str(src)], check=True, timeout=1800)


def measure(venv: Path) -> float | str:
    """MB of ``venv``, or a line saying it is not there."""
    if site_packages(venv) is None:
        return f"not built ({venv}: python bench/venv_size.py --build-runtime DIR)"
    return round(tree_bytes(venv) / MB, 1)


def collect(quick: bool, full: Path = FULL_VENV, runtime: Path = RUNTIME_VENV) -> dict[str, float | str]:
    """Sizes for bench/report.py; ``quick`` measures only the runtime venv (the full one is ~6 GB of files)."""
    figures: dict[str, float | str] = {"runtime_venv_mb": measure(runtime)}
    if not quick:
        figures["full_venv_mb"] = measure(full)
        if site_packages(full) is not None:
            figures["full_venv_cuda_mb"] = round(cuda_bytes(full) / MB, 1)
    # download.pytorch.org is not reachable from where this was written and measured: no figure is made up.
    figures["cpu_torch_venv_mb"] = "not measured (needs download.pytorch.org)"
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/venv_size.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", type=Path, default=FULL_VENV, help="the full venv (env BENCH_FULL_VENV)")
    p.add_argument("--runtime", type=Path, default=RUNTIME_VENV, help="the runtime venv (env BENCH_RUNTIME_VENV)")
    p.add_argument("--build-runtime", type=Path, metavar="DIR", help="first build a runtime venv in DIR from PyPI (then measured)")
    args = p.parse_args(argv)
    runtime = args.runtime
    if args.build_runtime:
        try:
            build_runtime(args.build_runtime)
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"error: building the runtime venv in {args.build_runtime} failed: {exc}", file=sys.stderr)
            return 1
        runtime = args.build_runtime
    figures = collect(False, args.full, runtime)

    def mb(key: str) -> str:
        value = figures.get(key, "not measured")
        return f"{value:,.0f} MB" if isinstance(value, float) else str(value)

    print("| venv | size |\n|---|---|")
    print(f"| runtime (`pip install .`: services + demo, no torch) {runtime} | {mb('runtime_venv_mb')} |")
    print(f"| full (`make setup`) {args.full} | {mb('full_venv_mb')} |")
    print(f"| of which CUDA-only (nvidia, triton, torch's CUDA libraries) | {mb('full_venv_cuda_mb')} |")
    print(f"| full with CPU-only torch | {mb('cpu_torch_venv_mb')} |")
    for name, size in largest(args.full):
        print(f"  full venv, large: {name} {size / MB:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

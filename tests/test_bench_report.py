"""bench/report.py (one table from every benchmark's collect) and bench/venv_size.py."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(180)

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_tile amx_int8
"""


def bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"test_bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


report = bench_module("report")
venv_size = bench_module("venv_size")


def test_cpu_flags_from_cpuinfo() -> None:
    cpu = report.cpu_info(CPUINFO, cores=2)
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8480+" and cpu.cores == 2
    assert cpu.flags == {"avx2": True, "avx512f": True, "avx512_vnni": True, "amx": True}
    old = report.cpu_info("model name : AMD EPYC 7B12\nflags : fpu avx2\n", cores=16)
    assert old.flags == {"avx2": True, "avx512f": False, "avx512_vnni": False, "amx": False}
    assert old.header() == "CPU: AMD EPYC 7B12; 16 cores; avx2 yes, avx512f no, avx512_vnni no, amx no"


def fake_benchmarks(folder: Path) -> None:
    (folder / "e2e.py").write_text("def collect(quick):\n    return {'e2e_ratio': 0.9 if quick else 0.1, 'e2e_img_s': 12.5,\n"
                                   "            'e2e_steady_ratio': 0.8, 'e2e_end_of_cycle_steady_ratio': 0.95,\n"
                                   "            'e2e_steady_img_s': 6.0}\n")
    (folder / "anti_sus.py").write_text("def collect(quick):\n    print('noise on stdout')\n"
                                        "    return {'int8_vs_upstream_fp32': 1.5}\n")
    (folder / "anti_sus_memory.py").write_text(
        "def collect(quick):\n    return {'default_batch': 32.0, 'cpu': 'X',\n"
        "            'peak_rss_mb_fp32_batch32_budget': 1200.0, 'peak_rss_mb_int8_batch32_budget': 500.0,\n"
        "            'peak_rss_mb_fp32_batch8_budget': 900.0, 'peak_rss_mb_fp32_batch32_old': 2000.0,\n"
        "            'peak_rss_mb_fp32_batch1_budget': 700.0, 'throughput_budgeted_vs_unbudgeted': 0.97,\n"
        "            'scores_identical': 'yes'}\n")
    (folder / "gallery.py").write_text("def collect(quick):\n    raise RuntimeError('disk full')\n")
    (folder / "dupskip.py").write_text("X = 1\n")  # no collect


def test_one_table_with_goals_and_skips(tmp_path: Path) -> None:
    fake_benchmarks(tmp_path)
    names = ["anti_sus", "anti_sus_memory", "e2e", "gallery", "dupskip", "venv_size"]
    vnni = report.cpu_info(CPUINFO, cores=2)
    text = report.report(names, True, vnni, folder=tmp_path, log=lambda s: None)
    lines = text.splitlines()
    assert lines[2] == vnni.header()
    assert "| figure | value | goal | met? |" in lines
    assert "| e2e: e2e_ratio | 0.9 | - | - |" in lines  # the one-shot run: reported, the goal is on the steady rate
    assert "| e2e: e2e_img_s | 12.5 | - | - |" in lines
    # The steady rate (a crawl under way) carries the goal; its img/s and the end-of-cycle comparison do not.
    assert "| e2e: e2e_steady_ratio | 0.8 | >= 0.85x anti_sus alone (steady) | **no** |" in lines
    assert "| e2e: e2e_end_of_cycle_steady_ratio | 0.95 | - | - |" in lines
    assert "| e2e: e2e_steady_img_s | 6 | - | - |" in lines
    assert "| anti_sus: int8_vs_upstream_fp32 | 1.5 | >= 2.2x on VNNI machines | **no** |" in lines
    assert "| anti_sus_memory: peak_rss_mb_fp32_batch32_budget | 1,200 | <= 1000 MB | **no** |" in lines
    assert "| anti_sus_memory: peak_rss_mb_int8_batch32_budget | 500 | <= 600 MB | yes |" in lines
    assert "| anti_sus_memory: peak_rss_mb_fp32_batch1_budget | 700 | - | - |" in lines
    assert "| anti_sus_memory: peak_rss_mb_fp32_batch8_budget | 900 | - | - |" in lines  # not the default batch
    assert "| anti_sus_memory: peak_rss_mb_fp32_batch32_old | 2,000 | - | - |" in lines  # the baseline: no goal
    assert not any(line.startswith("| anti_sus_memory: cpu |") for line in lines)  # the header says it
    assert "| anti_sus_memory: throughput_budgeted_vs_unbudgeted | 0.97 | >= 0.95 (at most 5% slower) | yes |" in lines
    assert "- bench/gallery.py: collect failed (RuntimeError: disk full)" in lines
    assert "- bench/dupskip.py: has no collect(quick), skipped" in lines
    assert "- bench/venv_size.py: missing, skipped" in lines
    assert "noise on stdout" not in text
    # Without VNNI the int8 speed goal is reported, not judged; the full run passes quick=False.
    plain = report.report(["anti_sus", "e2e"], False, report.cpu_info("flags : avx2\n", cores=2), folder=tmp_path,
                          log=lambda s: None)
    assert "| anti_sus: int8_vs_upstream_fp32 | 1.5 | >= 2.2x on VNNI machines | n/a on this CPU |" in plain
    assert "| e2e: e2e_ratio | 0.1 | - | - |" in plain


def test_quick_run_of_the_real_script() -> None:
    """The real command, quick, on the benchmark that is seconds even in full: the table on stdout, exit 0."""
    out = subprocess.run([sys.executable, "bench/report.py", "--quick", "--only", "venv_size"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Benchmarks of ") and lines[2].startswith("CPU: ")
    assert any(line.startswith("| venv_size: runtime_venv_mb | ") for line in lines)
    assert "| venv_size: cpu_torch_venv_mb | not measured (needs download.pytorch.org) | - | - |" in lines
    bad = subprocess.run([sys.executable, "bench/report.py", "--only", "../x"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: not a benchmark name: ../x")


def fake_venv(root: Path) -> Path:
    sp = root / "lib" / "python3.11" / "site-packages"
    (sp / "pkg").mkdir(parents=True)
    (sp / "nvidia" / "cublas").mkdir(parents=True)
    (sp / "pkg" / "a.so").write_bytes(b"x" * 3000)
    os.link(sp / "pkg" / "a.so", sp / "pkg" / "a_hardlink.so")  # one inode: counted once
    (sp / "pkg" / "link").symlink_to(sp / "pkg" / "a.so")      # a link: not followed, not counted
    (sp / "nvidia" / "cublas" / "libcublas.so").write_bytes(b"y" * 5000)
    return root


def test_venv_size_counts_files_once(tmp_path: Path) -> None:
    full = fake_venv(tmp_path / "full")
    runtime = tmp_path / "runtime"
    (runtime / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    (runtime / "lib" / "python3.11" / "site-packages" / "m.py").write_bytes(b"z" * 2_000_000)
    assert venv_size.tree_bytes(full) == 8000
    assert venv_size.cuda_bytes(full) == 5000
    figures = venv_size.collect(False, full=full, runtime=runtime)
    assert figures["runtime_venv_mb"] == 2.0 and figures["full_venv_mb"] == 0.0 and figures["full_venv_cuda_mb"] == 0.0
    assert "full_venv_mb" not in venv_size.collect(True, full=full, runtime=runtime)
    missing = venv_size.collect(True, full=full, runtime=tmp_path / "nothing")
    assert str(missing["runtime_venv_mb"]).startswith("not built (")

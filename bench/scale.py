"""Benchmark scale-out through the broker: images/s of one anti_sus worker, then two, each pinned to its own core.

    .venv/bin/python bench/scale.py            # a visual tower with ViT-B/32's arithmetic (~4.5 GMAC per image), 15 s windows
    .venv/bin/python bench/scale.py --quick    # a lighter tower (10 blocks, ~2.4 GMAC per image), 4 s windows

Issue 15's goal: two workers behind the broker filter >= 1.6x the images of one. The
topology is tests/test_scale_netns.py's (as root: the broker in its own network
namespace, each worker in another, joined by veth pairs; the load from a fourth),
built by bench/netns.py. Without root it falls back to the host's loopback with
the same pinning and says so in ``topology``.

So that the figure is about the workers and not the feeding side, the load is
already-decoded batches sent straight to the broker's frontend by
``bench.netns_load`` (anti_sus's FilterClient, several requests in flight so
both workers stay busy; no nomad, no emulator, no gallery), and the workers run
a model directory whose visual tower costs what CLIP ViT-B/32 costs: the
torch-free tiny directory (models.tiny_onnx) with its ``clip`` replaced by a
heavier random-weight graph built here (patch conv 32/32 to 768 channels, then
19 pre-norm MLP blocks 768 -> 3072 -> 768 over the 49 tokens: ~4.5 GMAC per image,
ViT-B/32's 4.4 with its attention; the GMM is refitted on it so the server accepts the directory). One worker is
measured, then two, then one again, in this one run: the ratio uses the mean of
the two one-worker runs, which cancels a steady drift of the load on a shared
machine. Each worker's share of its core is printed too: well under 1 means
other processes took part of it, and the ratio says less.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.machine import cpu_model  # noqa: E402
from bench.netns import Net, cpu_seconds, netns_unavailable, wait_for  # noqa: E402

WIDTH, HIDDEN, PATCH, DIM = 768, 3072, 32, 32
FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx")


def heavy_clip_graph(blocks: int, seed: int = 0, size: int = 224) -> Any:
    """``image`` float32[N,3,S,S] -> unit-norm ``features`` float32[N,32] costing ~(0.115 + 0.231·blocks) GMAC per image.

    The blocks share one set of weights: the cost is in the arithmetic, and the file stays ~20 MB.
    """
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)

    def t(name: str, a: np.ndarray) -> Any:
        return numpy_helper.from_array(a.astype(np.float32), name)

    def he(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1] if len(shape) == 2 else shape[1:]))

    inits = [t("patch_w", he(WIDTH, 3, PATCH, PATCH)), t("patch_b", np.zeros(WIDTH)),
             t("w1", he(WIDTH, HIDDEN)), t("b1", np.zeros(HIDDEN)), t("w2", he(HIDDEN, WIDTH) * 0.1),
             t("b2", np.zeros(WIDTH)), t("gamma", np.ones(WIDTH)), t("beta", np.zeros(WIDTH)),
             t("proj", he(WIDTH, DIM)), t("eps", np.array([1e-12])),
             numpy_helper.from_array(np.array([0, WIDTH, -1], dtype=np.int64), "shape")]
    nodes = [h.make_node("Conv", ["image", "patch_w", "patch_b"], ["p"], kernel_shape=[PATCH] * 2, strides=[PATCH] * 2),
             h.make_node("Reshape", ["p", "shape"], ["pr"]),
             h.make_node("Transpose", ["pr"], ["x0"], perm=[0, 2, 1])]  # [N, tokens, width]
    x = "x0"
    for i in range(blocks):
        nodes += [h.make_node("LayerNormalization", [x, "gamma", "beta"], [f"n{i}"], axis=-1),
                  h.make_node("MatMul", [f"n{i}", "w1"], [f"a{i}"]), h.make_node("Add", [f"a{i}", "b1"], [f"ab{i}"]),
                  h.make_node("Relu", [f"ab{i}"], [f"r{i}"]),
                  h.make_node("MatMul", [f"r{i}", "w2"], [f"m{i}"]), h.make_node("Add", [f"m{i}", "b2"], [f"mb{i}"]),
                  h.make_node("Add", [x, f"mb{i}"], [f"x{i + 1}"])]  # residual
        x = f"x{i + 1}"
    nodes += [h.make_node("ReduceMean", [x], ["pooled"], axes=[1], keepdims=0),
              h.make_node("MatMul", ["pooled", "proj"], ["raw"]),
              h.make_node("ReduceL2", ["raw"], ["norm"], axes=[1], keepdims=1),
              h.make_node("Max", ["norm", "eps"], ["safe"]),
              h.make_node("Div", ["raw", "safe"], ["features"])]
    graph = h.make_graph(nodes, f"bench_scale_clip_{blocks}_blocks",
                         [h.make_tensor_value_info("image", T.FLOAT, ["N", 3, size, size])],
                         [h.make_tensor_value_info("features", T.FLOAT, ["N", DIM])], initializer=inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], producer_name="bench/scale.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_models(out: Path, blocks: int) -> Path:
    """The tiny torch-free model directory with its ``clip`` swapped for :func:`heavy_clip_graph` (GMM refitted)."""
    import onnx

    from anti_sus.modeldir import ARTIFACTS, artifact_entry, write_manifest
    from anti_sus.preprocess import CLIP_SPEC, stack_wire
    from models import fit_gmm, synth, tiny_onnx

    tiny_onnx.build(out)
    clip_file = ARTIFACTS["clip"][0]
    onnx.save_model(heavy_clip_graph(blocks), str(out / clip_file))
    write_manifest(out, {"clip": artifact_entry(
        out, clip_file, kind="onnx",
        input={"name": "image", "shape": ["N", 3, CLIP_SPEC.size, CLIP_SPEC.size], "dtype": "float32"},
        output={"name": "features", "dim": DIM, "normalized": True}, preprocess=CLIP_SPEC.to_dict(),
        provenance={"arch": f"bench/scale.py heavy_clip_graph({blocks} blocks, random weights)", "trained": False})})
    # The server refuses a GMM fitted on another CLIP's features, so it is refitted on this one's.
    clip = fit_gmm.ClipModel.from_dir(out)
    images = synth.backgrounds(48, seed=1, size=256)
    feats = fit_gmm.encode_wire((stack_wire(images[i:i + 16]) for i in range(0, len(images), 16)), clip, 2)
    gm, _ = fit_gmm.fit(feats.astype(np.float64), [2], "diag", seed=0, reg_covar=1e-4)
    fit_gmm.save(out, gm, feats.astype(np.float64), clip, percentile=5.0, sweep=[], seed=0,
                 source="bench/scale.py: 48 procedural images")
    return out


def cpu_flags() -> str:
    try:
        flags = set(re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return "unknown"
    return " ".join(f for f in FLAGS if f in flags or (f == "amx" and any(x.startswith("amx_") for x in flags)))


class Bench:
    """Broker + workers in ``net``; the load runs in the edge namespace (or on the loopback)."""

    def __init__(self, net: Net, models: Path, batch: int, clients: int) -> None:
        self.net, self.models, self.batch, self.clients = net, models, batch, clients
        self.ids: dict[str, str] = {}

    def joined(self) -> list[str]:
        return re.findall(r"worker ([0-9a-f]+) joined", self.net.log("broker"))

    def start_broker(self) -> None:
        backends = sorted(set(self.net.backend.values()))
        argv = ["anti_sus", "broker", "--frontend", self.net.frontend, "--worker-timeout", "30", "--log-level", "INFO"]
        for b in backends:
            argv += ["--backend", b]
        self.net.spawn("b", "broker", argv)

    def start_worker(self, name: str, role: str, core: int) -> subprocess.Popen[bytes]:
        before = len(self.joined())
        proc = self.net.spawn(role, name, ["anti_sus", "serve", "--models", str(self.models), "--connect",
                                           self.net.backend[role], "--threads", "1", "--heartbeat", "0.5",
                                           "--max-batch", str(self.batch)], core=core,
                              env={"OMP_NUM_THREADS": "1"})
        wait_for(lambda: len(self.joined()) > before or proc.poll() is not None, 120, f"{name} joins the broker",
                 lambda: self.net.log(name)[-2000:] + self.net.log("broker")[-2000:])
        if proc.poll() is not None:
            raise RuntimeError(f"worker {name} exited: {self.net.log(name)[-2000:]}")
        self.ids[name] = self.joined()[-1]
        return proc

    def stop_worker(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()  # says BYE: the broker stops sending to it at once
        proc.wait(timeout=60)
        wait_for(lambda: f"worker {self.ids[name]} dropped" in self.net.log("broker"), 30, f"{name} leaves")

    def measure(self, workers: list[subprocess.Popen[bytes]], seconds: float, warmup: float) -> dict[str, float]:
        """One load run; images/s in the window and each worker's share of its core over the whole run."""
        cpu0, t0 = [cpu_seconds([w]) for w in workers], time.monotonic()
        out = self.net.run("e", ["-m", "bench.netns_load", "--server", self.net.frontend, "--seconds", str(seconds),
                                 "--warmup", str(warmup), "--clients", str(self.clients), "--batch", str(self.batch),
                                 "--timeout", "60"], timeout=seconds + warmup + 300)
        wall = time.monotonic() - t0
        if out.returncode != 0:
            raise RuntimeError(f"load generator failed: {(out.stdout + out.stderr)[-2000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["core_share"] = [round((cpu_seconds([w]) - c) / wall, 2) for w, c in zip(workers, cpu0)]
        return result


def collect(quick: bool) -> dict[str, float | str]:
    """Images/s of one pinned worker and of two behind the broker, the ratio, core shares, CPU and topology."""
    blocks, seconds, warmup = (10, 4.0, 1.5) if quick else (19, 15.0, 3.0)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise RuntimeError(f"needs two cores to pin two workers; this process may use {cores}")
    why = netns_unavailable()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    models = build_models(tmp / "models", blocks)
    net = Net(tmp, namespaces=why is None)
    # Requests of 4 images, 4 in flight: both workers always have one queued at the broker, and a request
    # is short enough that the windows hold many of them.
    bench = Bench(net, models, batch=4, clients=4)
    try:
        net.create()
        bench.start_broker()
        first = bench.start_worker("worker1", "w1", cores[0])
        one_a = bench.measure([first], seconds, warmup)
        second = bench.start_worker("worker2", "w2", cores[1])
        two = bench.measure([first, second], seconds, warmup)
        bench.stop_worker("worker2", second)
        one_b = bench.measure([first], seconds, warmup)
    finally:
        net.close()
    errors = one_a["errors"] + two["errors"] + one_b["errors"]
    if errors:
        raise RuntimeError(f"{errors} requests failed during the runs (logs in {tmp})")
    shutil.rmtree(tmp, ignore_errors=True)  # ~30 MB of models per run; kept when a run failed (its logs are there)
    one = (one_a["rate"] + one_b["rate"]) / 2
    shares = two["core_share"]
    return {
        "topology": ("network namespaces + veth pairs (broker, worker 1, worker 2, load: one each)" if why is None
                     else f"loopback, same pinning (no namespaces: {why})"),
        "model": f"random-weight visual tower, {blocks} MLP blocks (~{0.115 + 0.231 * blocks:.1f} GMAC/image)",
        "one_worker_img_s": round(one, 2),
        "one_worker_runs_img_s": f"{one_a['rate']:.2f} before, {one_b['rate']:.2f} after",
        "two_workers_img_s": round(two["rate"], 2),
        "two_vs_one_worker": round(two["rate"] / one, 3) if one else 0.0,
        "core_share_one_worker": round((one_a["core_share"][0] + one_b["core_share"][0]) / 2, 2),
        "core_share_two_workers": f"{shares[0]:.2f}, {shares[1]:.2f}",
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": float(len(cores)),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a lighter model and shorter windows (about a minute)")
    args = p.parse_args(argv)
    try:
        figures = collect(args.quick)
    except (RuntimeError, AssertionError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    for key, value in figures.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

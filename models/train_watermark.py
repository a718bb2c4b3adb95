"""Train the watermark classifier (one logit: watermark vs clear).

    python -m models.train_watermark --data data/wm --out runs/wm/watermark.safetensors --pretrained
    python -m models.export_watermark --weights runs/wm/watermark.safetensors --out var/models

``--data`` holds ``watermark/`` and ``clear/`` (images, recursive). A stratified
split holds out ``--val-fraction`` of each class; after training the report
gives accuracy, precision, recall and the confusion matrix on those held-out
images (also written next to the weights as ``<out>.metrics.json``).

Input pipeline = the preprocessing contract: ``load_image`` -> ``to_wire``
(squash to 512) -> squash to ``--size`` -> normalise with mean/std 0.5.
Training adds augmentations that keep a watermark visible: flips, small
rotations/shifts/zooms, blur, JPEG artefacts and colour jitter. Weights are saved
as safetensors (no pickle).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anti_sus.preprocess import WATERMARK_SPEC, PreprocessSpec, load_image, normalise, resize_batch, to_wire

from ._cli import EnvParser, UserError, run_main, setup
from .fit_gmm import IMAGE_SUFFIXES
from .watermark_net import DEFAULT_ARCH, build, save_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]


def list_data(data: Path) -> list[tuple[Path, int]]:
    """(path, label) pairs: 1 for ``watermark/``, 0 for ``clear/``."""
    items: list[tuple[Path, int]] = []
    for sub, label in (("watermark", 1), ("clear", 0)):
        folder = data / sub
        if not folder.is_dir():
            raise UserError(f"{data} must contain watermark/ and clear/ folders; {folder} is missing "
                            f"(make synthetic data with: python -m models.watermark_data --out {data})")
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if len(found) < 2:
            raise UserError(f"{folder} has {len(found)} images; need at least 2 per class")
        items += [(p, label) for p in found]
    return items


def split(items: list[tuple[Path, int]], val_fraction: float, seed: int) -> Split:
    """Stratified train/val split (each class keeps its share in both)."""
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    labels = [y for _, y in items]
    try:
        tr, va = train_test_split(items, test_size=val_fraction, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise UserError(f"cannot split {len(items)} images with --val-fraction {val_fraction}: {exc}") from None
    return Split(list(tr), list(va))


def load_base(items: Sequence[tuple[Path, int]], size: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode every image through the contract to ``uint8[N, size, size, 3]``; unreadable ones are skipped."""
    from tqdm import tqdm

    arrays, labels, bad = [], [], 0
    for path, label in tqdm(items, desc="decode", unit="img", disable=not progress):
        try:
            wire = to_wire(load_image(str(path)))
        except Exception as exc:  # any decoder error: count and skip
            log.warning("skipping unreadable image %s: %s", path, exc)
            bad += 1
            continue
        arrays.append(resize_batch(wire[None], size)[0])
        labels.append(label)
    if not arrays:
        raise UserError("no readable images")
    return np.stack(arrays), np.asarray(labels, np.float32), bad


AUGMENT = ("full", "light", "none")


def augmenter(size: int, level: str = "full") -> Any:
    """uint8 CHW tensor -> augmented uint8 CHW tensor; every step keeps the watermark in view.

    ``light`` keeps only flips and JPEG artefacts (cheap; for short CPU runs), ``none`` is the identity.
    """
    import torch
    from torchvision.transforms import v2 as T

    if level == "none":
        return T.Identity()
    if level == "light":
        return T.Compose([T.RandomHorizontalFlip(), T.RandomApply([T.JPEG(quality=(40, 95))], p=0.3), T.ToDtype(torch.uint8)])
    return T.Compose([
        T.RandomHorizontalFlip(),
        T.RandomApply([T.RandomAffine(degrees=10, translate=(0.04, 0.04), scale=(0.9, 1.1))], p=0.5),
        T.RandomApply([T.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True)], p=0.3),
        T.RandomApply([T.ColorJitter(0.25, 0.25, 0.25, 0.03)], p=0.5),
        T.RandomApply([T.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.3),
        T.RandomApply([T.JPEG(quality=(30, 95))], p=0.4),
        T.ToDtype(torch.uint8),
    ])


def to_tensor(batch: np.ndarray, spec: PreprocessSpec) -> Any:
    import torch

    return torch.from_numpy(normalise(batch, spec))


def evaluate(model: Any, x: np.ndarray, y: np.ndarray, spec: PreprocessSpec, batch_size: int) -> dict[str, Any]:
    """Accuracy, precision, recall and confusion matrix (rows: true clear/watermark) at logit 0."""
    import torch
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_score, recall_score

    model.eval()
    logits = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            logits.append(model(to_tensor(x[i:i + batch_size], spec)).float().numpy()[:, 0])
    logit = np.concatenate(logits)
    pred = (logit >= 0).astype(int)
    true = y.astype(int)
    return {
        "n": int(len(true)),
        "accuracy": float(accuracy_score(true, pred)),
        "precision": float(precision_score(true, pred, zero_division=0)),
        "recall": float(recall_score(true, pred, zero_division=0)),
        "confusion_matrix": confusion_matrix(true, pred, labels=[0, 1]).tolist(),
        "confusion_matrix_layout": "rows true [clear, watermark], columns predicted [clear, watermark]",
    }


def train(data: Path, out: Path, *, arch: str = DEFAULT_ARCH, size: int = WATERMARK_SPEC.size, epochs: int = 10,
          batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 1e-4, val_fraction: float = 0.2, seed: int = 0,
          pretrained: bool = False, max_minutes: float | None = None, val_data: Path | None = None,
          augment: str = "full", progress: bool = True) -> dict[str, Any]:
    """Train, evaluate on the held-out split, save safetensors + metrics; returns the metrics."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = PreprocessSpec("watermark", size, WATERMARK_SPEC.mean, WATERMARK_SPEC.std)
    if augment not in AUGMENT:
        raise UserError(f"--augment must be one of {AUGMENT}")
    # A separate held-out folder (e.g. synthetic data from another seed) replaces the split.
    parts = Split(list_data(data), list_data(val_data)) if val_data else split(list_data(data), val_fraction, seed)
    xtr, ytr, bad_tr = load_base(parts.train, size, progress)
    xva, yva, bad_va = load_base(parts.val, size, progress)
    model = build(arch, pretrained=pretrained, seed=seed)
    aug = augmenter(size, augment)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, int(np.ceil(len(xtr) / batch_size)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    t0 = time.monotonic()
    history: list[dict[str, float]] = []
    stopped_early = False
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(xtr))
        total, seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress)
        for step in bar:
            idx = order[step * batch_size:(step + 1) * batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            chw = torch.from_numpy(np.ascontiguousarray(xtr[idx].transpose(0, 3, 1, 2)))
            augmented = torch.stack([aug(img) for img in chw]).permute(0, 2, 3, 1).numpy()
            logit = model(to_tensor(augmented, spec))[:, 0]
            loss = loss_fn(logit, torch.from_numpy(ytr[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / max(seen, 1):.3f}")
        history.append({"epoch": epoch + 1, "train_loss": total / max(seen, 1), "seconds": time.monotonic() - t0})
        log.info("epoch %d/%d: train loss %.4f (%.0f s)", epoch + 1, epochs, history[-1]["train_loss"], history[-1]["seconds"])
        if max_minutes is not None and time.monotonic() - t0 > max_minutes * 60 and epoch + 1 < epochs:
            log.warning("stopping after epoch %d: --max-minutes %.1f reached", epoch + 1, max_minutes)
            stopped_early = True
            break
    metrics = evaluate(model, xva, yva, spec, batch_size)
    metrics.update({
        "arch": arch, "size": size, "epochs_run": len(history), "epochs": epochs, "stopped_early": stopped_early,
        "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed, "pretrained": pretrained,
        "n_train": int(len(xtr)), "n_val": int(len(xva)), "augment": augment,
        "val_source": str(val_data) if val_data else f"stratified {val_fraction:g} of {data}", "skipped_unreadable": bad_tr + bad_va,
        "train_seconds": round(time.monotonic() - t0, 1), "history": history, "data": str(data),
    })
    save_weights(model.eval(), out, arch=arch, size=size, extra={
        "val_accuracy": f"{metrics['accuracy']:.4f}", "pretrained": str(pretrained), "epochs": str(len(history)),
        "n_train": str(len(xtr)), "tool": "models.train_watermark"})
    out.with_name(out.name + ".metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def parser() -> EnvParser:
    p = EnvParser("train_watermark", description=__doc__.split("\n\n")[0])
    p.add_env("--data", type=Path, required=True, help="folder with watermark/ and clear/ image folders")
    p.add_env("--out", type=Path, default=Path("runs/watermark/watermark.safetensors"), help="weights file to write (safetensors)")
    p.add_env("--arch", default=DEFAULT_ARCH, help="timm architecture")
    p.add_env("--pretrained", action="store_true", help="start from timm's ImageNet weights (downloads; operators only)")
    p.add_env("--size", type=int, default=WATERMARK_SPEC.size, help="input side in pixels (production: 512)")
    p.add_env("--epochs", type=int, default=10, help="training epochs")
    p.add_env("--batch-size", type=int, default=16, help="images per step")
    p.add_env("--lr", type=float, default=1e-3, help="peak learning rate (one-cycle schedule, AdamW)")
    p.add_env("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_env("--val-fraction", type=float, default=0.2, help="held-out share of each class")
    p.add_env("--val-data", type=Path, default=None, help="separate held-out folder (watermark/, clear/) instead of a split")
    p.add_env("--augment", choices=list(AUGMENT), default="full", help="augmentation level (light: flips + JPEG only)")
    p.add_env("--max-minutes", type=float, default=None, help="stop after the epoch that passes this wall time")
    p.add_env("--seed", type=int, default=0, help="seed for split, init and augmentation")
    p.add_common()
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup(args)
    if args.size < 32 or args.epochs < 1 or args.batch_size < 2:
        raise UserError("--size must be >= 32, --epochs >= 1 and --batch-size >= 2")
    m = train(args.data, args.out, arch=args.arch, size=args.size, epochs=args.epochs, batch_size=args.batch_size,
              lr=args.lr, weight_decay=args.weight_decay, val_fraction=args.val_fraction, seed=args.seed,
              pretrained=args.pretrained, max_minutes=args.max_minutes, val_data=args.val_data, augment=args.augment)
    cm = m["confusion_matrix"]
    print(f"val ({m['n_val']} held-out images): accuracy {m['accuracy']:.3f}, precision {m['precision']:.3f}, "
          f"recall {m['recall']:.3f}")
    print(f"confusion matrix (rows true, cols predicted; clear, watermark): {cm[0]} / {cm[1]}")
    print(f"wrote {args.out} and {args.out.name}.metrics.json; export with: "
          f"python -m models.export_watermark --weights {args.out} --out var/models")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))

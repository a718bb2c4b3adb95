"""The watermark classifier: a timm backbone with one logit, and its weights file.

Weights are stored as safetensors (no pickle) with the architecture and input
size in the file's metadata, so ``export_watermark`` rebuilds the same network
from the file alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ._cli import UserError

DEFAULT_ARCH = "tf_efficientnetv2_b0"


def build(arch: str = DEFAULT_ARCH, pretrained: bool = False, seed: int = 0) -> Any:
    """A timm model with a single output (the watermark logit)."""
    import timm
    import torch

    torch.manual_seed(seed)
    if arch.split(".")[0] not in timm.list_models(arch.split(".")[0]):  # 'name.tag' names a pretrained tag
        raise UserError(f"unknown timm architecture {arch!r}; see timm.list_models()")
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=1)
    except Exception as exc:  # hub download errors come in many types
        raise UserError(f"could not create timm {arch} (pretrained={pretrained}): {exc}") from None


def save_weights(model: Any, path: Path, *, arch: str, size: int, extra: dict[str, str] | None = None) -> None:
    """State dict -> safetensors, with ``arch`` and ``size`` in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"arch": arch, "size": str(size), **(extra or {})})


def load_weights(path: Path) -> tuple[Any, dict[str, str]]:
    """Rebuild the network a safetensors file describes; returns (model in eval mode, metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; train one: python -m models.train_watermark --data DIR --out {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path} is not a readable safetensors file: {exc}") from None
    arch = meta.get("arch")
    if not arch:
        raise UserError(f"{path} has no 'arch' in its metadata; it was not written by models.train_watermark")
    model = build(arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path} does not fit timm {arch}: {str(exc)[:300]}") from None
    return model.eval(), meta

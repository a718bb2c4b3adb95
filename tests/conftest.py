"""Shared fixtures: tiny model directory built once per session, never committed."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny model directory (CLIP-architecture tower, GMM, watermark, manifest).

    Built through the same export code as the real models; set
    ``TINY_MODELS_DIR`` to reuse one built earlier (``python -m models.tiny --out DIR``).
    """
    reuse = os.environ.get("TINY_MODELS_DIR")
    if reuse and (Path(reuse) / "manifest.json").is_file():
        return Path(reuse)
    from models import tiny

    out = tmp_path_factory.mktemp("tiny_models")
    tiny.build(out)
    return out


@pytest.fixture(scope="session")
def tiny_onnx_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch-free tiny model directory (models.tiny_onnx), built once per session: copy it before changing it."""
    from models import tiny_onnx

    return tiny_onnx.build(tmp_path_factory.mktemp("tiny_onnx"))


@pytest.fixture(autouse=True)
def _forget_registered_secrets():
    """Secrets a test registers with photocore.redact (a process-wide set) must not mask other tests' logs."""
    from photocore import redact

    with redact._secrets_lock:
        before = set(redact._secrets)
    yield
    with redact._secrets_lock:
        redact._secrets.intersection_update(before)


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """A service's main() run in-process points the root logger at that test's captured stderr; pytest closes that
    stream after the test, so a server thread still logging later would print "I/O operation on closed file"."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)

"""Layering: data_tools imports no torch or emo_lightning; emo_lightning.data never imports the model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("data_tools.cli", ("torch", "emo_lightning", "webdataset")),
        ("data_tools.build", ("torch", "emo_lightning", "webdataset", "lightning")),
        ("emo_lightning.data", ("emo_lightning.model",)),
    ],
)
def test_layering(module: str, forbidden: tuple[str, ...]) -> None:
    code = f"import sys, {module}; print([m for m in {forbidden!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

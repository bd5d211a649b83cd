"""`nanoserve serve`'s default tensor-parallel size: every GPU for one replica, the GPUs shared
evenly between the replicas behind the gateway (each replica gets GPUs that exist)."""

from __future__ import annotations

import pytest
import torch

from nanoserve import cli


def test_replicas_share_the_gpus_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert cli._devices("cuda", None) == ("cuda", 8)
    assert cli._devices("cuda", None, replicas=2) == ("cuda", 4)
    assert cli._devices("cuda", None, replicas=3) == ("cuda", 2)
    assert cli._devices("cuda", 2, replicas=2) == ("cuda", 2)  # asked for: as asked
    assert cli._devices("cpu", None, replicas=2) == ("cpu", 1)

"""Shared test settings: offline, deterministic, small thread count."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)  # tests are tiny; thread start-up costs more than it saves


import socket  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def offline_hub(monkeypatch):
    """No network: the offline variables, the flags datasets/huggingface_hub read at import, and no sockets."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same seeds, whatever ran before it (test order, ``-n``, ``-p randomly``)."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)

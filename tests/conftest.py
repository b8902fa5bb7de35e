"""Shared test fixtures. No test may touch the network: the offline flags are set here, before any HF library is
imported, and the `no_network` fixture makes any socket connection an error."""

import os

# Read by huggingface_hub / diffusers / transformers at import time, so set before anything imports them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DIFFUSERS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: the test models are tiny (ms-scale ops), so threads buy little, and on a busy 2-core machine
# two spinning OpenMP threads made each UNet forward ~20x slower (measured: 22 ms vs 415 ms). Override with
# LCM_TEST_THREADS for heavier local runs.
torch.set_num_threads(int(os.environ.get("LCM_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny SDXL pipeline (seed 0, default sizes) saved once per session with `save_pretrained`."""
    from lcm.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tiny") / "sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    """A tiny SD1.5 pipeline (seed 0, default sizes) saved once per session with `save_pretrained`."""
    from lcm.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("tiny") / "sd15", seed=0)


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if the code under test opens a network connection (e.g. a hub call)."""

    def refuse(*args, **kwargs):
        raise RuntimeError(f"network access attempted in a test: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps a process-wide singleton state; runs in one test process may differ in mixed precision."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)

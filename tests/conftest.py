import importlib.util

import pytest
import torch


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow",
        action="store_true",
        help="also run the slow tests (multi-process torchrun and DDP, torch.compile, 200-step leak checks); CI does",
    )


def pytest_collection_modifyitems(config, items):
    skips = []
    if not _cuda_ready():
        skips.append(("cuda", pytest.mark.skip(reason="needs a CUDA device and CuPy")))
    if not config.getoption("--run-slow"):
        skips.append(("slow", pytest.mark.skip(reason="slow: run with --run-slow (CI does)")))
    for item in items:
        for keyword, skip in skips:
            if keyword in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state and leaves global torch settings as it found them."""
    torch.manual_seed(0)
    yield

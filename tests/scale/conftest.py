import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """The nets here are tiny: one intra-op thread is faster, and immune to busy CI cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

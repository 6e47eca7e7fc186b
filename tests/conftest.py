import os

import pytest
import torch

# Without a GPU the Triton kernels run on the CPU through Triton's interpreter, which must be chosen before
# triton.jit decorates any kernel, i.e. before o1kernels is imported. With a GPU the tests run the compiled
# kernels that ship (CPU-device Triton cases are then skipped as unavailable).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: a second intra-op thread only adds contention on the shared 2-core test machine (request it with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

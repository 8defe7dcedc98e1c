"""Test setup shared by every suite.

TRITON_INTERPRET must be set before any module that defines Triton kernels
is imported, so it is decided here, first: without CUDA the kernels run in
the interpreter on CPU tensors. The thread count is torch's own (all cores,
or OMP_NUM_THREADS): CI runs the suite once as a new user does and once with
OMP_NUM_THREADS=1, so a test that depends on it shows up (.ci/run); on a
shared machine set OMP_NUM_THREADS=1.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # a command run in-process (demo, train) sets its own


def cpu_and_cuda():
    """Devices to run a test on: CPU always, CUDA when present."""
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])

"""Test setup shared by every suite.

TRITON_INTERPRET must be set before any module that defines Triton kernels
is imported, so it is decided here, first: without CUDA the kernels run in
the interpreter on CPU tensors. One CPU thread avoids heavy slowdowns on the
2 shared cores of CI.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(1)

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

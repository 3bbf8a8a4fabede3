"""Fixtures of the Python tests: the devices to run on, and a seed per test.

Every test that takes `device` runs on "cpu" and, where torch sees a GPU and pagedkv was built
with CUDA, on "cuda" too, so the same suite checks the CPU reference and the kernels. Tests that
only make sense on a GPU take the `cuda` fixture (or carry the `cuda` marker) and skip elsewhere.
"""
import random
import zlib

import pytest
import torch


from reference import cuda_usable

CUDA_USABLE = cuda_usable()
DEVICES = ["cpu"] + (["cuda"] if CUDA_USABLE else [])
NO_CUDA_REASON = "needs torch with CUDA and a CUDA build of pagedkv (pagedkv.cuda_available())"


def pytest_addoption(parser):
    # Longer runs of the bounded CI tests, chosen on the command line (never the environment).
    parser.addoption("--stress-trials", type=int, default=3,
                     help="trials of test_thread_stress.py (threads x tiers x operations)")
    parser.addoption("--fuzz-examples", type=int, default=None,
                     help="hypothesis examples per test of test_fuzz_inputs.py (default: its CI bound)")
    parser.addoption("--tier-walk-examples", type=int, default=100,
                     help="examples of the stateful tier walk (test_tier_walk.py), up to 50 rules each")


@pytest.fixture
def stress_trials(request):
    return request.config.getoption("--stress-trials")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a GPU and a CUDA build of pagedkv")


def pytest_collection_modifyitems(config, items):
    if CUDA_USABLE:
        return
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA_REASON))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def cuda():
    if not CUDA_USABLE:
        pytest.skip(NO_CUDA_REASON)
    return "cuda"


@pytest.fixture
def seed(request):
    # Stable across runs, machines and rootdirs (unlike hash() or the full node id), different
    # for every test and parameter: "test_attend.py::test_x[cpu-...]".
    return zlib.crc32(request.node.nodeid.split("/")[-1].encode())


@pytest.fixture
def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def rng(seed):
    return random.Random(seed)

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from common import SMOKE  # noqa: E402  (before the suites: smoke mode sets TRITON_INTERPRET)


def pytest_report_header(config):
    if SMOKE:
        return "BENCH_SMOKE=1: GPU benchmarks on the CPU at tiny shapes; results are not measurements"


def pytest_collection_modifyitems(config, items):
    if SMOKE:  # the CPU benchmarks are measurements already: smoke mode only runs the GPU ones
        skip = pytest.mark.skip(reason="BENCH_SMOKE=1 runs only the GPU benchmarks")
        for item in items:
            if item.get_closest_marker("gpu") is None:
                item.add_marker(skip)
        return
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU benchmark: no CUDA device on this machine (BENCH_SMOKE=1 runs it "
                                   "on the CPU at tiny shapes)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)

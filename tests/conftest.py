"""Fixtures shared by the test files (the shared acceptance helpers are plain functions in `contract.py`).

- `one_thread`: torch runs with one intra-op thread for the requesting test, and gets its thread count back after.
  Tiny matmuls are faster on one thread, and 2 threads on a busy 2-core machine are 10-30× slower. Opt-in: request
  it in a test, or for a whole module `pytestmark = pytest.mark.usefixtures("one_thread_module")`.
- `one_thread_module`: the same, once for the whole module.
"""
import contextlib

import pytest
import torch


@contextlib.contextmanager
def _one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with _one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    with _one_intra_op_thread():
        yield

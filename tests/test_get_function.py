"""dask's own conformance tests for get functions, against the embedded default."""

from __future__ import annotations

import pytest
from dask.utils_test import GetFunctionTestMixin

import dask_serverless
from dask_serverless.client import _default
from tests.conftest import run_keys


@pytest.fixture(autouse=True)
def no_leaks_on_the_default_server():
    yield
    assert not run_keys(_default.get()._redis)


class TestEmbeddedDefaultGet(GetFunctionTestMixin):
    get = staticmethod(dask_serverless.get)

"""The two-process fixture of the distributed tests."""

import pytest

from tests.distributed import harness


@pytest.fixture(scope="module")
def ranks(request, tmp_path_factory):
    """Both ranks' records of every case in the test module's ``CASES`` (one spawn per module)."""
    return harness.spawn(request.module.CASES, str(tmp_path_factory.mktemp("tp")))

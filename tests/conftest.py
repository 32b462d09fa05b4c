import pytest

import mamba_scan._boundary as boundary


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every output the shim allocates is NaN-filled before the kernel runs."""
    boundary.POISON_OUTPUTS = True
    yield
    boundary.POISON_OUTPUTS = False

"""bench.gpu reports a fraction of the card's bf16 peak: the card must be recognised by its own name."""

import pytest

from bench.gpu import peak_for


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 990.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 990.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", 181.0),
    ("NVIDIA L4", 121.0),
    ("Tesla T4", None),
])
def test_peak_by_device_name(name, peak):
    assert peak_for(name, None) == peak


def test_peak_flag_overrides_the_table():
    assert peak_for("NVIDIA H100 80GB HBM3", 500.0) == 500.0

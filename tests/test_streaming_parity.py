"""Streamed output equals in-memory output for every family, tied and untied, per-block and
shared bases, with and without the refit.

Each family runs twice: tied with per-block bases and untied with shared ones, and the
refit is on in one of the two (alternating across families), so every family meets every
setting once and every pairing of layout and refit is covered by many families.
"""

import pytest

from conftest import TINY_CONFIGS
from test_streaming import _assert_streams_as_in_memory

CASES = []
for number, arch in enumerate(sorted(TINY_CONFIGS)):
    shared = "group:2" if number % 3 == 0 else "model"
    CASES.append(pytest.param(arch, True, "block", number % 2 == 0, id=f"{arch}-tied-block"))
    CASES.append(pytest.param(arch, False, shared, number % 2 == 1, id=f"{arch}-untied-{shared}"))


@pytest.mark.parametrize("arch,tied,rotations,refit", CASES)
def test_streamed_equals_in_memory_for_every_family(tmp_path, arch, tied, rotations, refit):
    _assert_streams_as_in_memory(tmp_path, arch, tied, dict(rotations=rotations, refit=refit))

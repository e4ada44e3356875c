import os

import pytest
import torch

from tests.helpers.corpus import preprocessed

# One thread per test process when pytest-xdist runs several: OpenMP threads spin-wait for a core another worker
# holds, and a step gets 10-20x slower (README, "Quick start"); alone, two threads at most.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

KINDS = ("unit", "distributed")  # every test is exactly one of these (markers in pytest.ini)


def pytest_collection_modifyitems(config, items):
    bad = []
    for item in items:
        kinds = [k for k in KINDS if item.get_closest_marker(k) is not None]
        if len(kinds) != 1:
            bad.append(f"{item.nodeid} ({' and '.join(kinds) or 'neither'})")
    if bad:
        raise pytest.UsageError(
            "every test must be marked either unit or distributed (pytest.ini says which is "
            "which); these are not:\n  " + "\n  ".join(bad)
        )


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """A preprocessed data directory that runs only read: vocabulary 40, 200 training and 20 validation pairs of
    3-9 words (at most 53 tokens: within max_positions 64)."""
    return preprocessed(tmp_path_factory.mktemp("tiny_corpus"), 40, 200, 20, hi=9)

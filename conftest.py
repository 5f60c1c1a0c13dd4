"""pytest configuration: one hypothesis profile, one CPU thread per test process, and
at most 4 of those processes for ``-n auto`` (pytest-xdist; each takes a few hundred
MB, and the distributed tests start 2 to 4 processes of their own).

Under CI (the ``CI`` environment variable set) examples are derandomized and
no example database is written, so a run is reproducible and leaves no files.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# Tests sharing a module fixture that starts processes run in one test process (with
# --dist loadgroup), which computes it once; each process would compute it for itself.
SHARED_FIXTURES = ("fsdp2_runs", "fsdp2_small", "copied_out_weights")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes seconds (starts processes, trains or runs many commands); "
                            "runs first, so that the test processes of -n finish together")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the slow ones first
    for item in items:
        shared = [name for name in SHARED_FIXTURES if name in item.fixturenames]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))


def pytest_xdist_auto_num_workers(config):
    # the cores this process may run on (a container's CPU set), not all the host's
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cores or 1))


settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# One thread, whatever the machine: torch's default (one per core) made the suite
# ten times slower on a 2-core machine shared with another process, and results
# and timings should not depend on the core count. OMP_NUM_THREADS reaches the
# processes the tests start (README commands, torchrun).
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)

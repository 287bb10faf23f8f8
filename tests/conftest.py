"""The suite's one guard: tests marked xdist_group really do share a worker."""
import pytest


def pytest_runtest_setup(item):
    # pytest-xdist marks a grouped test by a suffix on its node id; a pytest whose node ids
    # ignore that (9.2, pytest-xdist#1386) spreads the "serial" timing tests over all workers.
    if (item.config.getvalue("loadgroup") and item.get_closest_marker("xdist_group")
            and "@" not in item.nodeid.rsplit("::", 1)[-1]):
        pytest.fail(f"--dist loadgroup does not group with pytest {pytest.__version__} (pytest-xdist#1386): "
                    "install pytest<9.2", pytrace=False)

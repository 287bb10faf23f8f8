"""How the suite shares its workers: the longest tests start first, the in-process trainer
tests pay torch's first-use costs on two workers instead of on all, and tests marked
xdist_group really do share a worker."""
import pytest

# A worker's first optimizer imports torch._dynamo (1.2 s of CPU) and its first loss.png
# imports matplotlib (0.6 s): spread over every worker, that is 15 s of the suite's CPU.
# These modules (or module::test) train in-process, so they run on two workers, one group each.
TORCH_GROUPS = {
    "torch-a": ("test_trainer_trust", "test_trainer_metrics", "test_trainer_heartbeat", "test_trainer_outputs",
                "test_trainer_seed", "test_trainer_progress", "test_trainer_data", "test_trainer_cli",
                "test_trainer_process::test_hang_once_hangs_once_in_a_folder_and_holds_the_folder_meanwhile"),
    "torch-b": ("test_trainer_resume", "test_trainer_model", "test_trainer_input", "test_trainer_phases",
                "test_trainer_disk"),
}
GROUP_OF = {name: group for group, names in TORCH_GROUPS.items() for name in names}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    # Long tests first: a test that asks for a long timeout starts at once, and the short ones
    # fill the gaps at the end, instead of a 20 s test starting last and alone.
    items.sort(key=_timeout_asked, reverse=True)
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        group = GROUP_OF.get(module) or GROUP_OF.get(f"{module}::{item.originalname}")
        if group and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(group))


def _timeout_asked(item) -> float:
    mark = item.get_closest_marker("timeout")
    return float(mark.args[0]) if mark and mark.args else 0.0


def pytest_runtest_setup(item):
    # pytest-xdist marks a grouped test by a suffix on its node id; a pytest whose node ids
    # ignore that (9.2, pytest-xdist#1386) spreads the "serial" timing tests over all workers.
    if (getattr(item.config.option, "loadgroup", False) and item.get_closest_marker("xdist_group")
            and "@" not in item.nodeid.rsplit("::", 1)[-1]):
        pytest.fail(f"--dist loadgroup does not group with pytest {pytest.__version__} (pytest-xdist#1386): "
                    "install pytest<9.2", pytrace=False)

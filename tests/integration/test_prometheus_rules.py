"""examples/prometheus: the alert rules name real metrics, and promtool accepts and tests them where installed."""
import re
import shutil
import subprocess

import pytest

from helpers import ROOT
from supervisor.output.metrics import METRICS, PREFIX

RULES = ROOT / "examples" / "prometheus" / "magvit-supervise.rules.yml"
RULE_TESTS = ROOT / "examples" / "prometheus" / "magvit-supervise.rules.test.yml"


def test_the_rules_use_only_metrics_the_supervisor_exports():
    exported = {PREFIX + name for name, _, _ in METRICS}
    used = set(re.findall(r"magvit_supervise_\w+", RULES.read_text() + RULE_TESTS.read_text()))
    assert used and used <= exported, used - exported


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: apt install prometheus)")
@pytest.mark.parametrize("command, target", [("check", RULES), ("test", RULE_TESTS)])
def test_promtool_accepts_the_rules_and_their_tests(command, target):
    done = subprocess.run(["promtool", command, "rules", target.name], cwd=target.parent, capture_output=True,
                          text=True, timeout=50)
    assert done.returncode == 0, done.stdout + done.stderr

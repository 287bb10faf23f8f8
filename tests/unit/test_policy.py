"""Restart budget, as tables of (reason, progress) -> (restart, attempt, backoff, why)."""

import pytest

from supervisor.policy import Decision, RestartBudget, RestartPolicy

G = False  # give up
R = True  # restart

CASES = [
    # id, policy, [(reason, progress, expected restart, attempt, backoff_s, text in why[, progressed_s])]
    ("back-off doubles, then the budget runs out", RestartPolicy(3), [
        ("crash", None, R, 1, 1.0, "restart 1/3"),
        ("crash", None, R, 2, 2.0, "restart 2/3"),
        ("stall", None, R, 3, 4.0, "restart 3/3"),
        ("crash", None, G, 3, 0.0, "max restarts (3) reached"),
    ]),
    ("no restarts allowed", RestartPolicy(0), [
        ("stall", "Epoch 1", G, 0, 0.0, "max restarts (0) reached"),
    ]),
    ("back-off capped", RestartPolicy(10, backoff_initial_s=1, backoff_max_s=5), [
        ("crash", None, R, 1, 1.0, ""),
        ("crash", None, R, 2, 2.0, ""),
        ("crash", None, R, 3, 4.0, ""),
        ("crash", None, R, 4, 5.0, ""),
        ("crash", None, R, 5, 5.0, ""),
    ]),
    ("default back-off capped at 60 s", RestartPolicy(8), [
        ("crash", None, R, n, min(60.0, 2.0 ** (n - 1)), "") for n in range(1, 9)
    ]),
    ("two stalls at the same progress: give up early", RestartPolicy(5), [
        ("stall", "Epoch 3/100 - Batch 120/400", R, 1, 1.0, ""),
        ("stall", "Epoch 3/100 - Batch 120/400", G, 1, 0.0,
         "stalled twice at the same progress: Epoch 3/100 - Batch 120/400"),
    ]),
    ("the same progress any stall earlier counts", RestartPolicy(5), [
        ("stall", "step 100", R, 1, 1.0, ""),
        ("stall", "step 200", R, 2, 2.0, ""),
        ("stall", "step 100", G, 2, 0.0, "same progress: step 100"),
    ]),
    ("stalls at different progress keep going", RestartPolicy(5), [
        ("stall", "step 100", R, 1, 1.0, ""),
        ("stall", "step 200", R, 2, 2.0, ""),
    ]),
    ("no progress line: the same-progress rule does not apply", RestartPolicy(5), [
        ("stall", None, R, 1, 1.0, ""),
        ("stall", None, R, 2, 2.0, ""),
    ]),
    ("an attempt that ran well (progress 10 s after its start) starts the back-off over", RestartPolicy(9), [
        ("stall", "step 100", R, 1, 1.0, "", 600.0),
        ("stall", "step 200", R, 2, 1.0, "", 600.0),
        ("crash", None, R, 3, 2.0, "", 9.9),  # failed soon after its start: the back-off grows
        ("crash", None, R, 4, 4.0, "", 0.0),
        ("stall", "step 300", R, 5, 1.0, "", 10.0),
        ("stall", "step 300", G, 5, 0.0, "same progress", 600.0),  # ran well or not, the same hang again
    ]),
    ("crashes at the same progress are not stalls", RestartPolicy(5), [
        ("crash", "step 100", R, 1, 1.0, ""),
        ("crash", "step 100", R, 2, 2.0, ""),
        ("stall", "step 100", R, 3, 4.0, ""),
    ]),
]


@pytest.mark.parametrize("policy,steps", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decisions(policy, steps):
    budget = RestartBudget(policy)
    for reason, progress, restart, attempt, backoff, why, *progressed_s in steps:
        decision = budget.decide(reason, progress, *progressed_s)
        assert isinstance(decision, Decision)
        assert (decision.restart, decision.attempt, decision.backoff_s) == (restart, attempt, backoff)
        assert why in decision.why


def test_unknown_reason_is_rejected():
    with pytest.raises(ValueError, match="reason"):
        RestartBudget(RestartPolicy(3)).decide("timeout", None)


@pytest.mark.parametrize("kwargs,name", [
    (dict(max_restarts=-1), "max_restarts"),
    (dict(max_restarts=1, backoff_initial_s=-1), "backoff_initial_s"),
    (dict(max_restarts=1, backoff_initial_s=10, backoff_max_s=5), "backoff_max_s"),
])
def test_bad_policy_is_rejected(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RestartPolicy(**kwargs)


def test_backoff_stays_at_the_cap_for_the_thousandth_restart():
    """Issue 7.16: restart 1025 raised OverflowError computing 2 ** 1024."""
    budget = RestartBudget(RestartPolicy(max_restarts=5000))
    decisions = [budget.decide("crash", None) for _ in range(1100)]
    assert all(d.restart for d in decisions) and decisions[-1].backoff_s == 60.0

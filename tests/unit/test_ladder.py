"""The kill ladder's schedule, without processes."""
import signal

from supervisor.ladder import ABORT_TO_KILL_S, KillLadder


def test_stall_ladder_term_then_abort_then_kill():
    lad = KillLadder(10.0, grace_s=30.0, abort_step=True)
    assert [(s.sig, s.target) for s in lad.due(10.0)] == [(signal.SIGTERM, "group")]
    assert lad.due(39.9) == [] and lad.next_at() == 40.0
    assert [(s.sig, s.target) for s in lad.due(40.0)] == [(signal.SIGABRT, "tree")]
    assert lad.due(40.0 + ABORT_TO_KILL_S - 0.01) == []
    assert [(s.sig, s.target) for s in lad.due(42.0)] == [(signal.SIGKILL, "tree")]
    assert lad.next_at() is None and lad.killed_at == 42.0


def test_orphan_ladder_has_no_abort_and_terms_the_tree():
    lad = KillLadder(0.0, grace_s=1.0, abort_step=False, first_target="tree")
    assert [(s.sig, s.target) for s in lad.due(5.0)] == [(signal.SIGTERM, "tree"), (signal.SIGKILL, "tree")]


def test_second_ctrl_c_skips_to_kill():
    lad = KillLadder(0.0, grace_s=30.0, abort_step=True)
    lad.due(0.0)
    lad.kill_now(1.0)
    assert [s.sig for s in lad.due(1.0)] == [signal.SIGKILL]


def test_after_the_users_signal_the_ladder_starts_at_the_grace():
    """A stall's diagnosis cut short by the user's SIGTERM: that signal was the first rung, not ours."""
    lad = KillLadder(0.0, grace_s=30.0, abort_step=True, term_sent=True)
    assert lad.due(29.9) == [] and lad.next_at() == 30.0
    assert [s.sig for s in lad.due(32.0)] == [signal.SIGABRT, signal.SIGKILL]

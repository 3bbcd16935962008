"""The quiet lane's view of which streams have a backlog (worker/backlogs.py)."""

from __future__ import annotations

from streamd.worker.backlogs import Backlogs


def test_a_full_reply_marks_a_backlog_and_a_short_one_clears_it() -> None:
    view = Backlogs()
    assert not view.seen
    view.saw(["big", "quiet"], ["big"])
    assert view.seen and view.busy("big") and not view.busy("quiet")
    view.saw(["big"], ["big"])  # a top-up read of big alone, full again
    assert view.busy("big")
    view.saw(["big", "quiet"], [])  # both answered short, or not at all
    assert not view.busy("big")


def test_the_lane_reads_the_quiet_streams_or_else_all() -> None:
    view = Backlogs()
    names = ["big", "quiet", "calm"]
    assert view.lane_streams(names) == names  # nothing known: every stream
    view.saw(names, ["big"])
    assert view.lane_streams(names) == ["quiet", "calm"]
    view.saw(names, names)  # every stream has a backlog: the lane helps drain them
    assert view.lane_streams(names) == names
    assert view.lane_streams(["big"]) == ["big"]  # one stream: the lane is a plain consumer


def test_streams_no_longer_consumed_are_forgotten() -> None:
    view = Backlogs()
    view.saw(["a", "b"], ["a", "b"])
    view.keep_only(["b"])
    assert not view.busy("a") and view.busy("b")

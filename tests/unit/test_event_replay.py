"""Which stored events an SSE stream sends from a listing (`_replayed`): on connect with a
resume point, and after a compaction made the watch list again."""

from __future__ import annotations

from eep_controller.api.routes.stream import _replayed
from eep_controller.store import Resync
from eep_controller.store.audit import make_event


def _listing(*revisions: int) -> tuple[Resync, list[int]]:
    """A listing of one event per revision (written in that order) and their seqs."""
    snapshot: dict[str, tuple[bytes, int]] = {}
    seqs = []
    for revision in revisions:
        event_id, event = make_event("ds", "operation.phase", f"at {revision}")
        snapshot[f"/eep/v1/events/ds/{event_id}"] = (event.model_dump_json().encode(), revision)
        seqs.append(event.seq)
    return Resync(max(revisions) + 5, snapshot), seqs


def test_a_plain_connect_replays_nothing() -> None:
    listing, _ = _listing(3, 4, 7)
    assert _replayed(listing, None, None) == []


def test_a_resume_point_replays_the_later_events_oldest_first() -> None:
    listing, seqs = _listing(3, 4, 7, 9)
    got = _replayed(listing, None, seqs[1])
    assert [e.seq for e in got] == seqs[2:]
    assert [e.seq for e in _replayed(listing, None, 0)] == seqs


def test_a_listing_after_compaction_adds_what_was_written_since_the_last_sent() -> None:
    listing, seqs = _listing(3, 4, 7, 9)
    # events up to revision 4 were streamed already; the resume point no longer matters
    assert [e.seq for e in _replayed(listing, 4, seqs[3])] == seqs[2:]
    assert _replayed(listing, 9, None) == []


def test_an_unreadable_stored_value_is_skipped() -> None:
    listing, seqs = _listing(3, 4)
    listing.snapshot["/eep/v1/events/ds/0"] = (b"not json", 6)
    assert [e.seq for e in _replayed(listing, None, 0)] == seqs


def test_events_of_several_deployments_replay_in_the_order_they_were_written() -> None:
    """The stream of every deployment: a listing's keys group events by deployment, but a
    client resumes from the last event it got, so they are sent by time, not by key."""
    snapshot: dict[str, tuple[bytes, int]] = {}
    written = []
    for revision, name in enumerate(["zeta", "alpha", "zeta", "alpha", "mid"], start=3):
        event_id, event = make_event(name, "operation.phase", f"at {revision}")
        snapshot[f"/eep/v1/events/{name}/{event_id}"] = (event.model_dump_json().encode(), revision)
        written.append((event.seq, name))
    listing = Resync(20, snapshot)
    assert [(e.seq, e.deployment) for e in _replayed(listing, None, 0)] == written
    assert [(e.seq, e.deployment) for e in _replayed(listing, 4, None)] == written[2:]

"""Sequencer: apply / duplicate / gap / restart, as properties."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from engine_adapters.sequencer import SeqCheck, Sequencer, Verdict


def _digest(stream: int, seq: int) -> int:
    return hash((stream, seq))  # stands in for the payload's digest


def test_first_message_without_a_known_position() -> None:
    assert Sequencer().check_live(0, 1).verdict is Verdict.APPLY
    assert Sequencer().check_live(5, 1) == SeqCheck(Verdict.GAP, 0, 4)
    assert Sequencer().expected is None


def test_resume_from_a_known_start() -> None:
    s = Sequencer(last_applied=9)
    assert s.expected == 10
    assert s.check_live(10, 1).verdict is Verdict.APPLY
    assert s.check_live(12, 1) == SeqCheck(Verdict.GAP, 10, 11)
    assert s.check_replayed(9).verdict is Verdict.DUPLICATE
    assert s.check_replayed(10).verdict is Verdict.APPLY
    assert s.check_replayed(11) == SeqCheck(Verdict.GAP, 10, 10)
    # -1 means "known: nothing applied yet"
    assert Sequencer(last_applied=-1).check_live(1, 1) == SeqCheck(Verdict.GAP, 0, 0)


def test_restart_of_a_short_lived_publisher_is_detected() -> None:
    s = Sequencer()
    for q in range(3):
        assert s.check_live(q, _digest(0, q)).verdict is Verdict.APPLY
        s.applied(q, _digest(0, q))
    # a new engine process: count restarts at 0 with different payloads
    assert s.check_live(0, _digest(1, 0)).verdict is Verdict.RESTART
    s.reset()
    assert s.check_live(0, _digest(1, 0)).verdict is Verdict.APPLY


def test_live_copy_of_a_replayed_batch_is_a_duplicate_until_live_passes_it() -> None:
    s = Sequencer()
    for q in range(5):
        s.applied(q, _digest(0, q), replayed=True)
    assert s.check_live(3, _digest(0, 3)).verdict is Verdict.DUPLICATE
    assert s.check_live(3, _digest(9, 3)).verdict is Verdict.RESTART  # other payload
    s.applied(5, _digest(0, 5))  # live passed the replayed range
    assert s.check_live(4, _digest(0, 4)).verdict is Verdict.RESTART  # SUB never goes back


def test_replayed_digest_memory_is_bounded() -> None:
    s = Sequencer(max_tracked=10)
    for q in range(1000):
        s.applied(q, q, replayed=True)
    assert len(s._replayed) == 10


def _drive(
    published: int, delivered: list[bool], buffer: int, restart_at: int | None = None
) -> tuple[list[tuple[int, int]], int]:
    """Feed a lossy in-order live stream through the sequencer the way the
    adapter does, filling gaps from a bounded replay buffer. Returns the
    applied (stream, seq) pairs and the number of resets."""
    # stream 0 publishes `restart_at` batches (or all), then stream 1 starts at 0
    log: list[tuple[int, int]] = []  # everything published, in order
    for i in range(published):
        if restart_at is not None and i >= restart_at:
            log.append((1, i - restart_at))
        else:
            log.append((0, i))
    s = Sequencer()
    applied: list[tuple[int, int]] = []
    resets = 0
    for pos, (stream, seq) in enumerate(log):
        if not delivered[pos]:
            continue
        # replay answers from the current stream's buffer: what was published so far
        current = [x for x in log[: pos + 1] if x[0] == stream][-buffer:]
        for _ in range(6):
            d = s.check_live(seq, _digest(stream, seq))
            if d.verdict is Verdict.APPLY:
                s.applied(seq, _digest(stream, seq))
                applied.append((stream, seq))
                break
            if d.verdict is Verdict.DUPLICATE:
                break
            if d.verdict is Verdict.RESTART:
                resets += 1
                s.reset()
                continue
            for rs, rq in current:
                if rq < d.gap_from:
                    continue
                r = s.check_replayed(rq)
                if r.verdict is Verdict.DUPLICATE:
                    continue
                if r.verdict is Verdict.GAP:
                    if s.last is not None:
                        resets += 1
                    s.skip_to(rq - 1)
                s.applied(rq, _digest(rs, rq), replayed=True)
                applied.append((rs, rq))
        else:
            raise AssertionError("did not converge")
    return applied, resets


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 80),
    data=st.data(),
)
def test_lossy_stream_with_full_replay_applies_every_batch_once_in_order(n: int, data) -> None:
    delivered = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    delivered[-1] = True  # something must arrive to notice the losses
    applied, resets = _drive(n, delivered, buffer=10_000)
    assert applied == [(0, q) for q in range(n)]
    assert resets == 0


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 80), buffer=st.integers(1, 8), data=st.data())
def test_small_buffer_never_duplicates_or_reorders(n: int, buffer: int, data) -> None:
    delivered = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    delivered[-1] = True
    applied, resets = _drive(n, delivered, buffer=buffer)
    seqs = [q for _, q in applied]
    assert seqs == sorted(set(seqs))  # strictly increasing: no duplicate, no reorder
    assert seqs[-1] == n - 1  # caught up with the newest batch
    # every hole in what was applied is a counted reset (history lost)
    holes = sum(1 for a, b in itertools.pairwise(seqs) if b != a + 1)
    assert holes == resets
    if buffer >= n:
        assert seqs == list(range(n))


@settings(max_examples=200, deadline=None)
@given(before=st.integers(1, 30), after=st.integers(1, 30), data=st.data())
def test_restart_is_always_detected_and_the_new_stream_applied_whole(before: int, after: int, data) -> None:
    n = before + after
    delivered = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    delivered[before - 1] = True  # the old stream was seen
    delivered[-1] = True
    applied, resets = _drive(n, delivered, buffer=10_000, restart_at=before)
    old_stream = [q for s, q in applied if s == 0]
    assert old_stream == list(range(before))
    new_stream = [q for s, q in applied if s == 1]
    first_new = next(q for i, (s, q) in enumerate(_published(before, after)) if s == 1 and delivered[i])
    if first_new <= before - 1:
        # the count went back: detected, the worker reset, the new stream whole
        assert resets == 1
        assert new_stream == list(range(after))
    else:
        # the new process is already past the old position: indistinguishable
        # from a gap by sequence numbers alone (vLLM has no epoch on the wire)
        assert resets == 0
        assert new_stream == list(range(before, after))


def _published(before: int, after: int) -> list[tuple[int, int]]:
    return [(0, i) for i in range(before)] + [(1, i) for i in range(after)]

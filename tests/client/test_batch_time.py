"""Self-tuning batches (batch_time) in both forms against a real server. The targets are
chosen so that the direction is certain on any machine: no batch of a hundred messages or
more takes a microsecond, and none takes half an hour, so the sizes halve down to the floor
or double up to the cap, one step per batch, and the rows stay exactly the reference's."""

from __future__ import annotations

import psycopg2.errors
import pytest

import chatgen
from test_resumable import CALL, chats_for_test, make_db, one_shot_rows, rows_of


@pytest.fixture(scope="module")
def expected(cluster):
    chats = chats_for_test(count=400, hostile=False)
    return chats, one_shot_rows(cluster, chats)


def batch_sizes(cluster, db, args: str) -> list[int]:
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT batch_size FROM backfill_chat_messages(now => %s, {args}) ORDER BY batch", (chatgen.NOW,))
        return [r[0] for r in cur.fetchall()]


def test_a_long_batch_time_doubles_the_size_up_to_the_cap(cluster, expected):
    chats, want = expected
    db = make_db(cluster, chats)
    sizes = batch_sizes(cluster, db, "batch_size => 100, batch_time => '30 minutes'")
    assert sizes[:4] == [100, 200, 400, 800], sizes
    assert all(b == min(2 * a, 100_000) for a, b in zip(sizes, sizes[1:])), sizes
    assert rows_of(cluster, db) == want


def test_a_short_batch_time_halves_the_size_down_to_the_floor(cluster, expected):
    chats, want = expected
    db = make_db(cluster, chats)
    sizes = batch_sizes(cluster, db, "batch_size => 1000, batch_time => '1 microsecond'")
    assert sizes[:5] == [1000, 500, 250, 125, 100], sizes
    assert set(sizes[4:]) == {100}, sizes
    assert rows_of(cluster, db) == want


def test_without_batch_time_the_size_is_fixed(cluster, expected):
    chats, _ = expected
    db = make_db(cluster, chats)
    assert set(batch_sizes(cluster, db, "batch_size => 300")) == {300}


def test_the_start_is_kept_within_the_range(cluster, expected):
    chats, _ = expected
    db = make_db(cluster, chats)
    assert batch_sizes(cluster, db, "batch_size => 7, batch_time => '1 microsecond'")[0] == 100


@pytest.mark.parametrize("workers", [1, 2])
def test_the_committing_form_tunes_too_and_shows_the_size(cluster, expected, workers):
    chats, want = expected
    db = make_db(cluster, chats)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CALL.format(extra=f"batch_size => 1000, batch_time => '1 microsecond', workers => {workers}"),
                    {"now": chatgen.NOW})
        cur.execute("SELECT state, batch_size, batches FROM chat_backfill.status")
        state, size, batches = cur.fetchone()
    # One session ends at the floor; each worker starts at 1000 and carries its size from
    # range to range, so the last batch of the run has shrunk at least once.
    assert state == "finished" and batches >= 4
    assert size == 100 if workers == 1 else 100 <= size <= 500
    assert rows_of(cluster, db) == want


@pytest.mark.parametrize("bad", ["0", "-1 second", "2 hours"])
def test_a_batch_time_out_of_range_is_refused(cluster, bad):
    db = make_db(cluster, [])
    with pytest.raises(psycopg2.errors.InvalidParameterValue) as err:
        batch_sizes(cluster, db, f"batch_time => '{bad}'")
    assert "batch_time must be more than 0 and at most 1 hour" in err.value.diag.message_primary
    with pytest.raises(psycopg2.errors.InvalidParameterValue):
        with cluster.connect(db) as conn, conn.cursor() as cur:
            cur.execute(CALL.format(extra=f"batch_time => '{bad}'"), {"now": chatgen.NOW})

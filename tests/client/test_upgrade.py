"""Upgrading from every earlier release to this one with ALTER EXTENSION ... UPDATE, part way
through a run.

Each release is packaged from its git commit (scripts/old_release.sh). Its library replaces the
installed one while the old run is made, then the current build's library comes back (each
swap is an atomic rename; backends that loaded the old library keep it, new ones load the
file on disk). The run then finishes under this release: its state is kept, no message is
written twice and none is missing. Last, the updated extension's members are compared, from
the catalog, with a fresh CREATE EXTENSION of this release (pg_dump -s prints only CREATE
EXTENSION for members, so it proves nothing here).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import chatgen
from compare import fetch_rows
from conftest import CHAT_DDL, ONE_MAJOR, PG_MAJOR, ROOT, Cluster, pg_config
from load_sample import TARGET_DDL, copy_chats

# Every earlier release, by the commit it was released from; each is upgraded to this one.
# The whole chain runs on 15; on the other majors only the last step, the one this release
# adds: the earlier scripts are the same SQL on every major, and each was tested on every
# major while it was the last step (each old release is a build of its own, minutes each).
# 0.1.0 built only for PostgreSQL 15 (it set RangeTblEntry.requiredPerms, gone in 16).
CHAIN_ON_15_ONLY = pytest.mark.skipif(PG_MAJOR != "15", reason="earlier upgrade steps run on 15; the last step on every major")
# 0.7.0 is the first release built for 14 and 17: there, installs start at 0.7.0.
RELEASED_FOR_THIS_MAJOR = pytest.mark.skipif(PG_MAJOR in ("14", "17"), reason="no earlier release was built for PostgreSQL 14 or 17")
RELEASES = [
    pytest.param("0.1.0", "5c98822", marks=CHAIN_ON_15_ONLY),
    pytest.param("0.2.0", "86bb366", marks=CHAIN_ON_15_ONLY),
    pytest.param("0.3.0", "d72af31", marks=CHAIN_ON_15_ONLY),
    pytest.param("0.4.0", "6ea4be5", marks=CHAIN_ON_15_ONLY),
    pytest.param("0.5.0", "fc234fd", marks=CHAIN_ON_15_ONLY),
    pytest.param("0.6.0", "1ecc158", marks=RELEASED_FOR_THIS_MAJOR),
]
NEW_VERSION = "0.7.0"
LIB = Path(pg_config("--pkglibdir")) / "chat_backfill.so"
EXTDIR = Path(pg_config("--sharedir")) / "extension"


@contextlib.contextmanager
def old_library(version: str, commit: str):
    """An earlier release's library and install script in place of the current library, for the block."""
    package = Path(subprocess.run(["bash", str(ROOT / "scripts/old_release.sh"), version, commit, PG_MAJOR],
                                  check=True, capture_output=True, text=True).stdout.strip())
    shutil.copy(package / EXTDIR.relative_to("/") / f"chat_backfill--{version}.sql", EXTDIR)
    current = LIB.with_name("chat_backfill.so.current")
    shutil.copy2(LIB, current)
    swap(package / LIB.relative_to("/"))
    try:
        yield
    finally:
        swap(current)
        current.unlink()


def swap(library: Path) -> None:
    staged = LIB.with_name("chat_backfill.so.staged")
    shutil.copy2(library, staged)
    os.replace(staged, LIB)


def members(cluster: Cluster, db: str) -> dict[str, str]:
    """Every member of the extension, described by what defines it."""
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(
            """
            SELECT pg_describe_object(d.classid, d.objid, 0),
                   CASE d.classid
                     WHEN 'pg_proc'::regclass THEN
                       pg_get_functiondef(d.objid) || ' acl=' || coalesce((SELECT proacl::text FROM pg_proc WHERE oid = d.objid), '')
                     WHEN 'pg_class'::regclass THEN (
                       SELECT concat_ws(' | ', c.relkind, c.relacl::text, c.relrowsecurity, c.reloptions::text,
                         CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(c.oid) END,
                         (SELECT string_agg(concat_ws(' ', a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
                                            a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid), a.attacl::text), '; ' ORDER BY a.attnum)
                            FROM pg_attribute a LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
                         (SELECT string_agg(pg_get_indexdef(i.indexrelid), '; ' ORDER BY pg_get_indexdef(i.indexrelid)) FROM pg_index i WHERE i.indrelid = c.oid),
                         (SELECT string_agg(conname || ' ' || pg_get_constraintdef(oid), '; ' ORDER BY conname)
                            FROM pg_constraint WHERE conrelid = c.oid),
                         (SELECT string_agg(concat_ws(' ', p.policyname, p.cmd, p.roles::text, p.qual, p.with_check), '; '
                                            ORDER BY p.policyname)
                            FROM pg_policies p WHERE p.schemaname = n.nspname AND p.tablename = c.relname))
                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = d.objid)
                     WHEN 'pg_namespace'::regclass THEN (SELECT nspacl::text FROM pg_namespace WHERE oid = d.objid)
                     ELSE '' END
            FROM pg_depend d JOIN pg_extension e ON d.refobjid = e.oid AND d.refclassid = 'pg_extension'::regclass
            WHERE e.extname = 'chat_backfill' AND d.deptype = 'e'
            UNION ALL
            SELECT 'extension config', (SELECT string_agg(x::regclass::text, ', ' ORDER BY x::regclass::text)
                                        FROM unnest(extconfig) x) || ' ' || extversion
            FROM pg_extension WHERE extname = 'chat_backfill'
            """
        )
        return dict(cur.fetchall())


def fresh_install_rows(cluster: Cluster, chats, prefix: str) -> tuple[str, list]:
    """A database with this release freshly installed and the chats backfilled in one call: its name and rows."""
    db = cluster.create_db(prefix)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute(CHAT_DDL)
        copy_chats(conn, chats)
        cur.execute(TARGET_DDL)
        cur.execute("SELECT * FROM backfill_chat_messages(now => %s)", (chatgen.NOW,))
        return db, fetch_rows(conn, parse_json=False)


@pytest.mark.parametrize("old_version, old_commit", RELEASES)
def test_update_part_way_through_a_run_keeps_it_and_equals_a_fresh_install(cluster, old_version, old_commit):
    chats = chatgen.realistic_chats(seed=11, count=90, content_bytes=(200, 1200), messages=(2, 9)) + chatgen.hostile_chats()
    db = cluster.create_db("upgrade", extension=False)
    with old_library(old_version, old_commit):
        with cluster.connect(db) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE EXTENSION chat_backfill VERSION '{old_version}'")
            cur.execute(CHAT_DDL)
            copy_chats(conn, chats)
            cur.execute(TARGET_DDL)
            # Part way: max_runtime stops the run after its first committed batch.
            cur.execute("CALL backfill_chat_messages_resumable(now => %s, batch_size => 40, max_runtime => '0')",
                        (chatgen.NOW,))
            cur.execute("SELECT run_id, status, last_key, chats_read, messages_inserted, high_water, now FROM chat_backfill.runs")
            [before] = cur.fetchall()
            cur.execute("SELECT count(*) FROM chat_message")
            written_before = cur.fetchone()[0]
            cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'chat_backfill'")
            assert cur.fetchone() == (old_version,)
    assert before[1] == "stopped" and 0 < before[3] < len(chats) and written_before == before[4] > 0

    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("ALTER EXTENSION chat_backfill UPDATE")
        cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'chat_backfill'")
        assert cur.fetchone() == (NEW_VERSION,)
        cur.execute("SELECT run_id, status, last_key, chats_read, messages_inserted, high_water, now FROM chat_backfill.runs")
        assert cur.fetchall() == [before], "the update keeps the run's state"
        cur.execute("CALL backfill_chat_messages_resumable(batch_size => 40)")
        resumed = [n.strip() for n in conn.notices if "resuming" in n]
        assert resumed and f"resuming run {before[0]} after key {before[2]}" in resumed[0]
        cur.execute("SELECT state, chats_done, total_chats, messages_inserted, messages_existing FROM chat_backfill.status")
        [(state, done, total, inserted, existing)] = cur.fetchall()
        upgraded_rows = fetch_rows(conn, parse_json=False)
    assert (state, done, existing) == ("finished", total, 0), "nothing was read twice"

    fresh, fresh_rows = fresh_install_rows(cluster, chats, "fresh")
    assert inserted == len(upgraded_rows)
    assert upgraded_rows == fresh_rows, "no duplicate, no missing message"

    updated, created = members(cluster, db), members(cluster, fresh)
    assert updated.keys() == created.keys()
    for name in created:
        assert updated[name] == created[name], name


@ONE_MAJOR
@RELEASED_FOR_THIS_MAJOR
def test_update_while_the_old_releases_workers_run(cluster):
    """ALTER EXTENSION UPDATE from 0.6.0 while two of 0.6.0's background workers write: the
    update waits for their batch, and whatever the old workers do next (finish, or stop on
    the changed state with a named error: the suite's last test reads the server log for
    XX000), the next CALL under this release finishes the run with exactly the reference
    rows, none written twice."""
    chats = chatgen.realistic_chats(seed=29, count=3000, content_bytes=(200, 800), messages=(4, 12))
    _, want = fresh_install_rows(cluster, chats, "upd_ref")
    db = cluster.create_db("upd_workers", extension=False)

    def workers() -> int:
        with cluster.connect(db) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'chat_backfill worker'"
                        " AND datname = current_database()")
            return cur.fetchone()[0]

    with old_library("0.6.0", "1ecc158"):
        with cluster.connect(db) as conn, conn.cursor() as cur:
            cur.execute("CREATE EXTENSION chat_backfill VERSION '0.6.0'")
            cur.execute(CHAT_DDL)
            copy_chats(conn, chats)
            cur.execute(TARGET_DDL)
            cur.execute("CALL backfill_chat_messages_resumable(now => %s, batch_size => 50, workers => 2,"
                        " wait_for_workers => false)", (chatgen.NOW,))
        deadline = time.monotonic() + 60
        while True:
            with cluster.connect(db) as conn, conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM chat_message")
                if cur.fetchone()[0] > 0:
                    break
            assert time.monotonic() < deadline, "the old workers wrote nothing"
            time.sleep(0.05)
    # The current library is back on disk; the old workers keep the one they loaded.
    assert workers() == 2, "the update comes while the old workers run"
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("ALTER EXTENSION chat_backfill UPDATE")
        cur.execute("SELECT count(*) FROM chat_message")
        written = cur.fetchone()[0]
    assert 0 < written < len(want), "the update came part way"
    deadline = time.monotonic() + 120
    while workers():
        assert time.monotonic() < deadline, "the old workers never stopped"
        time.sleep(0.1)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("CALL backfill_chat_messages_resumable(now => %s, workers => 2)", (chatgen.NOW,))
        cur.execute("SELECT state FROM chat_backfill.status ORDER BY run_id DESC LIMIT 1")
        assert cur.fetchone() == ("finished",)
        got = fetch_rows(conn, parse_json=False)
    assert got == want, "no duplicate, no missing message"

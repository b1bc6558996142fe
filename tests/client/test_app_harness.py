"""Self-check of app_reference.py: Open WebUI 0.12.4's own migration chain and its own
`Chats.get_messages_map_by_chat_id`, loaded from the wheel, on a real database."""

from __future__ import annotations

import json

import app_reference

NOW = 1_750_000_000

HEAD_CHAT_MESSAGE_COLUMNS = [
    "id", "chat_id", "user_id", "role", "parent_id", "content", "output", "model_id", "files", "sources",
    "embeds", "done", "status_history", "error", "usage", "created_at", "updated_at", "context_summary", "meta",
]


def test_head_schema_and_the_apps_backfill(cluster):
    db = cluster.create_db("appharness", extension=False)
    url = cluster.url(db)
    app_reference.build_head_schema(url)
    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT version_num FROM alembic_version")
        assert cur.fetchall() == [(app_reference.HEAD,)]
        cur.execute("SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND table_name = 'chat_message' ORDER BY ordinal_position")
        cols = cur.fetchall()
        assert [c for c, _ in cols] == HEAD_CHAT_MESSAGE_COLUMNS
        assert dict(cols)["meta"] == "json" and dict(cols)["context_summary"] == "text"
        cur.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'chat_message'")
        assert any("(chat_id, role, done)" in d for (d,) in cur.fetchall())

        history = {"history": {"currentId": "b", "messages": {
            "a": {"id": "a", "role": "user", "content": "hi", "parentId": None, "childrenIds": ["b"],
                  "timestamp": 1_700_000_100},
            "b": {"id": "b", "role": "assistant", "content": "hello", "parentId": "a", "childrenIds": [],
                  "model": "m1", "timestamp": 1_700_000_200,
                  "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
        }}}
        app_reference.insert_chats(conn, [
            ("c-normal", "u1", json.dumps(history)),
            ("c-string", "u1", json.dumps(json.dumps(history))),  # the chat is a JSON string
        ])

    maps = app_reference.app_messages_maps(url, ["c-normal", "c-string"], NOW)
    assert set(maps["c-normal"]) == {"a", "b"}
    # The app cannot load a chat whose document is a string: no map, no rows.
    assert maps["c-string"] is None

    with cluster.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, chat_id, user_id, role, parent_id, model_id, usage::text, created_at, updated_at, "
                    "done FROM chat_message ORDER BY id")
        rows = {r[0]: r for r in cur.fetchall()}
    assert set(rows) == {"c-normal-a", "c-normal-b"}
    b = rows["c-normal-b"]
    assert b[1:6] == ("c-normal", "u1", "assistant", "a", "m1")
    assert json.loads(b[6]) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                "input_tokens": 3, "output_tokens": 4}
    assert b[7:] == (1_700_000_200, NOW, True)
    # A missing value goes in as JSON null, not SQL NULL (the bulk INSERT binds None through
    # SQLAlchemy's JSON type), and JSON is written compact, by orjson.
    assert rows["c-normal-a"][6] == "null"
    assert b[6] == '{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"input_tokens":3,"output_tokens":4}'

    # A second call reads the rows back (the fast path) and writes nothing more.
    again = app_reference.app_messages_maps(url, ["c-normal"], NOW + 5)
    assert again["c-normal"]["b"]["usage"]["input_tokens"] == 3
    assert again["c-normal"]["a"]["childrenIds"] == ["b"]

//! chat_backfill: moves chats stored as JSON documents into `chat_message` rows inside
//! PostgreSQL.
//!
//! The layers, each importing only from those before it (scripts/check_imports.py holds
//! that):
//! - the rules (the `chat_backfill_rules` crate, rules/): one chat document in, its rows
//!   out, in plain Rust;
//! - `pg`: the PostgreSQL glue (errors, settings, datums, subtransactions, catalog lookups,
//!   version differences);
//! - `engine`: one backfill: read, expand, batch, write, record rejections; verify;
//! - `planning`: estimates, `plan()` and admission;
//! - `run`: the committing run: driver, checkpoints, ranges, workers, throttle;
//! - `surface`: the SQL functions and procedures, thin wrappers over the rest.

mod engine;
mod pg;
mod planning;
mod run;
mod surface;

::pgrx::pg_module_magic!();

#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // pgrx captures a Rust backtrace for every error that crosses our frames (a cancel
    // included) and appends it to the DETAIL the client sees whenever the server was started
    // with RUST_BACKTRACE set: internals no caller should be shown. RUST_LIB_BACKTRACE wins
    // over RUST_BACKTRACE for captured backtraces, and is read once, at the first capture.
    // At library load a backend (or worker) runs one thread: nothing reads the environment
    // meanwhile.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    pg::gucs::init();
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    const CHAT: &str = r#"{"history":{"messages":{
        "a":{"role":"user","content":{"x":[1,2]},"timestamp":1700000000},
        "b":{"role":"assistant","parentId":"a","model":"m","done":false},
        "c":{"role":{"bad":1}}, "d":"not a message"}}}"#;

    fn setup_tables() {
        Spi::run("CREATE TABLE chat (id text PRIMARY KEY, user_id text, chat json)").unwrap();
        Spi::run(
            "CREATE TABLE chat_message (id text PRIMARY KEY, chat_id text NOT NULL REFERENCES chat(id), user_id text, \
             role text NOT NULL, parent_id text, content json, output json, model_id text, files json, sources json, \
             embeds json, done boolean, status_history json, error json, usage json, created_at bigint, updated_at bigint)",
        )
        .unwrap();
    }

    #[pg_test]
    fn chat_messages_gives_the_storable_rows() {
        let n = Spi::get_one_with_args::<i64>("SELECT count(*) FROM chat_messages('c', 'u', $1::json, 1760000000)", &[CHAT.into()]);
        assert_eq!(n, Ok(Some(2)));
        let content = Spi::get_one_with_args::<String>(
            "SELECT content::text FROM chat_messages('c', 'u', $1::json, 1760000000) WHERE id = 'c-a'",
            &[CHAT.into()],
        );
        assert_eq!(content, Ok(Some(r#"{"x":[1,2]}"#.to_owned())));
        let problems = Spi::get_one_with_args::<i64>("SELECT count(*) FROM chat_message_problems('c', $1::json)", &[CHAT.into()]);
        assert_eq!(problems, Ok(Some(2)));
    }

    #[pg_test]
    fn now_defaults_to_the_transaction_start() {
        let ts = Spi::get_one::<bool>(
            "SELECT created_at = extract(epoch FROM now())::bigint - (extract(epoch FROM now()) < extract(epoch FROM now())::bigint)::int \
             FROM chat_messages('c', 'u', '{\"history\":{\"messages\":{\"a\":{\"role\":\"user\"}}}}'::json)",
        );
        assert_eq!(ts, Ok(Some(true)));
    }

    #[pg_test]
    fn bad_rows_are_isolated_by_halving_and_the_rest_is_written() {
        setup_tables();
        // 200 chats of 5 messages; 3 of the 1000 messages break a CHECK constraint.
        Spi::run(
            "INSERT INTO chat SELECT 'c' || i, 'u', json_build_object('history', json_build_object('messages', \
             (SELECT json_object_agg('m' || j, json_build_object('role', CASE WHEN (i, j) IN ((7, 2), (100, 5), (150, 1)) \
             THEN 'evil' ELSE 'user' END, 'timestamp', 1700000000)) FROM generate_series(1, 5) j))) \
             FROM generate_series(1, 200) i",
        )
        .unwrap();
        Spi::run("ALTER TABLE chat_message ADD CONSTRAINT no_evil CHECK (role <> 'evil')").unwrap();
        let totals = Spi::get_two::<i64, i64>(
            "SELECT sum(messages_inserted)::int8, sum(messages_rejected)::int8 FROM backfill_chat_messages(batch_size => 1000)",
        );
        assert_eq!(totals, Ok((Some(997), Some(3))));
        let rejected = Spi::get_one::<String>(
            "SELECT string_agg(message_id || ':' || sqlstate, ',' ORDER BY message_id) FROM chat_backfill.rejected_messages",
        );
        assert_eq!(rejected, Ok(Some("c100-m5:23514,c150-m1:23514,c7-m2:23514".to_owned())));
    }

    #[pg_test]
    fn a_chat_bigger_than_a_batch_spans_batches() {
        setup_tables();
        Spi::run(
            "INSERT INTO chat SELECT 'c' || i, 'u', json_build_object('history', json_build_object('messages', \
             (SELECT json_object_agg('m' || j, json_build_object('role', 'user')) FROM generate_series(1, 10) j))) \
             FROM generate_series(1, 2) i",
        )
        .unwrap();
        // 20 messages in batches of 3: a chat bigger than a batch is split, the next chat
        // starts a batch of its own; each chat counts once, in the batch of its last message.
        let runs = Spi::get_three::<i64, i64, String>(
            "SELECT count(*), sum(messages_inserted)::int8, string_agg(chats_read::text, ',' ORDER BY batch) \
             FROM backfill_chat_messages(batch_size => 3)",
        );
        assert_eq!(runs, Ok((Some(8), Some(20), Some("0,0,0,1,0,0,0,1".to_owned()))));
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM chat_message"), Ok(Some(20)));
    }

    #[pg_test]
    fn a_rerun_inserts_only_what_is_missing() {
        setup_tables();
        Spi::run_with_args("INSERT INTO chat VALUES ('c', 'u', $1::json)", &[CHAT.into()]).unwrap();
        Spi::run("SELECT * FROM backfill_chat_messages()").unwrap();
        Spi::run("DELETE FROM chat_message WHERE id = 'c-b'").unwrap();
        let again = Spi::get_two::<i64, i64>(
            "SELECT sum(messages_inserted)::int8, sum(messages_existing)::int8 FROM backfill_chat_messages()",
        );
        assert_eq!(again, Ok((Some(1), Some(1))));
    }

    /// The INSERT path (a target COPY may not write: row-level security enabled, which the
    /// superuser running the test bypasses) writes exactly what the COPY path writes, bad rows
    /// isolated the same way.
    #[pg_test]
    fn the_insert_path_writes_what_copy_writes() {
        setup_tables();
        Spi::run(
            "INSERT INTO chat SELECT 'c' || i, 'u', json_build_object('history', json_build_object('messages', \
             (SELECT json_object_agg('m' || j, json_build_object('role', CASE WHEN i = 3 AND j = 2 THEN 'evil' ELSE 'user' END, \
             'content', 'text ' || i || '/' || j, 'timestamp', 1700000000 + j)) FROM generate_series(1, 4) j))) \
             FROM generate_series(1, 30) i",
        )
        .unwrap();
        Spi::run("CREATE TABLE inserted (LIKE chat_message INCLUDING ALL); ALTER TABLE inserted ENABLE ROW LEVEL SECURITY").unwrap();
        Spi::run("ALTER TABLE chat_message ADD CONSTRAINT no_evil CHECK (role <> 'evil'); \
                  ALTER TABLE inserted ADD CONSTRAINT no_evil_too CHECK (role <> 'evil')")
        .unwrap();
        let copied = Spi::get_two::<i64, i64>(
            "SELECT sum(messages_inserted)::int8, sum(messages_rejected)::int8 FROM backfill_chat_messages(batch_size => 50)",
        );
        let inserted = Spi::get_two::<i64, i64>(
            "SELECT sum(messages_inserted)::int8, sum(messages_rejected)::int8 \
             FROM backfill_chat_messages('chat', 'inserted', batch_size => 50)",
        );
        assert_eq!(copied, Ok((Some(119), Some(1))));
        assert_eq!(inserted, copied);
        let differ = Spi::get_one::<i64>(
            "SELECT count(*) FROM ((SELECT m::text FROM chat_message m EXCEPT SELECT i::text FROM inserted i) \
             UNION ALL (SELECT i::text FROM inserted i EXCEPT SELECT m::text FROM chat_message m)) d",
        );
        assert_eq!(differ, Ok(Some(0)));
    }

    /// A chat deleted after the backfill's portal read it (here by a trigger on the target as
    /// the chat before it is written, a batch earlier) fails its rows' foreign key: the chat
    /// counts as vanished, nothing of it is recorded as rejected, the other chats are written.
    #[pg_test]
    fn a_chat_deleted_while_its_rows_are_written_counts_as_vanished() {
        setup_tables();
        Spi::run(
            "INSERT INTO chat SELECT 'c' || i, 'u', json_build_object('history', json_build_object('messages', \
             (SELECT json_object_agg('m' || j, json_build_object('role', 'user')) FROM generate_series(1, 3) j))) \
             FROM generate_series(1, 5) i",
        )
        .unwrap();
        Spi::run(
            "CREATE FUNCTION delete_c2() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN IF NEW.chat_id = 'c1' THEN DELETE FROM chat WHERE id = 'c2'; END IF; RETURN NEW; END $$; \
             CREATE TRIGGER c2_goes BEFORE INSERT ON chat_message FOR EACH ROW EXECUTE FUNCTION delete_c2()",
        )
        .unwrap();
        let totals = Spi::get_three::<i64, i64, i64>(
            "SELECT sum(messages_inserted)::int8, sum(messages_rejected)::int8, sum(chats_vanished)::int8 \
             FROM backfill_chat_messages(batch_size => 3)",
        );
        assert_eq!(totals, Ok((Some(12), Some(0), Some(1))));
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM chat_backfill.rejected_messages"), Ok(Some(0)));
        assert_eq!(Spi::get_one::<i64>("SELECT count(DISTINCT chat_id) FROM chat_message"), Ok(Some(4)));
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}

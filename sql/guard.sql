-- What the state tables are made of, one line per part that a write or a read of them could
-- run code through: every relation of the schema (a table the owner turned into a view is a
-- difference, not a table less to look at) with its kind, access method, row-level security
-- switches, replica identity and whether it belongs to the extension; every column (type,
-- NOT NULL, generated, identity, collation), default, constraint, index (by name: REINDEX
-- CONCURRENTLY, which fires no event trigger before 17, gives it a new oid; an invalid copy
-- of a valid index, which an interrupted one leaves, is the same index; whether it is valid,
-- ready and live: a refused DROP INDEX CONCURRENTLY leaves it none), publication membership
-- (a row filter or column list makes every UPDATE of the table fail), extended statistics object (the
-- planner evaluates its expressions for every query on the table), trigger, rule and policy,
-- each as its stored node tree (oids, not names a search_path could spell otherwise); a
-- sequence's options; the casts and operators on a table's row type; every table inheriting
-- from one and every table one inherits from or is a partition of (a parent's partition key
-- is checked on every write to its partition); and every function, type and operator in the
-- schema (a trusted extension created there by the owner adds some). The install and update scripts record it in a table the
-- bootstrap superuser owns, which the extension's owner cannot change; before each
-- transaction a backfill makes, a caller the state's owner cannot act as compares it with what
-- is there (src/engine/state_guard.rs).
CREATE FUNCTION chat_backfill.state_definition() RETURNS SETOF pg_catalog.text LANGUAGE sql STABLE
BEGIN ATOMIC
    WITH state AS (
        SELECT c.oid, c.relname FROM pg_catalog.pg_class c
         WHERE c.relnamespace OPERATOR(pg_catalog.=) 'chat_backfill'::pg_catalog.regnamespace::pg_catalog.oid
           AND c.relkind OPERATOR(pg_catalog.<>) ALL (ARRAY['i', 'I']::pg_catalog."char"[])
    ), row_types AS (
        SELECT s.relname, u.typ FROM state s JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) s.oid
          JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) c.reltype,
          LATERAL pg_catalog.unnest(ARRAY[t.oid, t.typarray]) AS u (typ)
    )
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'table', c.relkind, c.relam, c.relpersistence,
                                c.relrowsecurity, c.relforcerowsecurity, c.reloftype, c.relispartition,
                                c.relpartbound::pg_catalog.text, c.relreplident,
                                EXISTS (SELECT FROM pg_catalog.pg_depend d
                                         WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                                           AND d.objid OPERATOR(pg_catalog.=) c.oid
                                           AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
                                           AND d.deptype OPERATOR(pg_catalog.=) 'e'::pg_catalog."char"))
      FROM state s JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) s.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'column', a.attname, a.atttypid, a.attnotnull,
                                a.attgenerated, a.attidentity, a.attcollation, a.attisdropped)
      FROM state s JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) s.oid
     WHERE a.attnum OPERATOR(pg_catalog.>) 0::pg_catalog.int2
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'default', a.attname, d.adbin::pg_catalog.text)
      FROM state s JOIN pg_catalog.pg_attrdef d ON d.adrelid OPERATOR(pg_catalog.=) s.oid
      JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) s.oid AND a.attnum OPERATOR(pg_catalog.=) d.adnum
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'constraint', k.conname, k.contype, k.conkey::pg_catalog.text,
                                k.confrelid, k.confupdtype, k.confdeltype, k.conbin::pg_catalog.text)
      FROM state s JOIN pg_catalog.pg_constraint k ON k.conrelid OPERATOR(pg_catalog.=) s.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'index', x.relname, x.relam, i.indkey::pg_catalog.text,
                                i.indclass::pg_catalog.text, i.indcollation::pg_catalog.text, i.indexprs::pg_catalog.text,
                                i.indpred::pg_catalog.text, i.indisvalid, i.indisready, i.indislive)
      FROM state s JOIN pg_catalog.pg_index i ON i.indrelid OPERATOR(pg_catalog.=) s.oid
      JOIN pg_catalog.pg_class x ON x.oid OPERATOR(pg_catalog.=) i.indexrelid
     WHERE i.indisvalid OR NOT EXISTS (
               SELECT FROM pg_catalog.pg_index v
                WHERE v.indrelid OPERATOR(pg_catalog.=) i.indrelid AND v.indisvalid
                  AND v.indkey::pg_catalog.text OPERATOR(pg_catalog.=) i.indkey::pg_catalog.text
                  AND v.indclass::pg_catalog.text OPERATOR(pg_catalog.=) i.indclass::pg_catalog.text
                  AND v.indcollation::pg_catalog.text OPERATOR(pg_catalog.=) i.indcollation::pg_catalog.text
                  AND COALESCE(v.indexprs::pg_catalog.text, ''::pg_catalog.text)
                      OPERATOR(pg_catalog.=) COALESCE(i.indexprs::pg_catalog.text, ''::pg_catalog.text)
                  AND COALESCE(v.indpred::pg_catalog.text, ''::pg_catalog.text)
                      OPERATOR(pg_catalog.=) COALESCE(i.indpred::pg_catalog.text, ''::pg_catalog.text))
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'publication', p.pubname,
                                (pg_catalog.to_jsonb(r) OPERATOR(pg_catalog.-) ARRAY['oid', 'prpubid']::pg_catalog.text[])::pg_catalog.text)
      FROM state s JOIN pg_catalog.pg_publication_rel r ON r.prrelid OPERATOR(pg_catalog.=) s.oid
      JOIN pg_catalog.pg_publication p ON p.oid OPERATOR(pg_catalog.=) r.prpubid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'statistics', n.nspname, x.stxname, x.stxkeys::pg_catalog.text,
                                x.stxkind::pg_catalog.text, x.stxexprs::pg_catalog.text)
      FROM state s JOIN pg_catalog.pg_statistic_ext x ON x.stxrelid OPERATOR(pg_catalog.=) s.oid
      JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) x.stxnamespace
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'sequence', q.seqtypid, q.seqstart, q.seqincrement, q.seqmax,
                                q.seqmin, q.seqcache, q.seqcycle)
      FROM state s JOIN pg_catalog.pg_sequence q ON q.seqrelid OPERATOR(pg_catalog.=) s.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, y.relname, 'cast from', k.castsource, k.casttarget, k.castfunc,
                                k.castcontext, k.castmethod)
      FROM row_types y JOIN pg_catalog.pg_cast k ON k.castsource OPERATOR(pg_catalog.=) y.typ
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, y.relname, 'cast to', k.castsource, k.casttarget, k.castfunc,
                                k.castcontext, k.castmethod)
      FROM row_types y JOIN pg_catalog.pg_cast k ON k.casttarget OPERATOR(pg_catalog.=) y.typ
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, y.relname, 'operator on the left', o.oprname, o.oprleft, o.oprright,
                                o.oprcode)
      FROM row_types y JOIN pg_catalog.pg_operator o ON o.oprleft OPERATOR(pg_catalog.=) y.typ
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, y.relname, 'operator on the right', o.oprname, o.oprleft, o.oprright,
                                o.oprcode)
      FROM row_types y JOIN pg_catalog.pg_operator o ON o.oprright OPERATOR(pg_catalog.=) y.typ
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, 'function', p.proname, p.proargtypes::pg_catalog.text, p.prorettype,
                                p.prokind)
      FROM pg_catalog.pg_proc p
     WHERE p.pronamespace OPERATOR(pg_catalog.=) 'chat_backfill'::pg_catalog.regnamespace::pg_catalog.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, 'type', t.typname, t.typtype)
      FROM pg_catalog.pg_type t
     WHERE t.typnamespace OPERATOR(pg_catalog.=) 'chat_backfill'::pg_catalog.regnamespace::pg_catalog.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, 'operator', o.oprname, o.oprleft, o.oprright)
      FROM pg_catalog.pg_operator o
     WHERE o.oprnamespace OPERATOR(pg_catalog.=) 'chat_backfill'::pg_catalog.regnamespace::pg_catalog.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'trigger', t.tgname, t.tgfoid, t.tgtype, t.tgenabled,
                                t.tgqual::pg_catalog.text)
      FROM state s JOIN pg_catalog.pg_trigger t ON t.tgrelid OPERATOR(pg_catalog.=) s.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'rule', r.rulename, r.ev_type, r.ev_action::pg_catalog.text)
      FROM state s JOIN pg_catalog.pg_rewrite r ON r.ev_class OPERATOR(pg_catalog.=) s.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'policy', p.polname, p.polcmd, p.polpermissive,
                                p.polroles::pg_catalog.text, p.polqual::pg_catalog.text, p.polwithcheck::pg_catalog.text)
      FROM state s JOIN pg_catalog.pg_policy p ON p.polrelid OPERATOR(pg_catalog.=) s.oid
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'inherited by', n.nspname, c.relname)
      FROM state s JOIN pg_catalog.pg_inherits h ON h.inhparent OPERATOR(pg_catalog.=) s.oid
      JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) h.inhrelid
      JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
    UNION ALL
    SELECT pg_catalog.concat_ws(' '::pg_catalog.text, s.relname, 'inherits from', n.nspname, c.relname)
      FROM state s JOIN pg_catalog.pg_inherits h ON h.inhrelid OPERATOR(pg_catalog.=) s.oid
      JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) h.inhparent
      JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace;
END;

-- The definition as the install (or the latest update) left it; only a superuser changes it.
CREATE TABLE chat_backfill.state_recorded (part pg_catalog.text NOT NULL);
GRANT SELECT ON chat_backfill.state_recorded TO PUBLIC;

-- Records the state tables as they are now. A superuser's, after checking them: after a
-- pg_upgrade their stored node trees may read differently, and a backfill whose caller the
-- state's owner cannot act as then refuses until this is run.
CREATE FUNCTION chat_backfill.record_state_definition() RETURNS pg_catalog.int8 LANGUAGE sql VOLATILE
BEGIN ATOMIC
    DELETE FROM chat_backfill.state_recorded;
    INSERT INTO chat_backfill.state_recorded SELECT chat_backfill.state_definition();
    SELECT pg_catalog.count(*) FROM chat_backfill.state_recorded;
END;
REVOKE ALL ON FUNCTION chat_backfill.record_state_definition() FROM PUBLIC;
SELECT chat_backfill.record_state_definition();

-- A role that is not a superuser cannot change them at all: every DDL command of such a role
-- is bracketed, and one that changed the definition away from the record is refused
-- (src/engine/state_guard.rs). ALWAYS: session_replication_role does not turn them off.
CREATE EVENT TRIGGER chat_backfill_state_before ON ddl_command_start
    EXECUTE FUNCTION chat_backfill.state_ddl_start();
CREATE EVENT TRIGGER chat_backfill_state_after ON ddl_command_end
    EXECUTE FUNCTION chat_backfill.state_ddl_end();
ALTER EVENT TRIGGER chat_backfill_state_before ENABLE ALWAYS;
ALTER EVENT TRIGGER chat_backfill_state_after ENABLE ALWAYS;

-- outboxd: what a capture = "wal" source needs besides sql/outbox.sql:
-- the publication of the outbox table's inserts, the outbox_emit()
-- function (a message with no table row), and the replication slot.
--
-- `outboxd migrate` runs this file after sql/outbox.sql for every source
-- with capture = "wal" (with the names from the config). By hand, after
-- sql/outbox.sql, as a role that may create publications and slots:
--
--   psql -d orders -v slot=outboxd_orders -v publication=outboxd_orders -f sql/wal.sql
--   (schema and table default to public and outbox, as in sql/outbox.sql)
--
-- Every statement is idempotent. The slot is created last, outside any
-- transaction (PostgreSQL refuses it in one that has written); it waits
-- for transactions already running to end.

\if :{?schema}
\else
\set schema public
\endif
\if :{?table}
\else
\set table outbox
\endif
\set notify_trigger :table _notify

-- The names travel through settings into the dollar-quoted bodies.
SELECT set_config('outboxd.schema', :'schema', false),
       set_config('outboxd.table', :'table', false),
       set_config('outboxd.publication', :'publication', false),
       set_config('outboxd.notify_trigger', :'notify_trigger', false);

-- The log wakes the relay: producers need not pay for NOTIFY (or for
-- reading its flag). sql/outbox.sql makes the trigger again when a source
-- goes back to capture = "poll" and migrate runs.
DO $do$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %I.%I',
        current_setting('outboxd.notify_trigger'),
        current_setting('outboxd.schema'), current_setting('outboxd.table'));
END
$do$;

-- The outbox table's inserts, nothing else: the relay deletes or marks
-- rows itself, and those changes must not come back to it.
DO $do$
DECLARE
    s text := current_setting('outboxd.schema');
    t text := current_setting('outboxd.table');
    p text := current_setting('outboxd.publication');
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = p) THEN
        EXECUTE format('CREATE PUBLICATION %I FOR TABLE %I.%I WITH (publish = %L)', p, s, t, 'insert');
    END IF;
END
$do$;

-- outbox_emit(): publish an event with no outbox row. A transactional
-- logical message with prefix 'outboxd': it reaches the relay only if
-- the calling transaction commits, in commit order with the table's rows,
-- and becomes the same AMQP message a row would. Without a dedup key the
-- relay derives message_id from the commit's position in the log (the
-- same on every redelivery). Every capture = "wal" source of this
-- database sees these messages. SECURITY DEFINER, so that callers need no
-- right on pg_logical_emit_message (revoked from PUBLIC below where the
-- migrating role may).
DO $do$
BEGIN
    EXECUTE format($fn$
        CREATE OR REPLACE FUNCTION %1$I.outbox_emit(
            aggregate_type text,
            aggregate_id text,
            event_type text,
            payload jsonb,
            headers jsonb DEFAULT '{}',
            dedup_key text DEFAULT NULL
        ) RETURNS pg_lsn
        LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        AS $body$
        BEGIN
            -- Refused loudly: a NULL would make a message the relay must park.
            IF aggregate_type IS NULL OR aggregate_id IS NULL OR event_type IS NULL OR payload IS NULL THEN
                RAISE EXCEPTION 'outbox_emit: aggregate_type, aggregate_id, event_type and payload must not be NULL';
            END IF;
            RETURN pg_logical_emit_message(true, 'outboxd', jsonb_build_object(
                'aggregate_type', aggregate_type,
                'aggregate_id', aggregate_id,
                'event_type', event_type,
                'payload', payload,
                'headers', COALESCE(headers, '{}'::jsonb),
                'dedup_key', dedup_key)::text);
        END
        $body$ $fn$, current_setting('outboxd.schema'));
END
$do$;

-- Anyone who can connect can otherwise put messages into the stream with
-- pg_logical_emit_message() directly and so make the relay publish them.
-- Only a superuser may revoke that (from anyone else REVOKE is a no-op
-- with a warning); `outboxd check` says whether it is still open.
-- (Every overload: PostgreSQL 17 added a flush argument.)
DO $do$
DECLARE
    f regprocedure;
BEGIN
    IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
                 WHERE p.proname = 'pg_logical_emit_message'
                   AND p.pronamespace = 'pg_catalog'::regnamespace LOOP
            EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
        END LOOP;
    ELSE
        RAISE NOTICE 'outboxd: only a superuser may revoke EXECUTE on pg_logical_emit_message from PUBLIC; until one does, any role that can connect can emit outboxd messages';
    END IF;
END
$do$;

-- outboxd: slot
-- The slot, never temporary: it keeps the position between runs.
SELECT pg_create_logical_replication_slot(:'slot', 'pgoutput')
WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = :'slot');

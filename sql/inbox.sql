-- outboxd, the consumer side: an inbox that makes handling a message
-- idempotent, so the duplicates of at-least-once delivery change nothing.
--
-- outboxd sends every committed outbox row at least once. A message can
-- arrive twice: the relay was killed after the broker confirmed it but
-- before the row was removed, or a consumer committed its change and lost
-- its connection before its ack reached the broker. Both copies carry the
-- same AMQP message_id (the outbox row's dedup_key). A consumer that
-- records each message_id in an inbox table, in the same transaction as
-- the change the message causes, makes the change at most once.
--
-- Create the table in the consumer's own database (not the producer's):
--
--   psql -d payments -f sql/inbox.sql
--
-- Every statement is idempotent. The file is plain SQL (no psql variables),
-- so a program can also run it as it is (the shop example does).
--
-- One inbox per consumer of a message: if one database holds two
-- consumers that both get the same message (two queues bound to one
-- event), give each its own inbox table, or key it by (consumer, message_id).

CREATE TABLE IF NOT EXISTS inbox (
    message_id        text        PRIMARY KEY,    -- the AMQP message_id
    message_type      text,                       -- the AMQP type, for people reading the table
    received_at       timestamptz NOT NULL DEFAULT now(),
    -- Redeliveries dropped so far: not needed for correctness, but it
    -- shows that the inbox is doing its job (and how often it has to).
    duplicates        integer     NOT NULL DEFAULT 0,
    last_duplicate_at timestamptz
);

-- Pruning deletes by age.
CREATE INDEX IF NOT EXISTS inbox_received_at_idx ON inbox (received_at);

-- The pattern, for each delivery (a program sends the same statements with
-- parameters; see the README, "Consuming: exactly-once effects"):
--
--   BEGIN;
--   INSERT INTO inbox (message_id, message_type) VALUES ('m-1', 'OrderPlaced')
--       ON CONFLICT (message_id) DO NOTHING;
--   -- "INSERT 0 1": the first delivery. Make the change here, in this
--   --               transaction (and write any outbox rows it causes).
--   -- "INSERT 0 0": a duplicate. Change nothing; optionally count it:
--   --   UPDATE inbox SET duplicates = duplicates + 1, last_duplicate_at = now()
--   --    WHERE message_id = 'm-1';
--   COMMIT;
--   -- Only now ack the message.
--
-- In SQL alone, a data-modifying WITH runs exactly once and tells the
-- change whether the message is new: a second run of this statement with
-- the same message_id updates nothing.
--
--   WITH fresh AS (
--       INSERT INTO inbox (message_id, message_type) VALUES ('m-1', 'OrderPlaced')
--       ON CONFLICT (message_id) DO NOTHING
--       RETURNING message_id
--   )
--   UPDATE accounts SET balance = balance - 1200
--    WHERE customer = 'c-7' AND EXISTS (SELECT 1 FROM fresh);
--
-- Two consumers that get the same message at once are safe too: the second
-- INSERT waits for the first transaction, then inserts nothing if it
-- committed (and inserts, and handles the message, if it rolled back).
--
-- Pruning: an entry must outlive every copy of its message. Keep entries
-- longer than a message can wait in a queue, longer than the relay retries
-- a row (retry_max x max_attempts), and longer than you would replay a
-- dead letter (`outboxd dead-letters replay` resends with the same
-- message_id, possibly days later). Then delete old entries in small
-- batches, as often as you like:
--
--   DELETE FROM inbox WHERE message_id IN (
--       SELECT message_id FROM inbox
--        WHERE received_at < now() - interval '30 days'
--        LIMIT 10000);

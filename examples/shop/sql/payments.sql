-- The payments service's own tables (its outbox comes from `outboxd
-- migrate`, its inbox from sql/inbox.sql).

CREATE TABLE IF NOT EXISTS accounts (
    customer text   PRIMARY KEY,
    opening  bigint NOT NULL,                         -- cents, at setup
    balance  bigint NOT NULL CHECK (balance >= 0)     -- cents
);

-- Every decision about an order's money. There is deliberately no unique
-- key on (order_id, kind): the inbox alone keeps a redelivered OrderPlaced
-- from charging twice, and the shop test checks that it does.
CREATE TABLE IF NOT EXISTS ledger (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id   text        NOT NULL,
    customer   text        NOT NULL,
    kind       text        NOT NULL CHECK (kind IN ('charge', 'decline', 'refund')),
    amount     bigint      NOT NULL,                  -- cents: charged, refunded, or asked for (decline)
    message_id text        NOT NULL,                  -- the message that caused it
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ledger_order_idx ON ledger (order_id);

-- The inventory service's own tables (its outbox comes from `outboxd
-- migrate`, its inbox from sql/inbox.sql).

CREATE TABLE IF NOT EXISTS stock (
    sku       text    PRIMARY KEY,
    initial   integer NOT NULL,                       -- units, at setup
    available integer NOT NULL CHECK (available >= 0)
);

-- Every decision about an order's stock. As in the payments ledger, no
-- unique key on order_id: the inbox is what keeps a redelivery from
-- reserving twice.
CREATE TABLE IF NOT EXISTS reservations (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id   text        NOT NULL,
    sku        text        NOT NULL,
    qty        integer     NOT NULL,
    outcome    text        NOT NULL CHECK (outcome IN ('reserved', 'out_of_stock')),
    message_id text        NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS reservations_order_idx ON reservations (order_id);

-- The orders service's own tables (its outbox comes from `outboxd migrate`,
-- its inbox from sql/inbox.sql).

-- The catalog: orders prices what it sells.
CREATE TABLE IF NOT EXISTS products (
    sku   text   PRIMARY KEY,
    price bigint NOT NULL CHECK (price > 0)          -- cents
);

CREATE SEQUENCE IF NOT EXISTS order_numbers;

CREATE TABLE IF NOT EXISTS orders (
    id         text        PRIMARY KEY,
    customer   text        NOT NULL,
    sku        text        NOT NULL REFERENCES products,
    qty        integer     NOT NULL CHECK (qty > 0),
    amount     bigint      NOT NULL CHECK (amount > 0),   -- cents
    status     text        NOT NULL DEFAULT 'pending'
                           CHECK (status IN ('pending', 'confirmed', 'cancelled')),
    reason     text        CHECK (reason IN ('payment_declined', 'out_of_stock')),
    placed_at  timestamptz NOT NULL DEFAULT now(),
    settled_at timestamptz
);

-- payments' own tables (seed 003): accounts with balances, their top-ups,
-- and one payment per order.

CREATE TABLE accounts (
    account_id  text PRIMARY KEY,
    balance     numeric(15, 2) NOT NULL CHECK (balance >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE top_ups (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  text NOT NULL REFERENCES accounts (account_id),
    amount      numeric(15, 2) NOT NULL CHECK (amount > 0),
    at          timestamptz NOT NULL DEFAULT now()
);

-- One per order, whatever happened: a `refunded` row with amount 0 is a
-- tombstone, so a ChargePayment that arrives after its refund takes nothing.
CREATE TABLE payments (
    order_id    text PRIMARY KEY,
    -- NULL on a tombstone.
    account_id  text REFERENCES accounts (account_id),
    amount      numeric(15, 2) NOT NULL CHECK (amount >= 0),
    state       text NOT NULL CHECK (state IN ('charged', 'failed', 'refunded')),
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_account ON payments (account_id, created_at);

-- The order saga (seeds 001, 003, 004): one row per order that was created
-- with a checkout, and the order's state chain.

CREATE TABLE sagas (
    order_id          text PRIMARY KEY REFERENCES orders (id),
    state             text NOT NULL CHECK (state IN
                          ('pending', 'reserved', 'paid', 'completed', 'compensating', 'cancelled')),
    -- While compensating: what is sent and not confirmed yet.
    awaiting_release  boolean NOT NULL DEFAULT false,
    awaiting_refund   boolean NOT NULL DEFAULT false,
    -- Every transition checks and bumps it.
    version           bigint NOT NULL DEFAULT 1,
    account_id        text NOT NULL,
    amount            numeric(15, 2) NOT NULL CHECK (amount > 0),
    lines             jsonb NOT NULL,
    reason            text,
    -- When the current step's answer is due; NULL once the saga is over.
    deadline_at       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    CHECK ((deadline_at IS NULL) = (state IN ('completed', 'cancelled')))
);

-- The leader's deadline scan.
CREATE INDEX sagas_due ON sagas (deadline_at) WHERE deadline_at IS NOT NULL;

-- Seed 001's state chain. Each step happens at most once per order, so a
-- replayed answer cannot record it twice.
CREATE TABLE order_states (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id         text NOT NULL REFERENCES orders (id),
    step             text NOT NULL,
    -- The message (or deadline) that caused it.
    idempotency_key  text NOT NULL,
    detail           text,
    at               timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (order_id, step)
);

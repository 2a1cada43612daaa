-- What every service database shares with the orders database, so the same
-- relay, inbox and leader election run on it: the outbox (as the orders
-- database has it after its own migrations), its backlog figures, leases,
-- the inbox and idempotency keys.

CREATE TABLE outbox (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id          uuid NOT NULL,
    destination       text NOT NULL,
    aggregatetype     text NOT NULL,
    aggregateid       text NOT NULL,
    type              text NOT NULL,
    version           bigint NOT NULL,
    payload           jsonb NOT NULL,
    state             text NOT NULL DEFAULT 'pending'
                          CHECK (state IN ('pending', 'running', 'done', 'superseded', 'dead')),
    attempts          integer NOT NULL DEFAULT 0,
    run_at            timestamptz NOT NULL DEFAULT now(),
    claimed_by        text,
    claim_expires_at  timestamptz,
    claim_token       uuid,
    in_doubt_until    timestamptz,
    last_error        text,
    traceparent       text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    CHECK ((state = 'running') = (claim_token IS NOT NULL AND claim_expires_at IS NOT NULL))
);
CREATE INDEX outbox_lane ON outbox (aggregateid);
CREATE INDEX outbox_claimable ON outbox (destination, run_at, id) WHERE state = 'pending';
CREATE INDEX outbox_claim_expiry ON outbox (claim_expires_at) WHERE state = 'running';
CREATE INDEX outbox_dead ON outbox (destination, id) WHERE state = 'dead';
CREATE INDEX outbox_finished ON outbox (finished_at) WHERE state IN ('done', 'superseded');

CREATE TABLE outbox_backlog (
    destination        text PRIMARY KEY,
    pending            bigint NOT NULL,
    running            bigint NOT NULL,
    dead               bigint NOT NULL,
    oldest_pending_at  timestamptz,
    refreshed_at       timestamptz NOT NULL
);

CREATE TABLE leader_leases (
    name         text PRIMARY KEY,
    holder       text,
    acquired_at  timestamptz,
    renewed_at   timestamptz,
    expires_at   timestamptz NOT NULL,
    transitions  bigint NOT NULL DEFAULT 0
);

CREATE TABLE inbox (
    consumer     text NOT NULL,
    message_id   text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX inbox_received ON inbox (received_at);

CREATE TABLE idempotency_keys (
    key              text PRIMARY KEY,
    request_hash     bytea NOT NULL,
    response_status  smallint,
    response_body    jsonb,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

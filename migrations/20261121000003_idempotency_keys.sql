-- Responses of `POST /api/v1/orders` by Idempotency-Key, so a retry returns
-- the first result instead of creating a second order.

CREATE TABLE idempotency_keys (
    key              text PRIMARY KEY,
    -- SHA-256 of the canonical request; the same key with another body is refused.
    request_hash     bytea NOT NULL,
    -- Filled in by the same transaction that claims the key, so other
    -- sessions never see them empty.
    response_status  smallint,
    response_body    jsonb,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

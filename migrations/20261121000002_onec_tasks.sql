-- The transactional outbox: one row per order save, written in the saving
-- transaction and delivered to 1C by the relays.

CREATE TABLE onec_tasks (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id          text NOT NULL,
    order_version     bigint NOT NULL,
    -- The OrderFull as committed; 1C receives exactly this.
    snapshot          jsonb NOT NULL,
    state             text NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'running', 'done', 'superseded', 'dead')),
    attempts          int NOT NULL DEFAULT 0,
    -- Earliest time a relay may claim it (backoff).
    run_at            timestamptz NOT NULL DEFAULT now(),
    claimed_by        text,
    claim_expires_at  timestamptz,
    -- Fresh per claim; completion must present it, so a rescued claim's late
    -- worker cannot overwrite a newer outcome.
    claim_token       uuid,
    last_error        text,
    -- W3C trace context of the saving request, restored by the relay.
    traceparent       text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    UNIQUE (order_id, order_version),
    CHECK ((state = 'running') = (claim_token IS NOT NULL AND claim_expires_at IS NOT NULL))
);

-- The claim query reads only due pending rows, oldest first; finished rows
-- never enter this index, so its cost stays flat as the table grows.
CREATE INDEX onec_tasks_claimable ON onec_tasks (run_at, id) WHERE state = 'pending';
-- Per-order lookups on the hot path: "is a version of this order in flight?"
-- and "which pending versions does the newest one supersede?".
CREATE INDEX onec_tasks_active_by_order ON onec_tasks (order_id, order_version)
    WHERE state IN ('pending', 'running');
-- Rescue of claims whose expiry passed.
CREATE INDEX onec_tasks_claim_expiry ON onec_tasks (claim_expires_at) WHERE state = 'running';
-- Dead letters, for listing and replay.
CREATE INDEX onec_tasks_dead ON onec_tasks (id) WHERE state = 'dead';
-- Retention deletes finished rows oldest first, in small batches.
CREATE INDEX onec_tasks_finished ON onec_tasks (finished_at) WHERE state IN ('done', 'superseded');

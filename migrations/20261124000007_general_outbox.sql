-- One outbox for every destination. The 1C task table is renamed in place,
-- so no pending, running or dead task is lost on upgrade: each becomes an
-- event of type `order.version` for the destination `onec`.
--
-- The event columns are Debezium's outbox columns (`aggregatetype`,
-- `aggregateid`, `type`, `payload`, plus an event id), so a team can switch
-- to CDC later without a schema change. The rest is the relay's own state.

ALTER TABLE onec_tasks RENAME TO outbox;
ALTER TABLE outbox RENAME COLUMN order_id TO aggregateid;
ALTER TABLE outbox RENAME COLUMN order_version TO version;
ALTER TABLE outbox RENAME COLUMN snapshot TO payload;
ALTER TABLE outbox RENAME CONSTRAINT onec_tasks_pkey TO outbox_pkey;
ALTER TABLE outbox DROP CONSTRAINT onec_tasks_order_id_order_version_key;

ALTER TABLE outbox
    -- The same event id on every destination's copy of one event; consumers
    -- deduplicate on it. New rows get a time-ordered UUID from the writer.
    ADD COLUMN event_id uuid NOT NULL DEFAULT gen_random_uuid(),
    ADD COLUMN destination text NOT NULL DEFAULT 'onec',
    ADD COLUMN aggregatetype text NOT NULL DEFAULT 'order',
    ADD COLUMN type text NOT NULL DEFAULT 'order.updated';
UPDATE outbox SET type = 'order.created' WHERE version = 1;
-- The defaults only fill the rows moved above; every writer names them.
ALTER TABLE outbox
    ALTER COLUMN event_id DROP DEFAULT,
    ALTER COLUMN destination DROP DEFAULT,
    ALTER COLUMN aggregatetype DROP DEFAULT,
    ALTER COLUMN type DROP DEFAULT;

-- The claim reads a key's lane (all its rows) through this, for both
-- policies. It is kept to the key alone: every claim and completion writes
-- an entry, and a wider (or unique) index made the drain a third slower.
CREATE INDEX outbox_lane ON outbox (aggregateid);

DROP INDEX onec_tasks_claimable;
CREATE INDEX outbox_claimable ON outbox (destination, run_at, id) WHERE state = 'pending';
ALTER INDEX onec_tasks_claim_expiry RENAME TO outbox_claim_expiry;
DROP INDEX onec_tasks_dead;
CREATE INDEX outbox_dead ON outbox (destination, id) WHERE state = 'dead';
ALTER INDEX onec_tasks_finished RENAME TO outbox_finished;
ALTER SEQUENCE onec_tasks_id_seq RENAME TO outbox_id_seq;

-- Backlog figures per destination.
DROP TABLE onec_backlog;
CREATE TABLE outbox_backlog (
    destination        text PRIMARY KEY,
    pending            bigint NOT NULL,
    running            bigint NOT NULL,
    dead               bigint NOT NULL,
    oldest_pending_at  timestamptz,
    refreshed_at       timestamptz NOT NULL
);

-- Leader election without Kubernetes: one row per lease, taken and renewed
-- by conditional upserts (no advisory locks, so it works behind PgBouncer).
CREATE TABLE leader_leases (
    name         text PRIMARY KEY,
    holder       text,
    acquired_at  timestamptz,
    renewed_at   timestamptz,
    expires_at   timestamptz NOT NULL,
    transitions  bigint NOT NULL DEFAULT 0
);

-- Backlog figures, refreshed by the leader relay, so the API and the metrics
-- read one row instead of counting the outbox on every request.
CREATE TABLE onec_backlog (
    id                 boolean PRIMARY KEY DEFAULT true CHECK (id),
    pending            bigint NOT NULL,
    running            bigint NOT NULL,
    dead               bigint NOT NULL,
    oldest_pending_at  timestamptz,
    refreshed_at       timestamptz NOT NULL
);

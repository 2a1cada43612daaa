-- The event-stream log (DESIGN.md, part 3). Event streams (Kafka, RabbitMQ,
-- the PostgreSQL transport) read an insert-only log instead of job rows:
-- - an event is appended once per destination by the saving transaction, to
--   the partition its stream and key hash to (one key stays in one
--   partition), at a position drawn from a sequence, with its transaction id;
-- - each (destination, partition) has a cursor row: `done` is a snapshot
--   whose visible events are all delivered; `window` is the snapshot being
--   worked through, delivered up to `window_position`. A cursor moves from
--   snapshot to snapshot, so it never passes an event whose transaction had
--   not committed (the fence): positions commit out of order, snapshots do
--   not;
-- - space comes back by TRUNCATE of ring segments every cursor has passed,
--   never by UPDATE, DELETE or VACUUM (autovacuum is off on the segments).
CREATE TABLE log_config (
    only_row        boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    -- Fixed once events exist: a key's partition depends on it.
    partitions      smallint NOT NULL CHECK (partitions BETWEEN 1 AND 1024),
    -- Positions per segment; a segment is truncated as a whole.
    segment_size    bigint NOT NULL CHECK (segment_size > 0),
    segments        smallint NOT NULL CHECK (segments BETWEEN 2 AND 64)
);
INSERT INTO log_config (partitions, segment_size, segments) VALUES (16, 1000000, 4);

CREATE SEQUENCE event_log_position AS bigint;

CREATE TABLE event_log (
    position        bigint NOT NULL,
    segment         smallint NOT NULL,
    destination     text NOT NULL,
    partition       smallint NOT NULL,
    xid             xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id        uuid NOT NULL,
    aggregatetype   text NOT NULL,
    aggregateid     text NOT NULL,
    type            text NOT NULL,
    version         bigint NOT NULL,
    payload         jsonb NOT NULL,
    traceparent     text,
    created_at      timestamptz NOT NULL DEFAULT now()
) PARTITION BY LIST (segment);

DO $$
BEGIN
    FOR i IN 0..3 LOOP
        EXECUTE format(
            'CREATE TABLE event_log_%s PARTITION OF event_log FOR VALUES IN (%s)
             WITH (autovacuum_enabled = false, toast.autovacuum_enabled = false)', i, i);
    END LOOP;
END $$;

-- A window's events by transaction id (its floor), then in position order.
CREATE INDEX event_log_by_xid ON event_log (destination, partition, xid);
CREATE INDEX event_log_by_position ON event_log (destination, partition, position);

CREATE TABLE log_cursors (
    destination     text NOT NULL,
    partition       smallint NOT NULL,
    done            pg_snapshot NOT NULL,
    "window"        pg_snapshot,
    window_position bigint NOT NULL DEFAULT 0,
    owner           text,
    delivered_at    timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (destination, partition)
);

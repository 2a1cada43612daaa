-- Log events a destination refused for good (too large, unroutable for
-- good, not authorized): kept whole with the reason, in the transaction that
-- moves the cursor past them, so their partition goes on and they stay
-- replayable (a replay appends them to the log again).
CREATE TABLE log_dead (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination     text NOT NULL,
    partition       smallint NOT NULL,
    position        bigint NOT NULL,
    event_id        uuid NOT NULL,
    aggregatetype   text NOT NULL,
    aggregateid     text NOT NULL,
    type            text NOT NULL,
    version         bigint NOT NULL,
    payload         jsonb NOT NULL,
    traceparent     text,
    class           text NOT NULL,
    reason          text NOT NULL,
    dead_at         timestamptz NOT NULL DEFAULT now(),
    replayed_at     timestamptz,
    UNIQUE (destination, position)
);

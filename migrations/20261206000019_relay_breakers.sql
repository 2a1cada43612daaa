-- Each relay's circuit breaker per destination, reported by the relay
-- itself, so that the leader's OutboxRelay status shows every relay's
-- breaker and not only its own. A row not refreshed for a while is a relay
-- that is gone: the leader ignores it, and the next report of any relay
-- deletes it after an hour.
CREATE TABLE relay_breakers (
    destination text        NOT NULL,
    relay_id    text        NOT NULL,
    state       text        NOT NULL,
    seen_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (destination, relay_id)
);

-- Dead letters a consumer could not put in its broker's dead-letter
-- destination (a Kafka broker refuses a record above its size limit, for
-- example), kept here so the consumer can acknowledge and go on. One row per
-- consumer and place read; the body is kept up to 64 KiB, with its size and
-- digest.
CREATE TABLE dead_letters (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer        text NOT NULL,
    origin          text NOT NULL,
    message_id      text,
    class           text NOT NULL,
    reason          text NOT NULL,
    refused         text NOT NULL,
    key_head        bytea,
    payload_head    bytea NOT NULL,
    payload_size    bigint NOT NULL,
    payload_sha256  bytea NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (consumer, origin)
);

-- Consumers with an inbox: a consumer records each message id here in the
-- transaction that applies the message's effect, so a redelivered message
-- finds its row and changes nothing. A leader job deletes rows older than
-- the dedup window.
CREATE TABLE inbox (
    consumer     text NOT NULL,
    message_id   text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX inbox_received ON inbox (received_at);

-- The order journal: what the `journal` consumer records of every order
-- event it receives, one row per application, in the order applied. A
-- message applied twice would show as two rows with one event id, which is
-- why there is no unique key on it.
CREATE TABLE order_journal (
    seq          bigserial PRIMARY KEY,
    consumer     text NOT NULL,
    event_id     uuid NOT NULL,
    order_id     text NOT NULL,
    version      bigint NOT NULL,
    type         text NOT NULL,
    status       text NOT NULL,
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_journal_order ON order_journal (order_id, seq);

-- Ingestion (`orders-center ingest`): the newest version of each order
-- applied from the broker. A message whose version is not newer than this
-- changes nothing, so a redelivery, or an old version replayed after a
-- newer one, never rolls an order back. (The inbox alone would catch only
-- the exact same message.)
CREATE TABLE ingested_orders (
    order_id     text PRIMARY KEY,
    version      bigint NOT NULL,
    ingested_at  timestamptz NOT NULL DEFAULT now()
);

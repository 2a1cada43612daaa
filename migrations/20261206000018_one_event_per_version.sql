-- One event per order version: `order.updated` carries the status the
-- version before had, when it changed, and the journal records it.
-- Journal rows of `order.status_changed` events from before stay as they
-- are.
ALTER TABLE order_journal ADD COLUMN previous_status text;

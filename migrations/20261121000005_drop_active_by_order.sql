-- The claim reads an order's versions through the (order_id, order_version)
-- key, which it needs anyway for the done floor. This partial index was one
-- more write on every claim and every completion, for no reader.
DROP INDEX onec_tasks_active_by_order;

-- inventory's own tables: stock per product and one reservation per order.

CREATE TABLE products (
    product_id  text PRIMARY KEY,
    -- Units free to reserve.
    available   bigint NOT NULL CHECK (available >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One per order, whatever happened: `refused` and a `released` row with no
-- lines are tombstones, so a ReserveStock that arrives after its release
-- (RabbitMQ does not order one queue against another) holds nothing.
CREATE TABLE reservations (
    order_id    text PRIMARY KEY,
    state       text NOT NULL CHECK (state IN ('reserved', 'committed', 'released', 'refused')),
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE reservation_lines (
    order_id    text NOT NULL REFERENCES reservations (order_id),
    product_id  text NOT NULL REFERENCES products (product_id),
    quantity    bigint NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_id)
);
CREATE INDEX reservation_lines_product ON reservation_lines (product_id);

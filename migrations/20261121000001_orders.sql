-- Orders and their lines, payments and history (seed 000, task 1).
-- Money is NUMERIC(15,2): exact cents; the API validates the same bounds.

CREATE TABLE orders (
    id            text PRIMARY KEY,
    -- Immutable insertion order: the keyset pagination key, so pages stay
    -- stable while orders are inserted or updated.
    seq           bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    type          text NOT NULL,
    status        text NOT NULL,
    city          text NOT NULL,
    subdivision   text NOT NULL,
    price         numeric(15, 2) NOT NULL CHECK (price >= 0),
    platform      text NOT NULL,
    general_id    uuid NOT NULL,
    order_number  text NOT NULL,
    executor      text NOT NULL,
    version       bigint NOT NULL CHECK (version > 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- The list endpoint's filters, each ending in the pagination key.
CREATE INDEX orders_status_seq ON orders (status, seq);
CREATE INDEX orders_city_seq ON orders (city, seq);
CREATE INDEX orders_updated_at ON orders (updated_at);

CREATE TABLE order_items (
    order_id        text NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    position        int NOT NULL,
    product_id      text NOT NULL,
    external_id     text NOT NULL,
    status          text NOT NULL,
    base_price      numeric(15, 2) NOT NULL CHECK (base_price >= 0),
    price           numeric(15, 2) NOT NULL CHECK (price >= 0),
    earned_bonuses  numeric(15, 2) NOT NULL CHECK (earned_bonuses >= 0),
    spent_bonuses   numeric(15, 2) NOT NULL CHECK (spent_bonuses >= 0),
    gift            boolean NOT NULL,
    owner_id        text NOT NULL,
    delivery_id     text NOT NULL,
    shop_assistant  text NOT NULL,
    warehouse       text NOT NULL,
    PRIMARY KEY (order_id, position)
);

CREATE TABLE order_payments (
    order_id           text NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    id                 uuid NOT NULL,
    position           int NOT NULL,
    type               text NOT NULL CHECK (type IN (
                           'cash_at_shop', 'cash_to_courier', 'card', 'card_online',
                           'credit', 'bonuses', 'cashless', 'prepayment')),
    sum                numeric(15, 2) NOT NULL CHECK (sum >= 0),
    payed              boolean NOT NULL,
    info               text NOT NULL,
    credit_data        jsonb,
    contract_number    text NOT NULL,
    card_payment_data  jsonb,
    external_id        text NOT NULL,
    PRIMARY KEY (order_id, id),
    UNIQUE (order_id, position)
);

CREATE TABLE order_history (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id  text NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    type      text NOT NULL CHECK (type IN ('status', 'price')),
    type_id   int NOT NULL,
    old_value jsonb,
    value     jsonb NOT NULL,
    date      timestamptz NOT NULL DEFAULT now(),
    user_id   text NOT NULL,
    version   bigint NOT NULL
);

CREATE INDEX order_history_order ON order_history (order_id, id);

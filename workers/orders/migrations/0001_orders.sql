-- Replica of the catalog's products, built from `catalog.product_added`.
-- Only what placing an order needs: existence and the unit price.
CREATE TABLE products (
    id          TEXT   PRIMARY KEY,
    sku         TEXT   NOT NULL,
    name        TEXT   NOT NULL,
    price_cents BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

-- Replica of identity's users, built from `identity.user_registered`.
CREATE TABLE customers (
    id            TEXT   PRIMARY KEY,
    role          TEXT   NOT NULL,
    registered_at BIGINT NOT NULL
);

-- Orders: pending -> confirmed | rejected; pending | confirmed -> cancelled.
-- A cancellation request keeps the status until the cancel-order saga has
-- given back what the order holds (`cancel_requested_*` set meanwhile).
CREATE TABLE orders (
    id                  TEXT   PRIMARY KEY,
    customer_id         TEXT   NOT NULL,
    status              TEXT   NOT NULL
        CHECK (status IN ('pending', 'confirmed', 'rejected', 'cancelled')),
    total_cents         BIGINT NOT NULL,
    reason              TEXT,
    cancel_requested_by TEXT,
    cancel_requested_at BIGINT,
    created_at          BIGINT NOT NULL,   -- unix microseconds
    updated_at          BIGINT NOT NULL
);

-- A customer's orders, newest first (the list_orders keyset).
CREATE INDEX orders_by_customer ON orders (customer_id, created_at, id);

CREATE TABLE order_lines (
    order_id         TEXT   NOT NULL REFERENCES orders (id),
    position         BIGINT NOT NULL,   -- the line's index in the placed order
    product_id       TEXT   NOT NULL,
    quantity         BIGINT NOT NULL,
    unit_price_cents BIGINT NOT NULL,
    PRIMARY KEY (order_id, product_id)
);

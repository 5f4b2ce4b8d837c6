-- Products. Units available = on_hand - reserved.
CREATE TABLE products (
    id          TEXT   PRIMARY KEY,
    sku         TEXT   NOT NULL UNIQUE,
    name        TEXT   NOT NULL,
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    on_hand     BIGINT NOT NULL CHECK (on_hand >= 0),
    reserved    BIGINT NOT NULL CHECK (reserved >= 0 AND reserved <= on_hand),
    created_at  BIGINT NOT NULL
);

-- One reservation per order: reserved -> committed | released, or rejected.
CREATE TABLE reservations (
    order_id   TEXT   PRIMARY KEY,
    status     TEXT   NOT NULL,
    outcome    TEXT   NOT NULL,   -- JSON of the stock_reserved / stock_rejected payload
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE reservation_lines (
    order_id   TEXT   NOT NULL,
    product_id TEXT   NOT NULL,
    quantity   BIGINT NOT NULL,
    PRIMARY KEY (order_id, product_id)
);

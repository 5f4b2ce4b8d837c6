-- One account per customer, opened from identity's user_registered.
CREATE TABLE accounts (
    customer_id   TEXT   PRIMARY KEY,
    balance_cents BIGINT NOT NULL CHECK (balance_cents >= 0),
    granted_cents BIGINT NOT NULL,
    created_at    BIGINT NOT NULL
);

-- One payment per order: authorized -> refunded, or declined.
CREATE TABLE payments (
    order_id      TEXT   PRIMARY KEY,
    customer_id   TEXT   NOT NULL,
    amount_cents  BIGINT NOT NULL,
    status        TEXT   NOT NULL,
    reason        TEXT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);

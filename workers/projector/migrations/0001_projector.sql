-- Read models, built only from events. Every row is a function of the set of
-- events applied, not of their order or of the clock, so a rebuild from the
-- EVENTS stream reproduces the incremental result exactly.

-- Users, from `identity.user_registered`.
CREATE TABLE users (
    id         TEXT PRIMARY KEY,
    email      TEXT NOT NULL,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL,
    created_at TEXT NOT NULL   -- RFC 3339 ce-time of user_registered
);

-- Orders, from `orders.order_placed|order_confirmed|order_rejected|order_cancelled`,
-- stored by customer whether or not the customer is known yet.
-- The status is a max-register over (status_rank, status_seq): pending 0,
-- confirmed and rejected 1, cancelled 2; an older status never overwrites a
-- newer one, whatever order events are applied in.
CREATE TABLE orders (
    id          TEXT   PRIMARY KEY,
    customer_id TEXT   NOT NULL,
    total_cents BIGINT NOT NULL,   -- from order_placed / order_confirmed; 0 if only rejected
    status      TEXT   NOT NULL
        CHECK (status IN ('pending', 'confirmed', 'rejected', 'cancelled')),
    status_rank BIGINT NOT NULL,
    status_seq  BIGINT NOT NULL,   -- EVENTS stream sequence of the status' event
    placed_at   BIGINT NOT NULL    -- earliest ce-time seen, unix microseconds
);

CREATE INDEX orders_by_customer ON orders (customer_id, placed_at);
CREATE INDEX orders_by_status ON orders (status);

-- Every event about an order, keyed by event id so a replay adds nothing twice.
CREATE TABLE timeline (
    event_id   TEXT   PRIMARY KEY,   -- ce-id
    order_id   TEXT   NOT NULL,
    stream_seq BIGINT NOT NULL,      -- EVENTS stream sequence: the order of the entries
    kind       TEXT   NOT NULL,      -- ce-type
    event_time TEXT   NOT NULL,      -- RFC 3339 ce-time, as published
    event_at   BIGINT NOT NULL       -- ce-time, unix microseconds
);

CREATE INDEX timeline_by_order ON timeline (order_id, stream_seq);

-- The consumers a worker has bound with this database, by worker name and
-- stream: a consumer missing later was lost (deleted, or the server's
-- state was), not never made, and is created again at the messages its
-- inbox still remembers instead of the stream's beginning.
CREATE TABLE IF NOT EXISTS skein_consumers (
    name           TEXT   NOT NULL,
    stream         TEXT   NOT NULL,
    first_bound_at BIGINT NOT NULL,   -- unix microseconds
    PRIMARY KEY (name, stream)
);

-- Outbox: messages committed with the state change that caused them, in
-- commit order (seq), published by the relay and kept for a retention period.
CREATE TABLE IF NOT EXISTS skein_outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,   -- ce-id = Nats-Msg-Id
    subject      TEXT    NOT NULL,
    headers      TEXT    NOT NULL,          -- JSON array of [name, value]
    payload      BLOB    NOT NULL,
    created_at   BIGINT  NOT NULL,          -- unix microseconds
    published_at BIGINT                     -- NULL until the stream acked it
);
CREATE INDEX IF NOT EXISTS skein_outbox_unpublished ON skein_outbox (seq) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS skein_outbox_published ON skein_outbox (published_at) WHERE published_at IS NOT NULL;

-- Inbox: one row per (handler, message id) applied, written in the same
-- transaction as the handler's effects.
CREATE TABLE IF NOT EXISTS skein_inbox (
    handler      TEXT   NOT NULL,
    message_id   TEXT   NOT NULL,
    processed_at BIGINT NOT NULL,
    PRIMARY KEY (handler, message_id)
);
CREATE INDEX IF NOT EXISTS skein_inbox_processed ON skein_inbox (processed_at);

-- Relay lease: on SQLite one relay per database holds this row.
CREATE TABLE IF NOT EXISTS skein_relay_lease (
    name       TEXT   PRIMARY KEY,
    owner      TEXT   NOT NULL,
    expires_at BIGINT NOT NULL
);

-- Wake the relays of every process when messages commit: a statement-level
-- trigger queues the notification inside the inserting statement, so a
-- transaction pays no extra round trip for it. PostgreSQL delivers it on
-- commit only, once per transaction however many statements queued it.
CREATE OR REPLACE FUNCTION skein_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('skein_outbox', '');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS skein_outbox_notify ON skein_outbox;
CREATE TRIGGER skein_outbox_notify AFTER INSERT ON skein_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION skein_outbox_notify();

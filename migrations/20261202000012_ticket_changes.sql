-- WatchTickets: every write to a ticket is announced with its id once the
-- write commits (NOTIFY is transactional, and one transaction's repeats of
-- a payload are sent once), so a watcher re-reads exactly the tickets that
-- changed, whichever replica or path changed them.
CREATE FUNCTION omoi_ticket_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('omoi_ticket_changed', NEW.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER tickets_changed AFTER INSERT OR UPDATE ON tickets
    FOR EACH ROW EXECUTE FUNCTION omoi_ticket_changed();

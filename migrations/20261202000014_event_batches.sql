-- The outbox holds a write's events as one row: a JSON array, in order.
-- A claim of a hundred tasks then writes one outbox row, and the relay
-- deletes one, where each event used to cost a row (and an index entry)
-- written and then deleted. Event ids are made when the events are, so a
-- batch republished after a crash keeps them (JetStream drops the copies).
--
-- `json`, not `jsonb`, and stored uncompressed: the relay reads a batch back
-- once, whole, so neither a binary form nor compression pays for itself.
CREATE TABLE event_batches (
    seq    bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- How many events `events` holds.
    n      integer NOT NULL CHECK (n > 0),
    events json    NOT NULL
);
ALTER TABLE event_batches ALTER COLUMN events SET STORAGE EXTERNAL;

-- Events an earlier version left unpublished move over, in their order.
INSERT INTO event_batches (n, events)
SELECT count(*), json_agg(json_build_object(
           'id', id, 'event_type', event_type, 'entity_type', entity_type,
           'entity_id', entity_id, 'ticket_id', ticket_id, 'payload', payload,
           'occurred_at', occurred_at, 'trace_context', trace_context)
       ORDER BY seq)
FROM event_outbox
HAVING count(*) > 0;

DROP TABLE event_outbox;

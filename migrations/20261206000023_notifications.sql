-- Notifications: addresses subscribed to event types, and each event's
-- delivery to each subscription (written as the events are consumed, then
-- POSTed until the receiver takes it, refuses it, or a day has passed).
CREATE TABLE subscriptions (
    id uuid PRIMARY KEY,
    url text NOT NULL,
    event_types text[] NOT NULL,
    format text NOT NULL CHECK (format IN ('json', 'slack')),
    -- Signs the deliveries; never returned by the API.
    secret text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE deliveries (
    subscription_id uuid NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    event_id uuid NOT NULL,
    -- The event's place in the stream: a ticket's deliveries to one
    -- subscription go out in this order.
    stream_seq bigint NOT NULL,
    event_type text NOT NULL,
    ticket_id uuid,
    -- The event as the API's JSON shows it; the body is made from it.
    event jsonb NOT NULL,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'refused', 'expired')),
    created_at timestamptz NOT NULL DEFAULT now(),
    next_at timestamptz NOT NULL DEFAULT now(),
    -- A sender holds it until then (its try in flight).
    claimed_until timestamptz,
    delivered_at timestamptz,
    -- Each try: {at, status_code, latency_ms, error}.
    attempts jsonb NOT NULL DEFAULT '[]',
    PRIMARY KEY (subscription_id, event_id)
);
CREATE INDEX deliveries_due ON deliveries (next_at) WHERE state = 'pending';
CREATE INDEX deliveries_chain ON deliveries (subscription_id, ticket_id, stream_seq) WHERE state = 'pending';
CREATE INDEX deliveries_listed ON deliveries (subscription_id, created_at DESC, event_id);
CREATE INDEX deliveries_ended ON deliveries (created_at) WHERE state <> 'pending';

-- Decision traces: one row per SMTP transaction, routing and delivery attempt of a message, and per transaction refused before a message was queued (message_id NULL). The
-- calls are JSON text: read whole, never queried inside.
CREATE TABLE traces (
    seq BIGSERIAL PRIMARY KEY,
    message_id TEXT,
    at BIGINT NOT NULL,
    phase TEXT NOT NULL,
    client_ip TEXT NOT NULL,
    sender TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX traces_message ON traces (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX traces_at ON traces (at);

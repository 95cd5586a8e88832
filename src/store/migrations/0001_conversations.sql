-- Conversations that last (docs/conversations.md): threads, and one row per message in the
-- AG-UI message shape. Portable SQL: the same file serves SQLite and PostgreSQL.

CREATE TABLE threads (
    user_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    title TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    -- Turns so far: a user message takes the next one; what its run produced is stored under
    -- the same turn, so a queued message stays after the runs before it.
    turns BIGINT NOT NULL,
    message_count BIGINT NOT NULL,
    -- Bytes of the thread's messages, for `store.max_bytes_per_user`.
    bytes BIGINT NOT NULL,
    -- AG-UI state (STATE_SNAPSHOT / STATE_DELTA), JSON.
    state TEXT,
    -- The run in progress on the thread, if any.
    running TEXT,
    PRIMARY KEY (user_id, thread_id)
);

CREATE INDEX threads_by_update ON threads (user_id, updated_at, thread_id);

CREATE TABLE messages (
    user_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    turn BIGINT NOT NULL,
    -- 0: the user's message; 1..: what the turn's run produced, in order.
    part BIGINT NOT NULL,
    id TEXT NOT NULL,
    -- The AG-UI message: {"id","role","content"}, "toolCalls", "toolCallId".
    body TEXT NOT NULL,
    client_msg_id TEXT,
    run_id TEXT,
    created_at BIGINT NOT NULL,
    -- The stream event that completed the message, once it is known.
    epoch TEXT,
    seq BIGINT,
    run_status TEXT,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (user_id, thread_id, turn, part)
);

CREATE UNIQUE INDEX messages_by_client_msg_id ON messages (user_id, client_msg_id)
    WHERE client_msg_id IS NOT NULL;
CREATE INDEX messages_by_id ON messages (user_id, id);
CREATE INDEX messages_by_run ON messages (user_id, run_id);

-- chatmesh schema v1 (SQLite). Times are Unix milliseconds.
CREATE TABLE users (
    id            TEXT PRIMARY KEY NOT NULL,
    username      TEXT NOT NULL UNIQUE,
    display_name  TEXT NOT NULL,
    status_text   TEXT NOT NULL DEFAULT '',
    avatar_url    TEXT NOT NULL DEFAULT '',
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

CREATE TABLE rooms (
    id           TEXT PRIMARY KEY NOT NULL,
    name         TEXT NOT NULL,
    topic        TEXT NOT NULL DEFAULT '',
    visibility   TEXT NOT NULL CHECK (visibility IN ('public', 'private')),
    owner_id     TEXT NOT NULL REFERENCES users (id),
    home_region  TEXT NOT NULL,
    head_seq     INTEGER NOT NULL DEFAULT 0,
    member_count INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);
CREATE INDEX rooms_public_by_created ON rooms (visibility, created_at DESC);

CREATE TABLE memberships (
    room_id   TEXT NOT NULL REFERENCES rooms (id),
    user_id   TEXT NOT NULL REFERENCES users (id),
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
) WITHOUT ROWID;
CREATE INDEX memberships_by_user ON memberships (user_id, room_id);

CREATE TABLE messages (
    room_id       TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    id            TEXT NOT NULL UNIQUE,
    sender_id     TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    body          TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (room_id, seq)
);
CREATE UNIQUE INDEX messages_dedupe ON messages (room_id, sender_id, client_msg_id);

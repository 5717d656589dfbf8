-- chatmesh schema v1 (PostgreSQL). Times are Unix milliseconds (BIGINT).
-- Keys use the "C" collation: byte order, like SQLite, so `ORDER BY id` agrees across backends.
CREATE TABLE users (
    id            TEXT COLLATE "C" PRIMARY KEY,
    username      TEXT COLLATE "C" NOT NULL UNIQUE,
    display_name  TEXT NOT NULL,
    status_text   TEXT NOT NULL DEFAULT '',
    avatar_url    TEXT NOT NULL DEFAULT '',
    password_hash TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);

CREATE TABLE rooms (
    id           TEXT COLLATE "C" PRIMARY KEY,
    name         TEXT NOT NULL,
    topic        TEXT NOT NULL DEFAULT '',
    visibility   TEXT NOT NULL CHECK (visibility IN ('public', 'private')),
    owner_id     TEXT COLLATE "C" NOT NULL REFERENCES users (id),
    home_region  TEXT NOT NULL,
    head_seq     BIGINT NOT NULL DEFAULT 0,
    member_count BIGINT NOT NULL DEFAULT 0,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE INDEX rooms_public_by_created ON rooms (visibility, created_at DESC, id DESC);

CREATE TABLE memberships (
    room_id   TEXT COLLATE "C" NOT NULL REFERENCES rooms (id),
    user_id   TEXT COLLATE "C" NOT NULL REFERENCES users (id),
    joined_at BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX memberships_by_user ON memberships (user_id, room_id);

CREATE TABLE messages (
    room_id       TEXT COLLATE "C" NOT NULL,
    seq           BIGINT NOT NULL,
    id            TEXT COLLATE "C" NOT NULL UNIQUE,
    sender_id     TEXT COLLATE "C" NOT NULL,
    client_msg_id TEXT COLLATE "C" NOT NULL,
    body          TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (room_id, seq),
    CONSTRAINT messages_dedupe UNIQUE (room_id, sender_id, client_msg_id)
);

-- Region takeover (issue 17): leases with fencing tokens, and per-room fences for message
-- write-back. Operational state: not part of backups.
--
-- A lease row is never deleted (a release or an expiry only moves expires_at), so the token of a
-- name only ever grows: every acquisition writes token + 1 over the row.
CREATE TABLE leases (
    name       TEXT COLLATE "C" PRIMARY KEY,
    holder     TEXT COLLATE "C" NOT NULL,
    token      BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- From from_seq on, the room's messages belong to the epoch of token: a write-back of a message
-- sequenced under a lower token at or above from_seq is refused. One fence per (room, token).
CREATE TABLE room_fences (
    room_id  TEXT COLLATE "C" NOT NULL REFERENCES rooms (id),
    token    BIGINT NOT NULL,
    from_seq BIGINT NOT NULL,
    PRIMARY KEY (room_id, token)
);

-- Users, rooms and follows. Portable SQL: the same text runs on SQLite and
-- PostgreSQL (times are Unix milliseconds in BIGINT, ids are TEXT).

CREATE TABLE users (
    id         TEXT   NOT NULL PRIMARY KEY,
    name       TEXT   NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE rooms (
    id                 TEXT   NOT NULL PRIMARY KEY,
    owner              TEXT   NOT NULL REFERENCES users (id),
    title              TEXT   NOT NULL,
    status             TEXT   NOT NULL CHECK (status IN ('scheduled', 'live', 'ended')),
    scheduled_start_ms BIGINT NULL,
    started_ms         BIGINT NULL,
    ended_ms           BIGINT NULL,
    created_ms         BIGINT NOT NULL,
    updated_ms         BIGINT NOT NULL
);

CREATE INDEX rooms_by_owner ON rooms (owner, id);
CREATE INDEX rooms_by_status ON rooms (status, id);

CREATE TABLE follows (
    follower   TEXT   NOT NULL REFERENCES users (id),
    followee   TEXT   NOT NULL REFERENCES users (id),
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (follower, followee),
    CHECK (follower <> followee)
);

CREATE INDEX follows_by_followee ON follows (followee, follower);

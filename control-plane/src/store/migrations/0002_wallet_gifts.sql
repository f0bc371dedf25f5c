-- Wallets, the double-entry ledger, the gift catalogue, gifts and the gift
-- outbox. Portable SQL: the same text runs on SQLite and PostgreSQL (times
-- are Unix milliseconds in BIGINT, ids are TEXT, amounts are BIGINT in the
-- wallet's smallest unit).

-- One balance per user, plus system accounts (the mint, where grants come
-- from, which may go negative). System ids contain ':' and so can never be
-- a user id. A user's balance can never go below zero, whatever races.
CREATE TABLE accounts (
    id         TEXT   NOT NULL PRIMARY KEY,
    kind       TEXT   NOT NULL CHECK (kind IN ('user', 'system')),
    balance    BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    CHECK (kind = 'system' OR balance >= 0)
);

INSERT INTO accounts (id, kind, balance, created_ms, updated_ms)
VALUES ('system:mint', 'system', 0, 0, 0);

-- Double entry: every transfer writes one row per account it touches, in one
-- transaction, and its rows sum to zero, so the whole ledger always does.
CREATE TABLE ledger (
    transfer_id  TEXT   NOT NULL,
    account      TEXT   NOT NULL REFERENCES accounts (id),
    amount       BIGINT NOT NULL CHECK (amount <> 0),
    kind         TEXT   NOT NULL CHECK (kind IN ('grant', 'gift')),
    counterparty TEXT   NOT NULL,
    created_ms   BIGINT NOT NULL,
    PRIMARY KEY (transfer_id, account)
);

CREATE INDEX ledger_by_account ON ledger (account, created_ms, transfer_id);

-- Grants (deposits by an operator): the mint pays, the user receives. The
-- key makes a retried grant a no-op that answers the first grant.
CREATE TABLE grants (
    id              TEXT   NOT NULL PRIMARY KEY,
    user_id         TEXT   NOT NULL REFERENCES users (id),
    amount          BIGINT NOT NULL CHECK (amount > 0),
    idempotency_key TEXT   NOT NULL UNIQUE,
    balance_after   BIGINT NOT NULL,
    created_ms      BIGINT NOT NULL
);

CREATE TABLE gift_catalogue (
    id    TEXT   NOT NULL PRIMARY KEY,
    name  TEXT   NOT NULL,
    price BIGINT NOT NULL CHECK (price > 0)
);

INSERT INTO gift_catalogue (id, name, price) VALUES
    ('heart', 'Heart', 1),
    ('rose', 'Rose', 10),
    ('cake', 'Cake', 100),
    ('rocket', 'Rocket', 1000);

-- A paid gift. The sender's key makes a retried send a no-op that answers
-- the first send (balance_after included, so the answer is the same).
CREATE TABLE gifts (
    id              TEXT   NOT NULL PRIMARY KEY,
    room            TEXT   NOT NULL REFERENCES rooms (id),
    from_user       TEXT   NOT NULL,
    to_user         TEXT   NOT NULL REFERENCES users (id),
    gift            TEXT   NOT NULL REFERENCES gift_catalogue (id),
    quantity        BIGINT NOT NULL CHECK (quantity > 0),
    amount          BIGINT NOT NULL CHECK (amount > 0),
    idempotency_key TEXT   NOT NULL,
    balance_after   BIGINT NOT NULL,
    created_ms      BIGINT NOT NULL,
    UNIQUE (from_user, idempotency_key),
    CHECK (from_user <> to_user)
);

CREATE INDEX gifts_by_room ON gifts (room, from_user);

-- Gift events waiting for the room bus: written in the gift's transaction,
-- marked published once the broker acknowledged them.
CREATE TABLE outbox (
    id           TEXT   NOT NULL PRIMARY KEY,
    gift_id      TEXT   NOT NULL UNIQUE REFERENCES gifts (id),
    room         TEXT   NOT NULL,
    payload      TEXT   NOT NULL,
    created_ms   BIGINT NOT NULL,
    published_ms BIGINT NULL,
    attempts     BIGINT NOT NULL,
    last_error   TEXT   NULL
);

CREATE INDEX outbox_pending ON outbox (created_ms, id) WHERE published_ms IS NULL;

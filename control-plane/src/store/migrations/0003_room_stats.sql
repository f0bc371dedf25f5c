-- Hot room state persisted in batches (issue 8): like totals per room.
-- Portable SQL: the same text runs on SQLite and PostgreSQL.
--
-- A row says: `likes` likes were counted from the room's bus events up to
-- and including offset `through_offset` of bus epoch `epoch`. Nodes move it
-- forward with a compare-and-set on (epoch, through_offset), so each range
-- of the bus is added exactly once (docs/room-events.md). No foreign key:
-- rooms that the store does not know (the default owner's) have likes too.
CREATE TABLE room_stats (
    room           TEXT   NOT NULL PRIMARY KEY,
    likes          BIGINT NOT NULL CHECK (likes >= 0),
    epoch          BIGINT NOT NULL CHECK (epoch >= 0),
    through_offset BIGINT NOT NULL CHECK (through_offset >= 0),
    updated_ms     BIGINT NOT NULL
);

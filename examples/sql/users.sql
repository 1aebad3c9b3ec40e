-- The users of the README's --auth sql: example (SQLite; the same works in PostgreSQL).
CREATE TABLE users (
    userid TEXT PRIMARY KEY,   -- the login name
    password TEXT,             -- {SCHEME}secret, or a default_pass_scheme secret
    nologin TEXT,              -- not NULL: refused, with reason
    reason TEXT,
    home TEXT,
    mail TEXT                  -- a per-user mail location (NULL: --mail-location)
);
INSERT INTO users VALUES ('alice', '{PLAIN}wonderland', NULL, NULL, NULL, NULL);
INSERT INTO users VALUES ('bob', 'builder', 'Y', 'Your account is suspended', NULL, NULL);

-- Runs once, when the PostgreSQL volume is new: the read-only role Grafana connects with.
-- The schema is created here (owned by tally) so its privileges can be granted before the
-- migrations fill it; `tally migrate` creates it only if it is missing.
CREATE ROLE tally_reader LOGIN PASSWORD 'tally_reader';
CREATE SCHEMA IF NOT EXISTS tally AUTHORIZATION tally;
GRANT CONNECT ON DATABASE tally TO tally_reader;
GRANT USAGE ON SCHEMA tally TO tally_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE tally IN SCHEMA tally GRANT SELECT ON TABLES TO tally_reader;

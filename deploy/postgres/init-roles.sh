#!/usr/bin/env bash
# Runs once, when the PostgreSQL volume is new (docker-entrypoint-initdb.d), as the cluster's
# superuser, which only this script and operators use. It makes:
#   tally         the services' role: owns the database and its schema; no superuser, so no
#                 COPY ... PROGRAM, no reading server files, no other databases' roles;
#   tally_reader  Grafana's role: the migrations grant it SELECT on the dashboard views only.
# Passwords come from the environment (docker-compose.yml requires them), never from this file.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v tally_password="$TALLY_DB_PASSWORD" -v reader_password="$TALLY_READER_PASSWORD" <<'SQL'
CREATE ROLE tally LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'tally_password';
CREATE ROLE tally_reader LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'reader_password';
CREATE DATABASE tally OWNER tally;
REVOKE ALL ON DATABASE tally FROM PUBLIC;
GRANT CONNECT ON DATABASE tally TO tally_reader;
SQL

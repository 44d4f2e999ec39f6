-- conveyour-cdc: removes what the connector and sql/setup.sql left in a
-- database: the replication slot, the publications, the connector's schema
-- (its state and dead-letter tables: they are deleted) and its role. Safe to
-- run again: whatever is already gone is skipped.
--
-- Stop the connector first (e.g. `kubectl scale deployment/... --replicas=0`):
-- an active slot is refused, since dropping it would cut a running stream.
-- Run as a superuser (or your platform's admin role), connected to the
-- database the connector reads:
--
--   psql -X -d appdb -v ON_ERROR_STOP=1 -v role=conveyour_cdc -f sql/teardown.sql
--
-- Variables (psql -v NAME=VALUE), each matching what setup.sql and the
-- connector's config used:
--   role         default conveyour_cdc. Dropped after its remaining objects
--                in this database are reassigned to you and its privileges
--                revoked (REASSIGN OWNED / DROP OWNED). If it still owns
--                objects or holds privileges in another database, DROP ROLE
--                fails and names them: run this file there too.
--   slot         default conveyour_cdc (postgres.slot). Dropped if it exists
--                in this database and is inactive.
--   publication  default conveyour_cdc (postgres.publication). Its
--                insert-only companion `<publication>_inserts` goes too.
--   schema       default conveyour_cdc, the schema the connector keeps its
--                state in. Dropped with everything in it. Another name only
--                removes a schema an earlier setup.sql made with -v schema.
--
-- REPLICA IDENTITY FULL set by setup.sql is left in place: it is harmless
-- beyond some extra WAL, and the table may have had it before. Reset it with
-- ALTER TABLE ... REPLICA IDENTITY DEFAULT if you want.

\set ON_ERROR_STOP on
\set QUIET on
SET client_min_messages = warning;

\if :{?role}
\else
  \set role conveyour_cdc
\endif
\if :{?slot}
\else
  \set slot conveyour_cdc
\endif
\if :{?publication}
\else
  \set publication conveyour_cdc
\endif
\if :{?schema}
\else
  \set schema conveyour_cdc
\endif

-- The slot first, outside any transaction. A slot that still exists keeps
-- WAL on the server forever, so this is the step that matters most.
SELECT EXISTS (SELECT 1 FROM pg_replication_slots
                WHERE slot_name = :'slot' AND active) AS cdc_slot_active
\gset
\if :cdc_slot_active
  SELECT format('DO %L', format('BEGIN RAISE EXCEPTION USING MESSAGE = %L, HINT = %L; END',
                'teardown.sql: replication slot ' || :'slot' || ' is in use (pid '
                  || (SELECT active_pid FROM pg_replication_slots WHERE slot_name = :'slot') || ')',
                'stop the connector first, then run teardown.sql again')) \gexec
\endif
SELECT format('DO %L', format('BEGIN PERFORM pg_drop_replication_slot(%L); END', slot_name))
  FROM pg_replication_slots
 WHERE slot_name = :'slot' AND database = current_database() AND NOT active
\gexec

BEGIN;

SELECT format('DROP PUBLICATION IF EXISTS %I, %I', :'publication', :'publication' || '_inserts')
\gexec
SELECT format('DROP SCHEMA IF EXISTS %I CASCADE', :'schema')
\gexec

-- The role: anything it still owns here becomes yours, its grants go, then
-- the role itself.
SELECT format('REASSIGN OWNED BY %I TO %I', :'role', current_user)
 WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role')
\gexec
SELECT format('DROP OWNED BY %I', :'role')
 WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role')
\gexec
SELECT format('DROP ROLE %I', :'role')
 WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role')
\gexec

COMMIT;

\echo 'conveyour-cdc teardown done: no slot' :'slot' 'publication' :'publication' 'schema' :'schema' 'or role' :'role' 'is left'

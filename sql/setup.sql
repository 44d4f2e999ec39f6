-- conveyour-cdc: prepares a database for the connector, with the least
-- privilege it needs. Safe to run again: every step checks what exists and
-- only adds what is missing (the publication is set to exactly `tables`).
--
-- Run it as a superuser (or your platform's admin role) connected to the
-- database that holds the mapped tables:
--
--   psql -X -d appdb -v ON_ERROR_STOP=1 \
--        -v role=conveyour_cdc -v password='...' \
--        -v tables='public.employees, public.sales' \
--        -v full_identity_tables='public.employees' \
--        -f sql/setup.sql
--
-- Variables (psql -v NAME=VALUE):
--   tables                required. Comma-separated tables the connector reads
--                         (the `tables:` of its config), as `schema.table` or
--                         `table` (search_path). Quote mixed-case names the SQL
--                         way: -v tables='public."Staff"'. Names may not
--                         contain commas.
--   role                  default conveyour_cdc. The login the connector uses.
--                         Created when missing; an existing superuser is
--                         refused (use a dedicated role).
--   password              default: not set, the role's password is left as is
--                         (certificate or external auth, or set it yourself
--                         with psql's \password). When set, the role's
--                         password is set to it; note that the server logs the
--                         statement if log_statement is 'ddl' or 'all'.
--   publication           default conveyour_cdc. Must match the connector's
--                         postgres.publication.
--   full_identity_tables  default empty. Comma-separated tables to switch to
--                         REPLICA IDENTITY FULL, so updates and deletes carry
--                         the whole old row (needed when a mapped column is
--                         not in the primary key, or for TOAST columns).
--   insert_only_tables    default empty. Comma-separated tables, among
--                         `tables`, whose mappings act on inserts only
--                         (operations: [insert]; track tables by default) and
--                         that no lookup reads. Those without a usable replica
--                         identity (no primary key, and not in
--                         full_identity_tables) go through the insert-only
--                         publication `<publication>_inserts` instead, so the
--                         application's UPDATEs and DELETEs on them keep
--                         working; so do those already there.
--
-- The insert-only publication `<publication>_inserts` (publish = 'insert') is
-- created even when empty: the connector's slot can stream a publication only
-- if it existed before the slot's position, so it must predate the slot.
--
-- What the role gets: LOGIN and REPLICATION (to create and stream its
-- logical slot), CONNECT on this database, USAGE on the mapped tables'
-- schemas and SELECT on the mapped tables only (for the initial snapshot),
-- and its own schema, `conveyour_cdc`, where the connector keeps its state
-- and dead letters (the name is fixed: the connector has no setting for
-- another). Nothing else: no writes to the mapped tables, no other
-- tables, no CREATE elsewhere.
--
-- Managed services: where REPLICATION cannot be granted (e.g. Amazon RDS),
-- grant the platform's replication role instead (GRANT rds_replication TO ...)
-- and run the rest as the admin role.

\set ON_ERROR_STOP on
\set QUIET on
SET client_min_messages = warning;

\if :{?role}
\else
  \set role conveyour_cdc
\endif
\if :{?publication}
\else
  \set publication conveyour_cdc
\endif
-- The connector's own schema: always this name.
\set cdc_schema conveyour_cdc
\if :{?schema}
  SELECT :'schema' <> :'cdc_schema' AS cdc_other_schema
  \gset
  \if :cdc_other_schema
    SELECT format('DO %L', format('BEGIN RAISE EXCEPTION USING MESSAGE = %L, HINT = %L; END',
                  'setup.sql: schema ' || :'schema' || ' cannot be used: the connector keeps its state in the schema conveyour_cdc and has no setting for another',
                  'leave out -v schema')) \gexec
  \endif
\endif
\if :{?full_identity_tables}
\else
  \set full_identity_tables ''
\endif
\if :{?insert_only_tables}
\else
  \set insert_only_tables ''
\endif
\if :{?tables}
\else
  DO $$ BEGIN RAISE EXCEPTION USING
    MESSAGE = 'setup.sql: no tables given',
    HINT = 'pass the mapped tables: psql -v tables=''public.employees, public.sales'' -f sql/setup.sql';
  END $$;
\endif

-- Resolve the table lists now, so a typo fails before anything changes.
-- The names are re-quoted from the catalog, so they are safe to splice in.
SELECT coalesce(string_agg(format('%I.%I', n.nspname, c.relname), ', ' ORDER BY n.nspname, c.relname), '') AS cdc_table_list,
       count(*) AS cdc_table_count
  FROM (SELECT DISTINCT trim(t)::regclass AS rel
          FROM unnest(string_to_array(:'tables', ',')) AS t
         WHERE trim(t) <> '') AS wanted
  JOIN pg_class c ON c.oid = wanted.rel
  JOIN pg_namespace n ON n.oid = c.relnamespace
\gset
SELECT coalesce(string_agg(format('%I.%I', n.nspname, c.relname), ', '), '') AS cdc_full_identity_list
  FROM (SELECT DISTINCT trim(t)::regclass AS rel
          FROM unnest(string_to_array(:'full_identity_tables', ',')) AS t
         WHERE trim(t) <> '') AS wanted
  JOIN pg_class c ON c.oid = wanted.rel
  JOIN pg_namespace n ON n.oid = c.relnamespace
\gset

SELECT coalesce(string_agg(format('%I.%I', n.nspname, c.relname), ', '), '') AS cdc_insert_only_list,
       coalesce(bool_or(format('%I.%I', n.nspname, c.relname) <> ALL (string_to_array(:'cdc_table_list', ', '))), false)
         AS cdc_insert_only_stray
  FROM (SELECT DISTINCT trim(t)::regclass AS rel
          FROM unnest(string_to_array(:'insert_only_tables', ',')) AS t
         WHERE trim(t) <> '') AS wanted
  JOIN pg_class c ON c.oid = wanted.rel
  JOIN pg_namespace n ON n.oid = c.relnamespace
\gset
\if :cdc_insert_only_stray
  DO $$ BEGIN RAISE EXCEPTION 'setup.sql: insert_only_tables names a table that tables does not'; END $$;
\endif

SELECT :cdc_table_count = 0 AS cdc_no_tables,
       coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = :'role'), false) AS cdc_role_is_superuser
\gset
\if :cdc_no_tables
  DO $$ BEGIN RAISE EXCEPTION 'setup.sql: the tables variable names no table'; END $$;
\endif
-- A partitioned table: Postgres judges each partition's own replica
-- identity when the application writes to it (REPLICA IDENTITY on the
-- parent does not reach them), and sends changes under the partitions'
-- names, which the connector does not map: refused, nothing changed.
SELECT coalesce(string_agg(t, ', '), '') AS cdc_partitioned, count(*) > 0 AS cdc_has_partitioned
  FROM unnest(string_to_array(:'cdc_table_list', ', ')) AS t
  JOIN pg_class c ON c.oid = t::regclass
 WHERE c.relkind = 'p'
\gset
\if :cdc_has_partitioned
  SELECT format('DO %L', format('BEGIN RAISE EXCEPTION USING MESSAGE = %L, HINT = %L; END',
                'setup.sql: ' || :'cdc_partitioned' || ' is a partitioned table, which the connector does not publish',
                'list (and map) each partition as a table of its own')) \gexec
\endif
\if :cdc_role_is_superuser
  SELECT format('DO %L', format('BEGIN RAISE EXCEPTION USING MESSAGE = %L, HINT = %L; END',
                'setup.sql: role ' || :'role' || ' is a superuser',
                'give the connector a dedicated role: -v role=conveyour_cdc')) \gexec
\endif

BEGIN;

-- The role: created when missing, then given exactly the attributes it needs.
SELECT format('CREATE ROLE %I LOGIN REPLICATION', :'role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role')
\gexec
SELECT format('ALTER ROLE %I LOGIN REPLICATION NOCREATEDB NOCREATEROLE NOBYPASSRLS', :'role')
\gexec
\if :{?password}
  SELECT format('ALTER ROLE %I PASSWORD %L', :'role', :'password')
  \gexec
\endif
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'role')
\gexec

-- Its own schema, owned by it: the connector keeps its state there.
SELECT format('CREATE SCHEMA %I AUTHORIZATION %I', :'cdc_schema', :'role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = :'cdc_schema')
\gexec
SELECT format('ALTER SCHEMA %I OWNER TO %I', :'cdc_schema', :'role')
  FROM pg_namespace
 WHERE nspname = :'cdc_schema' AND nspowner <> (SELECT oid FROM pg_roles WHERE rolname = :'role')
\gexec
SELECT format('GRANT USAGE, CREATE ON SCHEMA %I TO %I', :'cdc_schema', :'role')
\gexec

-- Read access to the mapped tables, and nothing more.
SELECT DISTINCT format('GRANT USAGE ON SCHEMA %I TO %I', n.nspname, :'role')
  FROM unnest(string_to_array(:'cdc_table_list', ', ')) AS t
  JOIN pg_class c ON c.oid = t::regclass
  JOIN pg_namespace n ON n.oid = c.relnamespace
\gexec
SELECT format('GRANT SELECT ON TABLE %s TO %I', :'cdc_table_list', :'role')
\gexec
-- Tables dropped from the list since the last run are no longer readable.
SELECT format('REVOKE SELECT ON TABLE %I.%I FROM %I', n.nspname, c.relname, :'role')
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  CROSS JOIN LATERAL aclexplode(c.relacl) AS a
 WHERE a.grantee = (SELECT oid FROM pg_roles WHERE rolname = :'role')
   AND a.privilege_type = 'SELECT'
   AND n.nspname <> :'cdc_schema'
   AND format('%I.%I', n.nspname, c.relname) <> ALL (string_to_array(:'cdc_table_list', ', '))
\gexec

-- Full old rows in the WAL for the tables that need them (before the
-- publications: a table with a full identity needs no insert-only one).
SELECT format('ALTER TABLE %s REPLICA IDENTITY FULL', t)
  FROM unnest(string_to_array(:'cdc_full_identity_list', ', ')) AS t
  JOIN pg_class c ON c.oid = t::regclass
 WHERE c.relreplident <> 'f'
\gexec

-- Which publication each table goes through, as the connector decides it:
-- an insert-only table without a usable replica identity (or already in the
-- insert-only publication) goes through `<publication>_inserts`, every other
-- table through the main one.
SELECT :'publication' || '_inserts' AS cdc_inserts_publication
\gset
SELECT coalesce(string_agg(t, ', ' ORDER BY t) FILTER (WHERE NOT to_inserts), '') AS cdc_main_list,
       coalesce(string_agg(t, ', ' ORDER BY t) FILTER (WHERE to_inserts), '') AS cdc_inserts_list,
       coalesce(string_agg(t, ', ' ORDER BY t) FILTER (WHERE NOT to_inserts AND NOT usable), '') AS cdc_unpublishable,
       coalesce(bool_or(NOT to_inserts AND NOT usable), false) AS cdc_has_unpublishable
  FROM (SELECT t, usable,
               t = ANY (string_to_array(:'cdc_insert_only_list', ', '))
               AND (NOT usable
                    OR EXISTS (SELECT 1 FROM pg_publication_tables pt
                                WHERE pt.pubname = :'cdc_inserts_publication'
                                  AND format('%I.%I', pt.schemaname, pt.tablename) = t)) AS to_inserts
          FROM (SELECT t, c.relreplident = 'f'
                          OR EXISTS (SELECT 1 FROM pg_index i
                                      WHERE i.indrelid = c.oid
                                        -- a deferrable key is none to Postgres
                                        AND i.indimmediate AND i.indisvalid
                                        AND CASE c.relreplident WHEN 'd' THEN i.indisprimary
                                                                WHEN 'i' THEN i.indisreplident
                                                                ELSE false END) AS usable
                  FROM unnest(string_to_array(:'cdc_table_list', ', ')) AS t
                  JOIN pg_class c ON c.oid = t::regclass) AS identities) AS placed
\gset
-- Published with their updates, these would make Postgres refuse every
-- UPDATE and DELETE the application makes on them: refused, nothing changed.
\if :cdc_has_unpublishable
  SELECT format('DO %L', format('BEGIN RAISE EXCEPTION USING MESSAGE = %L, HINT = %L; END',
                'setup.sql: ' || :'cdc_unpublishable' || ' has no primary key or replica identity, so publishing its updates and deletes would make Postgres refuse them',
                'add a primary key, or list it in full_identity_tables (REPLICA IDENTITY FULL), or in insert_only_tables if its mapping acts on inserts only')) \gexec
\endif

-- The publications: created when missing, else set to exactly these tables
-- (the insert-only one even when it has none, so it predates the slot).
SELECT format('CREATE PUBLICATION %I%s', :'publication',
              CASE WHEN :'cdc_main_list' <> '' THEN ' FOR TABLE ' || :'cdc_main_list' ELSE '' END)
 WHERE NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = :'publication')
\gexec
SELECT format('CREATE PUBLICATION %I%s WITH (publish = %L)', :'cdc_inserts_publication',
              CASE WHEN :'cdc_inserts_list' <> '' THEN ' FOR TABLE ' || :'cdc_inserts_list' ELSE '' END,
              'insert')
 WHERE NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = :'cdc_inserts_publication')
\gexec
SELECT format('ALTER PUBLICATION %I SET (publish = %L)', :'cdc_inserts_publication', 'insert')
  FROM pg_publication
 WHERE pubname = :'cdc_inserts_publication' AND (pubupdate OR pubdelete OR pubtruncate OR NOT pubinsert)
\gexec
-- Each set to exactly its tables, in this one transaction: no table is ever
-- in both (its updates would be published) or in neither.
SELECT CASE WHEN wanted <> ''
            THEN format('ALTER PUBLICATION %I SET TABLE %s', pubname, wanted)
            ELSE (SELECT string_agg(format('ALTER PUBLICATION %I DROP TABLE %I.%I', pubname, schemaname, tablename), '; ')
                    FROM pg_publication_tables pt WHERE pt.pubname = p.pubname) END
  FROM (SELECT p.pubname, p.puballtables,
               CASE p.pubname WHEN :'publication' THEN :'cdc_main_list' ELSE :'cdc_inserts_list' END AS wanted,
               (SELECT coalesce(string_agg(format('%I.%I', schemaname, tablename), ', '
                                           ORDER BY format('%I.%I', schemaname, tablename)), '')
                  FROM pg_publication_tables pt WHERE pt.pubname = p.pubname) AS held
          FROM pg_publication p
         WHERE p.pubname IN (:'publication', :'cdc_inserts_publication')) AS p
 WHERE NOT p.puballtables AND p.held <> p.wanted
\gexec

COMMIT;

\echo 'conveyour-cdc setup done: role' :'role' 'reads' :'cdc_table_list' 'through publication' :'publication' 'and' :'cdc_inserts_publication' '(inserts only:' :'cdc_inserts_list' ')'

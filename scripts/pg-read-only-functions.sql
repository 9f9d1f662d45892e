-- The built-in functions the SQL classifier takes as read-only without a list entry of its own
-- (agent/src/policy/builtin/pg15_read_only_functions.txt): every name in pg_catalog all of whose
-- overloads PostgreSQL declares IMMUTABLE or STABLE (which promises no database writes), less
-- the names that run SQL given as text or read a relation's rows by name (*_to_xml*), validators
-- (which may load a function's library), domain input (runs a domain's CHECK expressions) and
-- the two stable functions that assign a transaction id, and the row sources of the monitoring
-- and configuration views (pg_stat_get_*, pg_show_all_settings, pg_get_replication_slots,
-- pg_config): reading pg_stat_activity or pg_settings is a read of a pg_catalog relation that
-- object rules judge, and calling the function behind it must not get around them. The
-- classifier's own list of side-effecting names (sql_functions.rs) is checked before this one.
-- Run against a fresh PostgreSQL 15 cluster: psql -XAt -f scripts/pg-read-only-functions.sql
SELECT proname
FROM pg_proc
WHERE pronamespace = 'pg_catalog'::regnamespace AND prokind <> 'p'
GROUP BY proname
HAVING bool_and(provolatile IN ('i', 's'))
   AND proname !~ '(to_xml|xmlschema|validator)'
   AND proname !~ '^pg_stat_get_'
   AND proname NOT IN ('domain_in', 'domain_recv', 'txid_current', 'pg_current_xact_id',
                       'pg_show_all_settings', 'pg_get_replication_slots', 'pg_config')
ORDER BY proname COLLATE "C";

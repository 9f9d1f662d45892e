-- The relations of pg_catalog (agent/src/policy/builtin/pg15_catalog_relations.txt): an unqualified
-- name among them resolves to pg_catalog, which the server searches before the search path.
-- Run against a fresh PostgreSQL 15 cluster: psql -XAt -f scripts/pg-catalog-relations.sql
SELECT relname
FROM pg_class
WHERE relnamespace = 'pg_catalog'::regnamespace AND relkind IN ('r', 'v', 'm', 'p', 'f', 'S')
ORDER BY relname COLLATE "C";

//! What a function call does, by name.
//!
//! Fail closed: a call makes a statement no more than "read" only when the function is on the
//! allow-list of built-ins known to have no side effects. Anything not listed (a user-defined
//! function, an extension's function, a built-in we have not vetted) is `unknown`, because a
//! function can write, sleep, call out or change the role, and `SELECT f()` looks like a read.
//! Functions that run SQL given as text (`query_to_xml`) are deliberately not listed.
//!
//! Two lists: [`READ_ONLY`], vetted by hand (it may name volatile built-ins without side
//! effects), and the PostgreSQL 15 catalog's own word (`builtin/pg15_read_only_functions.txt`):
//! the names all of whose overloads are declared IMMUTABLE or STABLE, which PostgreSQL defines as
//! unable to modify the database, less the exceptions `scripts/pg-read-only-functions.sql`
//! names. The side-effecting names below are checked before the catalog list.

use std::sync::LazyLock;

use super::sql_class::SqlClass;

/// The catalog list, one name a line, `#` comments; sorted (a test checks).
const CATALOG_TEXT: &str = include_str!("builtin/pg15_read_only_functions.txt");

static CATALOG_READ_ONLY: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    CATALOG_TEXT
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
});

/// What calling `name` (lowercase, without a `pg_catalog.` prefix) adds to a statement.
/// `None`: read-only built-in. `Some(Unknown)`: not known.
pub(super) fn function_effect(name: &str) -> Option<SqlClass> {
    if READ_ONLY.binary_search(&name).is_ok() {
        return None;
    }
    if name.starts_with("dblink") {
        return Some(SqlClass::Network);
    }
    if name.starts_with("pg_advisory") || name.starts_with("pg_try_advisory") {
        return Some(SqlClass::Lock);
    }
    let class = match name {
        "nextval" | "setval" => SqlClass::Sequence,
        "pg_notify" => SqlClass::Notify,
        "pg_read_file"
        | "pg_read_binary_file"
        | "pg_ls_dir"
        | "pg_stat_file"
        | "pg_ls_logdir"
        | "pg_ls_waldir"
        | "pg_ls_tmpdir"
        | "pg_ls_archive_statusdir"
        | "pg_ls_logicalsnapdir"
        | "pg_ls_logicalmapdir"
        | "pg_ls_replslotdir"
        | "lo_import"
        | "lo_export"
        | "pg_file_write"
        | "pg_file_unlink"
        | "pg_file_rename"
        | "pg_file_sync"
        | "pg_logdir_ls" => SqlClass::FileAccess,
        "pg_terminate_backend"
        | "pg_cancel_backend"
        | "pg_reload_conf"
        | "pg_rotate_logfile"
        | "pg_switch_wal"
        | "pg_create_restore_point"
        | "pg_promote"
        | "pg_wal_replay_pause"
        | "pg_wal_replay_resume"
        | "pg_backup_start"
        | "pg_backup_stop"
        | "pg_start_backup"
        | "pg_stop_backup"
        | "pg_create_physical_replication_slot"
        | "pg_create_logical_replication_slot"
        | "pg_drop_replication_slot"
        | "pg_copy_physical_replication_slot"
        | "pg_copy_logical_replication_slot"
        | "pg_replication_origin_create"
        | "pg_replication_origin_drop"
        | "pg_stat_reset"
        | "pg_stat_reset_shared"
        | "pg_stat_reset_single_table_counters"
        | "pg_stat_reset_single_function_counters"
        | "pg_stat_reset_slru"
        | "pg_stat_reset_replication_slot"
        | "pg_stat_statements_reset"
        | "pg_log_backend_memory_contexts"
        | "pg_import_system_collations"
        | "lo_unlink"
        | "lo_create"
        | "lo_creat"
        | "lo_put"
        | "lo_from_bytea"
        | "lo_truncate"
        | "pg_logical_emit_message"
        | "pg_sleep"
        | "pg_sleep_for"
        | "pg_sleep_until"
        | "txid_current"
        | "pg_current_xact_id" => SqlClass::AdminFunction,
        _ if CATALOG_READ_ONLY.binary_search(&name).is_ok() => return None,
        _ => SqlClass::Unknown,
    };
    Some(class)
}

/// Built-ins with no side effects beyond reading, sorted for binary search (a test checks).
/// The SQL/XML constructs (`XMLELEMENT`, `XMLPI`, ...) are syntax the parser reads as calls; the
/// server's grammar never lets a function of that name be called unquoted.
/// Special forms such as `CAST`, `EXTRACT`, `SUBSTRING ... FROM` are not calls in the parser's
/// tree and need no entry; `CURRENT_TIMESTAMP` and friends are, and are listed.
const READ_ONLY: &[&str] = &[
    "abs",
    "acos",
    "age",
    "array_agg",
    "array_append",
    "array_cat",
    "array_dims",
    "array_length",
    "array_lower",
    "array_position",
    "array_positions",
    "array_prepend",
    "array_remove",
    "array_replace",
    "array_to_json",
    "array_to_string",
    "array_upper",
    "ascii",
    "asin",
    "atan",
    "atan2",
    "avg",
    "bit_and",
    "bit_length",
    "bit_or",
    "bool_and",
    "bool_or",
    "btrim",
    "cardinality",
    "cbrt",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "chr",
    "clock_timestamp",
    "coalesce",
    "col_description",
    "concat",
    "concat_ws",
    "convert_from",
    "convert_to",
    "corr",
    "cos",
    "count",
    "covar_pop",
    "covar_samp",
    "cume_dist",
    "current_catalog",
    "current_database",
    "current_date",
    "current_role",
    "current_schema",
    "current_schemas",
    "current_setting",
    "current_time",
    "current_timestamp",
    "current_user",
    "currval",
    "date_bin",
    "date_part",
    "date_trunc",
    "decode",
    "degrees",
    "dense_rank",
    "div",
    "encode",
    "every",
    "exp",
    "first_value",
    "floor",
    "format",
    "format_type",
    "gen_random_uuid",
    "generate_series",
    "generate_subscripts",
    "greatest",
    "has_column_privilege",
    "has_database_privilege",
    "has_function_privilege",
    "has_schema_privilege",
    "has_sequence_privilege",
    "has_table_privilege",
    "hashtext",
    "initcap",
    "isfinite",
    "json_agg",
    "json_array_elements",
    "json_array_elements_text",
    "json_array_length",
    "json_build_array",
    "json_build_object",
    "json_each",
    "json_each_text",
    "json_extract_path",
    "json_extract_path_text",
    "json_object",
    "json_object_agg",
    "json_object_keys",
    "json_populate_record",
    "json_strip_nulls",
    "json_typeof",
    "jsonb_agg",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "jsonb_array_length",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_each",
    "jsonb_each_text",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "jsonb_insert",
    "jsonb_object",
    "jsonb_object_agg",
    "jsonb_object_keys",
    "jsonb_path_exists",
    "jsonb_path_query",
    "jsonb_path_query_array",
    "jsonb_path_query_first",
    "jsonb_pretty",
    "jsonb_set",
    "jsonb_strip_nulls",
    "jsonb_typeof",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "lag",
    "last_value",
    "lastval",
    "lead",
    "least",
    "left",
    "length",
    "ln",
    "localtime",
    "localtimestamp",
    "log",
    "log10",
    "lower",
    "lpad",
    "ltrim",
    "make_date",
    "make_interval",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "max",
    "md5",
    "min",
    "mod",
    "mode",
    "now",
    "nth_value",
    "ntile",
    "nullif",
    "num_nonnulls",
    "num_nulls",
    "obj_description",
    "octet_length",
    "overlay",
    "percent_rank",
    "percentile_cont",
    "percentile_disc",
    "pg_backend_pid",
    "pg_column_size",
    "pg_database_size",
    "pg_get_constraintdef",
    "pg_get_expr",
    "pg_get_indexdef",
    "pg_get_userbyid",
    "pg_get_viewdef",
    "pg_indexes_size",
    "pg_is_in_recovery",
    "pg_partition_ancestors",
    "pg_partition_tree",
    "pg_postmaster_start_time",
    "pg_relation_size",
    "pg_size_pretty",
    "pg_table_is_visible",
    "pg_table_size",
    "pg_tablespace_size",
    "pg_total_relation_size",
    "pg_typeof",
    "pi",
    "position",
    "power",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "radians",
    "random",
    "rank",
    "regexp_count",
    "regexp_instr",
    "regexp_like",
    "regexp_match",
    "regexp_matches",
    "regexp_replace",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "regexp_substr",
    "regr_slope",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "row_number",
    "row_to_json",
    "rpad",
    "rtrim",
    "session_user",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "sign",
    "sin",
    "split_part",
    "sqrt",
    "starts_with",
    "statement_timestamp",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "string_agg",
    "string_to_array",
    "strpos",
    "substr",
    "substring",
    "sum",
    "tan",
    "timeofday",
    "to_char",
    "to_date",
    "to_hex",
    "to_json",
    "to_jsonb",
    "to_number",
    "to_timestamp",
    "transaction_timestamp",
    "translate",
    "trim",
    "trunc",
    "unnest",
    "upper",
    "user",
    "uuid_generate_v4",
    "var_pop",
    "var_samp",
    "variance",
    "version",
    "width_bucket",
    "xmlconcat",
    "xmlelement",
    "xmlforest",
    "xmlpi",
    "xmlroot",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_is_sorted_and_has_no_side_effecting_names() {
        assert!(
            READ_ONLY.windows(2).all(|w| w[0] < w[1]),
            "READ_ONLY must be sorted and unique"
        );
        for name in [
            "query_to_xml",
            "pg_read_file",
            "set_config",
            "nextval",
            "dblink",
            "pg_sleep",
        ] {
            assert!(
                READ_ONLY.binary_search(&name).is_err(),
                "{name} must not be read-only"
            );
        }
    }

    #[test]
    fn the_catalog_list_is_sorted_and_leaves_out_what_writes() {
        assert!(
            CATALOG_READ_ONLY.len() > 2000,
            "{}",
            CATALOG_READ_ONLY.len()
        );
        assert!(
            CATALOG_READ_ONLY.windows(2).all(|w| w[0] < w[1]),
            "the catalog list must be sorted (bytewise) and unique"
        );
        for name in [
            "query_to_xml",
            "table_to_xml",
            "cursor_to_xml",
            "ts_rewrite",
            "ts_stat",
            "txid_current",
            "pg_current_xact_id",
            "set_config",
            "nextval",
            "currval",
            "pg_sleep",
            "pg_read_file",
            "lo_import",
            "fmgr_c_validator",
            "domain_in",
            "pg_stat_get_activity",
            "pg_stat_get_backend_activity",
            "pg_show_all_settings",
            "pg_get_replication_slots",
            "pg_config",
        ] {
            assert!(
                CATALOG_READ_ONLY.binary_search(&name).is_err(),
                "{name} must not be in the catalog list"
            );
        }
        // The side-effecting names win over the catalog list.
        assert_eq!(
            function_effect("txid_current"),
            Some(SqlClass::AdminFunction)
        );
        assert_eq!(function_effect("int4range"), None);
        assert_eq!(function_effect("jsonb_populate_record"), None);
        assert_eq!(function_effect("Int4range"), Some(SqlClass::Unknown));
    }

    #[test]
    fn effects_by_name() {
        assert_eq!(function_effect("count"), None);
        assert_eq!(function_effect("dblink_exec"), Some(SqlClass::Network));
        assert_eq!(
            function_effect("pg_advisory_xact_lock"),
            Some(SqlClass::Lock)
        );
        assert_eq!(function_effect("lo_export"), Some(SqlClass::FileAccess));
        assert_eq!(
            function_effect("pg_terminate_backend"),
            Some(SqlClass::AdminFunction)
        );
        assert_eq!(function_effect("my_func"), Some(SqlClass::Unknown));
    }
}

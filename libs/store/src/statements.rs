//! Every statement of the store, registered where it is written: `sql!`
//! gives a statement's text to its query and adds it, with its place, to
//! one list. A test prepares every statement of the list against a freshly
//! migrated database, so that a typo or a renamed column fails in seconds,
//! naming the statement's file and line, instead of when some path first
//! runs it; another reads the store's sources to make sure no query is
//! written past the list. Statements built at run time (the claim's, one
//! per head size; the put-back's, one per filter) register the function
//! that builds them all.

/// A statement written in the store's code (its place is read by the check
/// only).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct Statement {
    pub sql: &'static str,
    pub file: &'static str,
    pub line: u32,
}

#[linkme::distributed_slice]
pub(crate) static STATEMENTS: [Statement];

/// Builders of the statements made at run time, with their place.
#[linkme::distributed_slice]
pub(crate) static BUILT: [(fn() -> Vec<String>, &'static str)];

/// A statement made at run time by a builder registered with
/// `built_statements!`, as a query takes it.
pub(crate) fn built(sql: &str) -> sqlx::AssertSqlSafe<&str> {
    sqlx::AssertSqlSafe(sql)
}

/// A statement's text, registered for the check (see the module).
macro_rules! sql {
    ($text:expr) => {{
        #[linkme::distributed_slice($crate::statements::STATEMENTS)]
        static STATEMENT: $crate::statements::Statement = $crate::statements::Statement {
            sql: $text,
            file: file!(),
            line: line!(),
        };
        STATEMENT.sql
    }};
}
pub(crate) use sql;

/// Registers `build` (a `fn() -> Vec<String>`) as making statements at run
/// time.
macro_rules! built_statements {
    ($name:ident, $build:expr) => {
        #[linkme::distributed_slice($crate::statements::BUILT)]
        static $name: (fn() -> Vec<String>, &'static str) = ($build, concat!(file!(), ":", line!()));
    };
}
pub(crate) use built_statements;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use sqlx::{Connection, Executor, PgConnection, SqlSafeStr};

    use super::*;

    fn admin_url() -> String {
        std::env::var("OMOI_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
    }

    #[tokio::test]
    async fn every_statement_prepares_against_the_migrated_schema() {
        let name = format!("omoi_statements_{}", uuid::Uuid::new_v4().simple());
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin).await.unwrap();
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        let url = format!("{}/{name}", admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b));
        let store = crate::Store::connect_lazy(&url, 2).unwrap();
        store.migrate().await.unwrap();
        let mut db = store.pool().acquire().await.unwrap();
        let mut checked = 0;
        let mut failed = Vec::new();
        for s in STATEMENTS {
            checked += 1;
            if let Err(e) = (&mut *db).prepare(s.sql.into_sql_str()).await {
                failed.push(format!("{}:{}: {e}", s.file, s.line));
            }
        }
        for (build, place) in BUILT {
            for sql in build() {
                checked += 1;
                if let Err(e) = (&mut *db).prepare(sqlx::AssertSqlSafe(sql).into_sql_str()).await {
                    failed.push(format!("{place} (built): {e}"));
                }
            }
        }
        drop(db);
        store.close().await;
        conn.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
            .await
            .unwrap();
        assert!(checked > 90, "only {checked} statements registered");
        assert!(
            failed.is_empty(),
            "statements the schema refuses:\n{}",
            failed.join("\n")
        );
    }

    /// The calls that run SQL, each of which must take a registered text.
    const CALLS: [&str; 4] = [
        "sqlx::query(",
        "sqlx::query_as(",
        "sqlx::query_scalar(",
        "sqlx::query_as::<",
    ];

    #[test]
    fn no_query_is_written_past_the_list() {
        let mut unlisted = Vec::new();
        let mut seen = 0;
        visit(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut |path, text| {
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            // A file querying built statements registers their builder.
            if code.contains("(built(") && !code.contains("built_statements!(") {
                unlisted.push(format!(
                    "{}: built statements without built_statements!",
                    path.display()
                ));
            }
            for call in CALLS {
                for (at, _) in code.match_indices(call) {
                    seen += 1;
                    let open = at + code[at..].find('(').unwrap_or(0) + 1;
                    let argument = code[open..].trim_start();
                    if !(argument.starts_with("sql!(") || argument.starts_with("built(")) {
                        let line = code[..at].lines().count();
                        unlisted.push(format!("{}:{line}", path.display()));
                    }
                }
            }
        });
        assert!(seen > 80, "the scan found only {seen} queries");
        assert!(
            unlisted.is_empty(),
            "queries whose text is not registered (write it as sql!(...), or build it in a registered builder):\n{}",
            unlisted.join("\n")
        );
    }

    fn visit(dir: &Path, each: &mut impl FnMut(&Path, &str)) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                visit(&path, each);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("statements.rs") {
                each(&path, &std::fs::read_to_string(&path).unwrap());
            }
        }
    }
}

//! A Rust driver (tokio-postgres) as a governed client: binary parameters and results, a
//! prepared statement run many times, a transaction, and a denied statement. Prints one JSON
//! line; run by `tests/postgres.rs` inside the governed cgroup.
//!
//! `bh-pg-client HOST query SQL...` instead runs each SQL (prepared, then executed with binary
//! results, as tokio-postgres does) and prints its rows as JSON arrays of text values.

use tokio_postgres::NoTls;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let host = std::env::args().nth(1).ok_or("usage: bh-pg-client HOST")?;
    // No password: the gateway authenticates the client by its kernel identity.
    let (client, connection) =
        tokio_postgres::connect(&format!("host={host} user=admin dbname=postgres"), NoTls).await?;
    tokio::spawn(connection);

    let args: Vec<String> = std::env::args().skip(2).collect();
    if args.first().map(String::as_str) == Some("query") {
        let mut results = Vec::new();
        for sql in &args[1..] {
            let rows = client.query(sql.as_str(), &[]).await?;
            let rows: Vec<Vec<Option<String>>> = rows
                .iter()
                .map(|r| (0..r.len()).map(|i| text_of(r, i)).collect())
                .collect();
            results.push(rows);
        }
        println!("{}", serde_json::json!(results));
        return Ok(());
    }

    let row = client
        .query_one(
            "SELECT $1::int8 + 1, $2::text, $3::bytea, $4::float8",
            &[&41i64, &"binary", &vec![0u8, 1, 255], &1.5f64],
        )
        .await?;
    let (n, s, b, f): (i64, String, Vec<u8>, f64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));

    let stmt = client.prepare("SELECT $1::int4 * 2").await?;
    let mut sum = 0i64;
    for i in 0..100i32 {
        let v: i32 = client.query_one(&stmt, &[&i]).await?.get(0);
        sum += i64::from(v);
    }

    let denied = match client.batch_execute("CREATE TABLE nope (x int)").await {
        Ok(()) => serde_json::Value::Null,
        Err(e) => {
            let db = e.as_db_error().ok_or("not a database error")?;
            serde_json::json!({ "code": db.code().code(), "message": db.message() })
        }
    };
    // The session goes on after the denial.
    let after: String = client.query_one("SELECT 'still usable'", &[]).await?.get(0);

    println!(
        "{}",
        serde_json::json!({ "n": n, "s": s, "b": b, "f": f, "sum": sum, "denied": denied, "after": after })
    );
    Ok(())
}

/// A value as text: strings as they are, integers printed, anything else by its type name.
fn text_of(row: &tokio_postgres::Row, i: usize) -> Option<String> {
    if let Ok(v) = row.try_get::<_, Option<String>>(i) {
        return v;
    }
    if let Ok(v) = row.try_get::<_, Option<i32>>(i) {
        return v.map(|v| v.to_string());
    }
    Some(format!("<{}>", row.columns()[i].type_().name()))
}

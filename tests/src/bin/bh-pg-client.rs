//! A Rust driver (tokio-postgres) as a governed client: binary parameters and results, a
//! prepared statement run many times, a transaction, and a denied statement. Prints one JSON
//! line; run by `tests/postgres.rs` inside the governed cgroup.

use tokio_postgres::NoTls;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let host = std::env::args().nth(1).ok_or("usage: bh-pg-client HOST")?;
    // No password: the gateway authenticates the client by its kernel identity.
    let (client, connection) =
        tokio_postgres::connect(&format!("host={host} user=admin dbname=postgres"), NoTls).await?;
    tokio::spawn(connection);

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

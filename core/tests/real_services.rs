//! The integration tier against the real Apache Kafka and Apache Cassandra that `dev/services`
//! starts on 127.0.0.1 (`make test` starts them and runs these with `--include-ignored`). Each
//! test fails, never passes, when its service is down.

// A test: a failed unwrap is a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{config, subscribe_runners, unique, wait_until, Recorder};
use prosody_core::client::Client;

const KAFKA: &str = "127.0.0.1:9092";
const CASSANDRA: &str = "127.0.0.1:9042";

/// Messages sent through the client reach the runners from a real broker, every key in order,
/// with headers intact, and never two events of a key at once.
#[test]
#[ignore = "needs Kafka on 127.0.0.1:9092: dev/services start kafka"]
fn kafka_round_trip_with_order_and_headers() {
    let topic = unique("it-rust");
    let group = unique("group");
    prosody_core::testing::create_topic(KAFKA, &topic, 4, Duration::from_secs(30))
        .expect("Kafka must run on 127.0.0.1:9092 (dev/services start kafka)");
    let client = Client::new(config(&topic, &group, 8, Some(KAFKA))).unwrap();
    let rt = prosody_core::runtime::handle().unwrap();
    let (keys, per_key) = (20, 20);
    let headers = vec![("trace".to_owned(), b"t-1".to_vec())];
    for i in 0..per_key {
        for k in 0..keys {
            let payload = serde_json::json!({ "seq": i }).to_string();
            rt.block_on(client.send(&common::record(
                &topic,
                format!("k{k}").as_bytes(),
                payload.as_bytes(),
                &headers,
            )))
            .unwrap();
        }
    }
    let rec = Recorder::new();
    let scheduler = subscribe_runners(&client, 8, rec.clone());
    let total = (keys * per_key) as usize;
    assert!(
        wait_until(Duration::from_secs(60), || rec.seen.lock().unwrap().len()
            >= total),
        "handled {} of {total}",
        rec.seen.lock().unwrap().len()
    );
    client.unsubscribe().expect("unsubscribe");
    scheduler.close();
    let by_key = rec.seqs_by_key();
    assert_eq!(by_key.len(), keys as usize);
    for (key, seqs) in by_key {
        assert_eq!(seqs, (0..per_key).collect::<Vec<u64>>(), "order of {key:?}");
    }
    assert_eq!(rec.overlap.load(Ordering::SeqCst), 0);
}

/// The scylla driver talks to the local Cassandra: keyspace, table, writes with a TTL, reads.
/// The timer and retry stores build on this session set-up.
#[test]
#[ignore = "needs Cassandra on 127.0.0.1:9042: dev/services start cassandra"]
fn cassandra_smoke_keyspace_table_ttl() {
    use scylla::client::session_builder::SessionBuilder;

    let rt = prosody_core::runtime::handle().unwrap();
    rt.block_on(async {
        let session = SessionBuilder::new()
            .known_node(CASSANDRA)
            .connection_timeout(Duration::from_secs(10))
            .build()
            .await
            .expect("Cassandra must run on 127.0.0.1:9042 (dev/services start cassandra)");
        let keyspace = unique("smoke").replace('-', "_");
        session
            .query_unpaged(
                format!(
                    "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = \
                     {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
                ),
                &[],
            )
            .await
            .unwrap();
        session
            .query_unpaged(
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.items \
                     (key text, at bigint, note text, PRIMARY KEY (key, at))"
                ),
                &[],
            )
            .await
            .unwrap();
        for at in 0..10_i64 {
            session
                .query_unpaged(
                    format!("INSERT INTO {keyspace}.items (key, at, note) VALUES (?, ?, ?) USING TTL 3600"),
                    ("k1", at, format!("note-{at}")),
                )
                .await
                .unwrap();
        }
        let rows = session
            .query_unpaged(
                format!("SELECT at, note, TTL(note) FROM {keyspace}.items WHERE key = ?"),
                ("k1",),
            )
            .await
            .unwrap()
            .into_rows_result()
            .unwrap();
        let rows: Vec<(i64, String, Option<i32>)> = rows
            .rows::<(i64, String, Option<i32>)>()
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(rows.len(), 10);
        for (i, (at, note, ttl)) in rows.iter().enumerate() {
            assert_eq!(*at, i as i64, "clustering order");
            assert_eq!(note, &format!("note-{i}"));
            let ttl = ttl.expect("a TTL was written");
            assert!(ttl > 3500 && ttl <= 3600, "ttl {ttl}");
        }
        session
            .query_unpaged(format!("DROP KEYSPACE {keyspace}"), &[])
            .await
            .unwrap();
    });
}

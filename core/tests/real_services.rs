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

/// Deferred messages that the log no longer holds (deleted by retention here, with the admin
/// API's DeleteRecords) are dead-lettered as their key with no value (reason `unreadable`) and
/// skipped; the key's later deferred messages still run, in order, and the store ends empty.
#[test]
#[ignore = "needs Kafka and Cassandra: dev/services start all"]
fn deferred_messages_gone_from_the_log_are_dead_lettered_and_skipped() {
    use prosody_core::config::RawValue;
    use prosody_core::defer::{now_ms, Retry};
    use prosody_core::timers::Scope;
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    use std::sync::Arc;

    let topic = unique("it-gone");
    let dlq = unique("it-gone-dlq");
    let group = unique("group");
    let keyspace = unique("prosody_it").replace('-', "_");
    for t in [&topic, &dlq] {
        prosody_core::testing::create_topic(KAFKA, t, 1, Duration::from_secs(30))
            .expect("Kafka must run on 127.0.0.1:9092 (dev/services start kafka)");
    }
    let rt = prosody_core::runtime::handle().unwrap();
    let producer = prosody_core::testing::RawProducer::new(KAFKA).unwrap();
    for seq in 0..20 {
        let payload = format!("{{\"seq\":{seq}}}");
        producer
            .produce(&topic, Some(0), Some(b"k"), Some(payload.as_bytes()), &[])
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let config = common::config_with(
        &topic,
        &group,
        8,
        Some(KAFKA),
        &[
            ("cassandra_nodes", RawValue::Str(CASSANDRA.into())),
            ("cassandra_keyspace", RawValue::Str(keyspace)),
            ("failure_topic", RawValue::Str(dlq.clone())),
        ],
    );
    // The key deferred at offset 0 with every later offset appended, due now, and the group's
    // position past all of them, as a client that deferred them would leave it.
    let stores = rt
        .block_on(prosody_core::stores::Stores::cassandra(&config))
        .expect("Cassandra must run on 127.0.0.1:9042 (dev/services start cassandra)");
    let scope = Scope {
        group: Arc::from(group.as_str()),
        topic: Arc::from(topic.as_str()),
        partition: 0,
    };
    rt.block_on(async {
        let retry = Retry {
            attempts: 1,
            due_ms: now_ms(),
        };
        stores.defer.defer(&scope, b"k", 0, retry).await.unwrap();
        for offset in 1..20 {
            stores.defer.append(&scope, b"k", offset).await.unwrap();
        }
    });
    prosody_core::testing::commit_position(KAFKA, &group, &topic, 0, 20).unwrap();
    // Retention takes offsets 0..9.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .create()
        .unwrap();
    let mut before = TopicPartitionList::new();
    before
        .add_partition_offset(&topic, 0, Offset::Offset(10))
        .unwrap();
    rt.block_on(admin.delete_records(&before, &AdminOptions::new()))
        .unwrap();

    let client = Client::new(config).unwrap();
    let rec = Recorder::new();
    let scheduler = subscribe_runners(&client, 8, rec.clone());
    assert!(
        wait_until(Duration::from_secs(60), || rec.seen.lock().unwrap().len()
            >= 10),
        "handled {} of the 10 deferred messages still in the log",
        rec.seen.lock().unwrap().len()
    );
    let dead = prosody_core::testing::read_topic(KAFKA, &dlq, 10, Duration::from_secs(30)).unwrap();
    client.unsubscribe().expect("unsubscribe");
    scheduler.close();
    let offsets = rec.offsets();
    assert_eq!(offsets, (10..20).collect::<Vec<i64>>());
    assert_eq!(dead.len(), 10);
    for record in &dead {
        assert_eq!(record.key.as_deref(), Some(b"k".as_slice()));
        assert_eq!(record.payload, None);
        let reason = record
            .headers
            .iter()
            .find(|(k, _)| k == "prosody-dlq-reason")
            .map(|(_, v)| v.as_slice());
        assert_eq!(reason, Some(b"unreadable".as_slice()));
    }
    let left = rt.block_on(stores.defer.load(&scope)).unwrap();
    assert!(left.is_empty(), "the key left deferral: {left:?}");
}

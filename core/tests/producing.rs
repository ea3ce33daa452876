//! The producer path on the mock cluster: a batch is queued in order and waited for once, a
//! failed record does not stop the others, and an explicit partition is honoured.

// A test: a failed unwrap is a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{config, record, unique};
use prosody_core::client::Client;
use prosody_core::kafka::producer::Record;

fn client() -> (Client, String) {
    let topic = unique("produce");
    let client = Client::new(config(&topic, &unique("group"), 8, None)).unwrap();
    (client, topic)
}

#[test]
fn a_batch_is_written_in_order_and_one_failure_does_not_stop_the_others() {
    let (client, topic) = client();
    let rt = prosody_core::runtime::handle().unwrap();
    let mut records: Vec<Record> = (0..100)
        .map(|i| record(&topic, b"k", format!("{{\"seq\":{i}}}").as_bytes(), &[]))
        .collect();
    records[40].partition = Some(1000); // no such partition
    let results =
        rt.block_on(client.send_batch(&records.iter().map(Record::as_raw).collect::<Vec<_>>()));
    assert_eq!(results.len(), 100);
    let failure = results[40].as_ref().unwrap_err();
    assert_eq!(failure.topic, topic);
    assert_eq!(failure.key, "\"k\"");
    assert!(
        failure.reason.contains("Unknown partition"),
        "{}",
        failure.reason
    );
    let delivered: Vec<_> = results
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 40)
        .map(|(_, r)| *r.as_ref().unwrap())
        .collect();
    assert_eq!(delivered.len(), 99);
    // One key, one partition: the offsets follow the order of the batch.
    assert!(delivered
        .iter()
        .all(|d| d.partition == delivered[0].partition));
    assert!(delivered.windows(2).all(|w| w[1].offset == w[0].offset + 1));
}

#[test]
fn an_explicit_partition_is_written_and_a_tombstone_has_no_value() {
    let (client, topic) = client();
    let rt = prosody_core::runtime::handle().unwrap();
    for partition in [0, 1] {
        let mut r = record(&topic, b"same-key", b"{}", &[]);
        r.partition = Some(partition);
        assert_eq!(rt.block_on(client.send(&r)).unwrap().partition, partition);
    }
    let tombstone = Record {
        payload: None,
        ..record(&topic, b"same-key", b"", &[])
    };
    rt.block_on(client.send(&tombstone)).unwrap();
}

#[test]
fn a_send_to_an_unreachable_broker_fails_after_send_timeout_naming_the_record() {
    let topic = unique("unreachable");
    let mut cfg = config(&topic, &unique("group"), 8, Some("127.0.0.9:2"));
    cfg.send_timeout = std::time::Duration::from_millis(300);
    let client = Client::new(cfg).unwrap();
    let rt = prosody_core::runtime::handle().unwrap();
    let records = [
        record(&topic, b"a", b"1", &[]),
        record(&topic, b"b", b"2", &[]),
    ];
    let results =
        rt.block_on(client.send_batch(&records.iter().map(Record::as_raw).collect::<Vec<_>>()));
    for (result, key) in results.iter().zip(["\"a\"", "\"b\""]) {
        let e = result.as_ref().unwrap_err();
        assert_eq!(e.key, key);
        assert!(e.reason.contains("send_timeout"), "{}", e.reason);
    }
}

//! Failure handling end to end on the mock cluster, in each mode: how many times a failing
//! handler runs, what reaches the failure topic, and that other keys keep flowing.

// A test: a failed unwrap is a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config_with, unique, wait_until};
use prosody_core::client::Client;
use prosody_core::config::RawValue;
use prosody_core::event::Event;
use prosody_core::handler::{Failure, Outcome};
use prosody_core::scheduler::Take;

/// Calls per key; keys starting with `fail-` fail transiently, `perm-` permanently.
type Calls = Arc<Mutex<HashMap<String, usize>>>;

fn run(mode: &str, keys: &[&str]) -> (Calls, String, Client) {
    let topic = unique("fail");
    let dlq = unique("dlq");
    let config = config_with(
        &topic,
        &unique("group"),
        8,
        None,
        &[
            ("mode", RawValue::Str(mode.into())),
            ("failure_topic", RawValue::Str(dlq.clone())),
            ("max_retries", RawValue::Int(2)),
            ("retry_base", RawValue::Float(0.005)),
            ("max_retry_delay", RawValue::Float(0.02)),
            ("defer_base", RawValue::Float(0.005)),
            ("defer_max_delay", RawValue::Float(0.02)),
        ],
    );
    let client = Client::new(config).unwrap();
    let calls: Calls = Arc::default();
    let scheduler = client.subscribe(|| {}).unwrap();
    let rt = prosody_core::runtime::handle().unwrap();
    {
        let (scheduler, calls) = (scheduler.clone(), calls.clone());
        rt.spawn(async move {
            loop {
                match scheduler.take() {
                    Take::Job(job, grant) => {
                        let (event, _cancel, _timers, done) = job.into_parts();
                        let Event::Message(m) = event else { continue };
                        let key = String::from_utf8_lossy(m.key.as_deref().unwrap_or_default())
                            .into_owned();
                        *calls.lock().unwrap().entry(key.clone()).or_default() += 1;
                        grant.release();
                        done.complete(if key.starts_with("fail-") {
                            Outcome::Failure(Failure::transient("Flaky", "down"))
                        } else if key.starts_with("perm-") {
                            Outcome::Failure(Failure::permanent("Bad", "bad data"))
                        } else {
                            Outcome::Success
                        });
                    }
                    Take::Empty => tokio::time::sleep(Duration::from_millis(1)).await,
                    Take::Closed => return,
                }
            }
        });
    }
    for key in keys {
        rt.block_on(client.send(&common::record(&topic, key.as_bytes(), b"{\"n\":1}", &[])))
            .unwrap();
    }
    (calls, dlq, client)
}

fn count(calls: &Calls, key: &str) -> usize {
    calls.lock().unwrap().get(key).copied().unwrap_or(0)
}

/// Reads up to `n` dead letters, waiting at most `wait`.
fn dead_letters(dlq: &str, n: usize, wait: Duration) -> Vec<prosody_core::testing::RawRecord> {
    let bootstrap = prosody_core::kafka::mock::shared()
        .unwrap()
        .bootstrap_servers()
        .to_owned();
    prosody_core::testing::read_topic(&bootstrap, dlq, n, wait).unwrap()
}

fn header<'a>(record: &'a prosody_core::testing::RawRecord, name: &str) -> Option<&'a str> {
    record
        .headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
}

#[test]
fn low_latency_tries_max_retries_plus_one_times_then_dead_letters() {
    let (calls, dlq, client) = run("low_latency", &["fail-a", "perm-b", "ok-c"]);
    let records = dead_letters(&dlq, 2, Duration::from_secs(10));
    assert_eq!(records.len(), 2);
    assert_eq!(count(&calls, "fail-a"), 3, "first attempt + max_retries 2");
    assert_eq!(count(&calls, "perm-b"), 1, "permanent: never retried");
    assert_eq!(count(&calls, "ok-c"), 1);
    let by_key: HashMap<&[u8], &prosody_core::testing::RawRecord> = records
        .iter()
        .map(|r| (r.key.as_deref().unwrap(), r))
        .collect();
    let a = by_key[b"fail-a".as_slice()];
    assert_eq!(header(a, "prosody-dlq-reason"), Some("retries_exhausted"));
    assert_eq!(header(a, "prosody-dlq-attempts"), Some("3"));
    assert_eq!(a.payload.as_deref(), Some(b"{\"n\":1}".as_slice()));
    let b = by_key[b"perm-b".as_slice()];
    assert_eq!(header(b, "prosody-dlq-reason"), Some("permanent"));
    assert_eq!(header(b, "prosody-dlq-error-class"), Some("Bad"));
    client.unsubscribe().expect("unsubscribe");
}

#[test]
fn pipeline_retries_transient_failures_until_stopped_and_never_dead_letters_them() {
    let (calls, dlq, client) = run("pipeline", &["fail-a", "perm-b", "ok-c"]);
    assert!(wait_until(Duration::from_secs(10), || count(
        &calls, "fail-a"
    ) >= 10));
    // Wait for the permanent failure's record, then a little longer for any other.
    assert_eq!(dead_letters(&dlq, 1, Duration::from_secs(10)).len(), 1);
    let records = dead_letters(&dlq, 2, Duration::from_millis(500));
    assert_eq!(
        records.len(),
        1,
        "only the permanent failure is dead-lettered"
    );
    assert_eq!(records[0].key.as_deref(), Some(b"perm-b".as_slice()));
    assert_eq!(count(&calls, "perm-b"), 1);
    assert_eq!(count(&calls, "ok-c"), 1);
    client.unsubscribe().expect("unsubscribe");
}

#[test]
fn best_effort_runs_each_failure_once_and_dead_letters_nothing() {
    let (calls, dlq, client) = run("best_effort", &["fail-a", "perm-b", "ok-c"]);
    assert!(wait_until(Duration::from_secs(10), || {
        count(&calls, "fail-a") + count(&calls, "perm-b") + count(&calls, "ok-c") == 3
    }));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(count(&calls, "fail-a"), 1);
    assert_eq!(count(&calls, "perm-b"), 1);
    assert!(dead_letters(&dlq, 1, Duration::from_millis(500)).is_empty());
    client.unsubscribe().expect("unsubscribe");
}

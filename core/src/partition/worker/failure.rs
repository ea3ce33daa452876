//! What the worker does with a failed event: the mode's failure policy (retry in place after a
//! backoff, dead-letter, give up), and records whose payload cannot be decoded.

use std::sync::Arc;

use rdkafka::message::OwnedMessage;

use super::{Internal, Key, Pending, Stage, Worker};
use crate::cancel::CancelToken;
use crate::event::show_key;
use crate::failure::deadletter::{dead_letter_headers, DeadLetters};
use crate::failure::{Decision, Reason};
use crate::handler::{Failure, Slot};
use crate::telemetry::{Detail, Kind};

/// Error class reported for a payload that is not JSON.
pub(super) const UNDECODABLE: &str = "Prosody::UndecodablePayload";

impl Worker {
    /// The [`Policy`](crate::failure::Policy) stage: retry in place, dead-letter or give up.
    pub(super) async fn apply_policy(&mut self, id: (Key, Slot), failure: Failure) {
        let what = self.describe(&id);
        let Some(flight) = self.in_flight.get_mut(&id) else {
            return;
        };
        let attempts = flight.attempts;
        let decision = self.engine.policy.decide(&failure, attempts);
        match decision {
            Decision::Retry(delay) => {
                flight.stage = Stage::Waiting;
                let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                crate::spans::event(&flight.span, "retry", || {
                    vec![opentelemetry::KeyValue::new(
                        "prosody.retry.delay_ms",
                        i64::try_from(delay_ms).unwrap_or(i64::MAX),
                    )]
                });
                if !matches!(flight.event, Pending::Timer(..)) {
                    let kinds = (Kind::MessageRetried, Kind::MessageRetried);
                    let detail = Detail::Retry {
                        attempt: attempts,
                        delay_ms,
                    };
                    self.tell_flight(kinds, &id, detail);
                }
                tracing::warn!(
                    "{what} failed (attempt {attempts}, {failure}); retrying in {delay:?}"
                );
                let internal = self.internal.clone();
                let abort = self.abort.clone();
                let (key, slot) = id;
                self.engine.runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    if !abort.is_cancelled() {
                        let _ = internal.send(Internal::RetryDue(key, slot));
                    }
                });
            }
            Decision::DeadLetter(reason) => {
                // Timers have no record to dead-letter: they are given up instead.
                let raw = match &flight.event {
                    Pending::Message(message) | Pending::Deferred(message) => message.raw.clone(),
                    Pending::Timer(..) => None,
                };
                let (Some(raw), Some(dead_letters)) = (raw, self.engine.dead_letters.clone())
                else {
                    self.give_up(id, &what, &failure, attempts).await;
                    return;
                };
                tracing::error!(
                    "{what} failed (attempt {attempts}, {failure}); sending it to {} ({})",
                    dead_letters.topic,
                    reason.as_str()
                );
                flight.stage = Stage::DeadLettering;
                crate::spans::event(&flight.span, "dead letter", || {
                    vec![
                        opentelemetry::KeyValue::new(
                            "messaging.destination.name",
                            dead_letters.topic.clone(),
                        ),
                        opentelemetry::KeyValue::new("prosody.reason", reason.as_str()),
                        opentelemetry::KeyValue::new("error.type", failure.error_class.clone()),
                    ]
                });
                let trace = flight.span.clone();
                let detail = Detail::DeadLetter {
                    failure_topic: Arc::from(dead_letters.topic.as_str()),
                    reason: reason.as_str(),
                };
                let kinds = (Kind::MessageDeadLettered, Kind::MessageDeadLettered);
                self.tell_flight(kinds, &id, detail);
                let (key, slot) = id;
                self.spawn_dead_letter(
                    dead_letters,
                    raw,
                    (reason, &failure, attempts),
                    &trace,
                    Internal::DeadLettered(key, slot),
                );
            }
            Decision::GiveUp => self.give_up(id, &what, &failure, attempts).await,
        }
    }

    /// Logs the failure of `what` and lets the event go (commits its offset, deletes its timer).
    pub(super) async fn give_up(
        &mut self,
        id: (Key, Slot),
        what: &str,
        failure: &Failure,
        attempts: u32,
    ) {
        tracing::error!(
            "{what} failed (attempt {attempts}, {failure}); giving up on it and moving on"
        );
        if let Some(flight) = self.in_flight.get(&id) {
            crate::spans::event(&flight.span, "give up", Vec::new);
            crate::spans::finish_as(&flight.span, "failure");
        }
        self.succeeded(id).await;
    }

    pub(super) fn describe(&self, id: &(Key, Slot)) -> String {
        match id.1 {
            Slot::Offset(offset) => format!(
                "message topic={} partition={} offset={offset} key={}",
                self.topic,
                self.partition,
                show_key(id.0.as_deref())
            ),
            Slot::Timer(time) => format!(
                "timer topic={} partition={} key={} time={time}",
                self.topic,
                self.partition,
                show_key(id.0.as_deref())
            ),
        }
    }

    /// Sends `raw` to the failure topic, retrying with backoff until it is acknowledged (the
    /// record is never dropped); reports `done` to this worker once sent. Stops when the
    /// partition is released (the offset then stays uncommitted).
    /// The dead-letter record carries `trace` (the failed event's span) as its trace context.
    pub(super) fn spawn_dead_letter(
        &self,
        dead_letters: Arc<DeadLetters>,
        raw: OwnedMessage,
        (reason, failure, attempts): (Reason, &Failure, u32),
        trace: &opentelemetry::Context,
        done: Internal,
    ) {
        let mut headers = dead_letter_headers(&raw, &dead_letters.group, reason, failure, attempts);
        crate::spans::inject(trace, &mut headers);
        let internal = self.internal.clone();
        let abort = self.abort.clone();
        let policy = self.engine.policy.clone();
        self.engine.runtime.spawn(async move {
            let mut tries = 0u32;
            loop {
                match dead_letters.send(&raw, &headers).await {
                    Ok(()) => {
                        let _ = internal.send(done);
                        return;
                    }
                    Err(e) => {
                        tries = tries.saturating_add(1);
                        let delay = policy.ceiling(tries);
                        tracing::error!(
                            "could not send topic={} partition={} offset={} to the failure topic ({}); retrying in {delay:?}",
                            rdkafka::Message::topic(&raw),
                            rdkafka::Message::partition(&raw),
                            rdkafka::Message::offset(&raw),
                            e.reason
                        );
                        tokio::time::sleep(delay).await;
                        if abort.is_cancelled() {
                            return;
                        }
                    }
                }
            }
        });
    }

    /// The retry delay of an in-flight event passed: run it again, charged as a retry.
    pub(super) fn retry_due(&mut self, key: Key, slot: Slot) {
        if self.abort.is_cancelled() {
            return;
        }
        let id = (key, slot);
        let Some(flight) = self.in_flight.get_mut(&id) else {
            return;
        };
        if flight.stage != Stage::Waiting {
            return;
        }
        flight.stage = Stage::Running;
        flight.attempts = flight.attempts.saturating_add(1);
        flight.cancel = CancelToken::new();
        let event = flight.event.clone();
        let cancel = flight.cancel.clone();
        let trace = flight.span.clone();
        let job = self.job(id.0, id.1, event, cancel, trace).retry();
        self.outbox.push(job);
    }

    /// A record whose payload is not JSON: dead-lettered with its raw bytes when a failure topic
    /// is set (committed once the send is acknowledged), otherwise logged and committed.
    pub(super) fn on_undecodable(&mut self, bad: crate::event::Undecodable) {
        let crate::event::Undecodable {
            offset,
            key,
            reason,
            raw,
        } = bad;
        let Some(dead_letters) = self.engine.dead_letters.clone() else {
            tracing::error!(
                "skipping undecodable record topic={} partition={} offset={offset} key={}: {reason} \
                 (set failure_topic to keep such records)",
                self.topic,
                self.partition,
                show_key(key.as_deref()),
            );
            self.retire(offset);
            return;
        };
        tracing::error!(
            "sending undecodable record topic={} partition={} offset={offset} key={} to {}: {reason}",
            self.topic,
            self.partition,
            show_key(key.as_deref()),
            dead_letters.topic
        );
        self.undecodable += 1;
        let failure = Failure::permanent(UNDECODABLE, reason);
        self.spawn_dead_letter(
            dead_letters,
            raw,
            (Reason::Undecodable, &failure, 0),
            &opentelemetry::Context::new(),
            Internal::UndecodableSent(offset),
        );
    }
}

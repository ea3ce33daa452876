//! The worker's event-type filter and deduplication stages (the rules live in
//! [`crate::filter`] and [`crate::dedup`]).
//!
//! With a store that must be asked over the network (Cassandra), a message's id is looked up as
//! soon as its record arrives (read-ahead), so that when the message reaches the dedup stage the
//! answer is usually there and its key does not wait a round trip per message. A read-ahead
//! answer is dropped when the same id is remembered by this worker meanwhile (every message of
//! a key comes to the same worker), so it is never stale about this worker's own handling.

use crate::telemetry::{Detail, Kind};
use std::sync::atomic::Ordering;

use super::{Flight, Internal, Key, Pending, Stage, Worker};
use crate::cancel::CancelToken;
use crate::dedup::{Fingerprint, Known, MessageId, Origin};
use crate::event::{show_key, ConsumedMessage};
use crate::handler::{Failure, Slot};
use crate::partition::stages::{self, Admission};

/// Items for a kind of store request of which at most a few are in flight at a time: a request
/// takes everything queued, the next one what came meanwhile (a few requests per round trip,
/// however fast items come).
#[derive(Debug)]
pub(super) struct Batch<T> {
    queued: Vec<T>,
    /// Requests in flight.
    in_flight: usize,
    /// Requests in flight at most.
    limit: usize,
}

impl<T> Batch<T> {
    /// A batch with at most `limit` requests in flight.
    pub(super) fn new(limit: usize) -> Self {
        Self {
            queued: Vec::new(),
            in_flight: 0,
            limit: limit.max(1),
        }
    }

    /// The queued items for a new request, unless `limit` requests are in flight or nothing
    /// is queued.
    fn start(&mut self) -> Option<Vec<T>> {
        if self.in_flight >= self.limit || self.queued.is_empty() {
            return None;
        }
        self.in_flight += 1;
        Some(std::mem::take(&mut self.queued))
    }

    /// A request in flight finished.
    fn finish(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Requests in flight.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }
}

/// Store reads in flight at most per partition: read-ahead lookups overlap the round trips of
/// the next records' lookups.
pub(super) const READS: usize = 4;

/// Store writes in flight at most per partition.
pub(super) const WRITES: usize = 1;

/// Read-ahead answers kept at most per partition before the unclaimed ones are dropped.
const AHEAD_MAX: usize = 4096;

/// The message of a message event (fresh or deferred); `None` for a timer.
fn message_of(pending: &Pending) -> Option<&ConsumedMessage> {
    match pending {
        Pending::Message(m) | Pending::Deferred(m) => Some(m),
        Pending::Timer(..) => None,
    }
}

impl Worker {
    /// The [`Admit::EventType`](stages::Admit) stage.
    pub(super) fn admit_event_type(&self, pending: &Pending) -> Admission {
        let (Some(filter), Some(message)) = (self.engine.filter.as_ref(), message_of(pending))
        else {
            return Admission::Pass;
        };
        if filter.allows(&message.payload) {
            return Admission::Pass;
        }
        tracing::debug!(
            "skipping message of type {:?} (not in allowed_events) topic={} partition={} offset={} key={}",
            crate::filter::EventFilter::event_type(&message.payload).unwrap_or_default(),
            self.topic,
            self.partition,
            message.offset,
            show_key(message.key.as_deref())
        );
        self.engine.skipped.filtered.fetch_add(1, Ordering::Relaxed);
        crate::spans::event(&message.trace, "filter skip", Vec::new);
        self.tell_message(Kind::MessageFiltered, message, Detail::None);
        Admission::Skip
    }

    /// The fingerprint of a message's id, when deduplication is on and the payload has an id.
    fn fingerprint(&self, message: &ConsumedMessage) -> Option<Fingerprint> {
        let dedup = self.engine.dedup.as_ref()?;
        let id = MessageId::of(&message.payload)?;
        let origin = Origin {
            group: self.engine.config.group_id.as_deref().unwrap_or_default(),
            topic: &self.topic,
            key: message.key.as_deref(),
        };
        Some(dedup.fingerprint(origin, id))
    }

    /// Starts the store lookup of a message's id as its record arrives, when the cache does not
    /// know it and the store answers only over the network.
    pub(super) fn read_ahead(&mut self, message: &ConsumedMessage) {
        if self
            .engine
            .dedup
            .as_ref()
            .is_none_or(|d| d.answers_at_once())
        {
            return;
        }
        let Some(id) = self.fingerprint(message) else {
            return;
        };
        if self.ahead.contains_key(&id) || self.known(id) != Known::Ask {
            return;
        }
        if self.ahead.len() >= AHEAD_MAX {
            // Answers nobody took (their messages were skipped or dropped) go; reads in flight
            // stay. A missing answer only means a read at admission.
            self.ahead.retain(|_, answer| answer.is_none());
        }
        self.look_up(id);
    }

    /// Queues a store read of `id` (its answer goes to `ahead`, `None` until then).
    fn look_up(&mut self, id: Fingerprint) {
        self.ahead.insert(id, None);
        self.unchecked.queued.push(id);
        self.read_unchecked();
    }

    /// The [`Admit::Dedup`](stages::Admit) stage. When neither the cache nor a read-ahead answer
    /// knows the id, the event becomes its key's in-flight event until the store answered
    /// ([`Internal::Checked`] resumes it). The lookups of a partition go to the store together:
    /// those that come while a read is in flight go with the next one.
    pub(super) fn admit_dedup(&mut self, pending: &Pending) -> Admission {
        let Some(message) = message_of(pending) else {
            return Admission::Pass;
        };
        let Some(id) = self.fingerprint(message) else {
            return Admission::Pass;
        };
        match self.known(id) {
            Known::New => {
                self.admitted = Some(id);
                Admission::Pass
            }
            Known::Seen => {
                self.duplicate(message);
                Admission::Skip
            }
            Known::Ask => {
                match self.ahead.get(&id).copied() {
                    Some(Some(true)) => {
                        self.ahead.remove(&id);
                        self.duplicate(message);
                        return Admission::Skip;
                    }
                    Some(Some(false)) => {
                        self.ahead.remove(&id);
                        self.admitted = Some(id);
                        return Admission::Pass;
                    }
                    // Its read is in flight: wait for that one.
                    Some(None) => {}
                    None => self.look_up(id),
                }
                let (key, slot) = pending.id();
                self.in_flight.insert(
                    (key.clone(), slot),
                    Flight {
                        event: pending.clone(),
                        cancel: CancelToken::new(),
                        attempts: 0,
                        stage: Stage::Checking,
                        fingerprint: Some(id),
                        remember: false,
                        span: opentelemetry::Context::new(),
                    },
                );
                self.held.insert(id, (key, slot));
                Admission::Hold
            }
        }
    }

    /// What the cache knows of `id` (dedup is on: `id` came from [`Self::fingerprint`]).
    fn known(&self, id: Fingerprint) -> Known {
        self.engine
            .dedup
            .as_ref()
            .map_or(Known::New, |d| d.check(id))
    }

    /// Counts and logs a duplicate that is skipped.
    fn duplicate(&self, message: &ConsumedMessage) {
        tracing::debug!(
            "skipping duplicate message (its id was handled before) topic={} partition={} offset={} key={}",
            self.topic,
            self.partition,
            message.offset,
            show_key(message.key.as_deref())
        );
        self.engine
            .skipped
            .duplicates
            .fetch_add(1, Ordering::Relaxed);
        crate::spans::event(&message.trace, "dedup skip", Vec::new);
        self.tell_message(Kind::MessageDeduplicated, message, Detail::None);
    }

    /// Sends the queued ids to the store, unless a read is in flight.
    fn read_unchecked(&mut self) {
        let Some(dedup) = self.engine.dedup.clone() else {
            return;
        };
        let Some(ids) = self.unchecked.start() else {
            return;
        };
        let internal = self.internal.clone();
        self.engine.runtime.spawn(async move {
            let seen = dedup.ask(&ids).await;
            let _ = internal.send(Internal::Checked(ids.into_iter().zip(seen).collect()));
        });
    }

    /// The dedup store answered: a held event is skipped or resumes its admit walk; an answer
    /// read ahead waits for its message (unless the id was remembered meanwhile). Then the ids
    /// queued meanwhile are read.
    pub(super) fn on_checked(&mut self, answers: Vec<(Fingerprint, bool)>) {
        self.unchecked.finish();
        for (fingerprint, seen) in answers {
            if let Some((key, slot)) = self.held.remove(&fingerprint) {
                self.ahead.remove(&fingerprint);
                self.checked(key, slot, fingerprint, seen);
            } else if let Some(answer) = self.ahead.get_mut(&fingerprint) {
                *answer = Some(seen);
            }
        }
        self.read_unchecked();
    }

    /// The dedup store answered for a held event: skip it, or resume its admit walk.
    fn checked(&mut self, key: Key, slot: Slot, fingerprint: Fingerprint, seen: bool) {
        // Gone when a drain left it to the next owner (a held event's id is its only flight).
        let Some(flight) = self.in_flight.remove(&(key, slot)) else {
            return;
        };
        if seen {
            if let Some(message) = message_of(&flight.event) {
                self.duplicate(message);
            }
            self.walk(flight.event, 0, Some(Admission::Skip));
        } else {
            self.admitted = Some(fingerprint);
            self.walk(flight.event, stages::after(stages::Admit::Dedup), None);
        }
    }

    /// The [`Outcome::Remember`](stages::Outcome) stage: marks a message that succeeded or
    /// failed permanently to be remembered when it finishes ([`Self::remember_finished`]); a
    /// transient failure clears the mark.
    pub(super) fn remember(&mut self, id: &(Key, Slot), result: &Result<(), Failure>) {
        let handled = result.as_ref().map_or_else(|f| f.permanent, |()| true);
        if let Some(flight) = self.in_flight.get_mut(id) {
            flight.remember = handled;
        }
    }

    /// A marked message finished for good (its offset retires, or it left its deferred list):
    /// its id is remembered now. Not before: a permanent failure is remembered only once the
    /// failure topic acknowledged its dead letter, so a crash in between never skips, as a
    /// duplicate, a message that did not reach the failure topic.
    pub(super) fn remember_finished(&mut self, flight: &Flight) {
        let (true, Some(fingerprint), Some(dedup)) = (
            flight.remember,
            flight.fingerprint,
            self.engine.dedup.as_ref(),
        ) else {
            return;
        };
        // A later copy's read-ahead answer ("not seen") is out of date now.
        self.ahead.remove(&fingerprint);
        if dedup.remember(fingerprint) {
            self.remembered.queued.push(fingerprint);
            self.write_remembered();
        }
    }

    /// Sends the remembered fingerprints to the store, unless a write is in flight.
    fn write_remembered(&mut self) {
        let Some(dedup) = self.engine.dedup.clone() else {
            return;
        };
        let Some(ids) = self.remembered.start() else {
            return;
        };
        let internal = self.internal.clone();
        self.engine.runtime.spawn(async move {
            dedup.write(&ids).await;
            let _ = internal.send(Internal::Remembered);
        });
    }

    /// The dedup store write finished; the next one takes what was remembered meanwhile.
    pub(super) fn on_remembered(&mut self) {
        self.remembered.finish();
        self.write_remembered();
    }
}

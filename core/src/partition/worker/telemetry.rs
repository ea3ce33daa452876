//! The worker's telemetry events (see [`crate::telemetry`]): what happened to a message or a
//! timer of this partition, with the trace its span belongs to. Every event is also counted on
//! the partition for `/metrics`, whether or not the emitter runs.

use super::{Key, Pending, Worker};
use crate::event::ConsumedMessage;
use crate::handler::{Failure, Slot};
use crate::telemetry::{Detail, Event, Kind};

impl Worker {
    /// Sends a telemetry event about a consumed message, when the emitter runs.
    pub(super) fn tell_message(&self, kind: Kind, message: &ConsumedMessage, detail: Detail) {
        self.shared.events.add(kind);
        let Some(telemetry) = self.engine.telemetry.as_ref() else {
            return;
        };
        telemetry.send(Event {
            offset: Some(message.offset),
            message_ms: message.timestamp_ms,
            detail,
            ..Event::new(
                kind,
                self.topic.clone(),
                self.partition,
                message.key.clone(),
                &message.trace,
            )
        });
    }

    /// The [`Outcome::Report`](super::stages::Outcome) stage: how the handler call of the
    /// in-flight event `id` ended, on its span and to the telemetry topic.
    pub(super) fn report(&self, id: &(Key, Slot), result: &Result<(), Failure>) {
        let Some(flight) = self.in_flight.get(id) else {
            return;
        };
        if self.engine.telemetry.is_none() && !self.engine.spans.exported() {
            let kinds = match result {
                Ok(()) => (Kind::MessageSucceeded, Kind::TimerSucceeded),
                Err(_) => (Kind::MessageFailed, Kind::TimerFailed),
            };
            self.count(kinds, &flight.event);
            return;
        }
        crate::spans::attempted(&flight.span, flight.attempts, result.as_ref().err());
        let (kinds, detail) = match result {
            Ok(()) => ((Kind::MessageSucceeded, Kind::TimerSucceeded), Detail::None),
            Err(failure) => (
                (Kind::MessageFailed, Kind::TimerFailed),
                Detail::Failure {
                    error_class: failure.error_class.clone(),
                    permanent: failure.permanent,
                    attempt: flight.attempts,
                },
            ),
        };
        self.tell(kinds, &flight.event, &flight.span, detail);
    }

    /// Sends a telemetry event about the in-flight event `id` (see [`Worker::tell`]).
    pub(super) fn tell_flight(&self, kinds: (Kind, Kind), id: &(Key, Slot), detail: Detail) {
        if let Some(flight) = self.in_flight.get(id) {
            self.tell(kinds, &flight.event, &flight.span, detail);
        }
    }

    /// Counts an event about `pending` on the partition: `message` names the kind for a message,
    /// `timer` for a timer.
    fn count(&self, (message, timer): (Kind, Kind), pending: &Pending) {
        let kind = match pending {
            Pending::Message(_) | Pending::Deferred(_) => message,
            Pending::Timer(..) => timer,
        };
        self.shared.events.add(kind);
    }

    /// Sends a telemetry event about an in-flight event whose span is `span`: for a message,
    /// `message` names the kind; for a timer, `timer` does (and the timer's time is added).
    pub(super) fn tell(
        &self,
        (message, timer): (Kind, Kind),
        pending: &Pending,
        span: &opentelemetry::Context,
        detail: Detail,
    ) {
        self.count((message, timer), pending);
        let Some(telemetry) = self.engine.telemetry.as_ref() else {
            return;
        };
        let (kind, offset, key, message_ms, timer_time) = match pending {
            Pending::Message(m) | Pending::Deferred(m) => {
                (message, Some(m.offset), m.key.clone(), m.timestamp_ms, None)
            }
            Pending::Timer(key, time) => (timer, None, Some(key.clone()), None, Some(Some(*time))),
        };
        telemetry.send(Event {
            offset,
            message_ms,
            timer: timer_time,
            detail,
            ..Event::new(kind, self.topic.clone(), self.partition, key, span)
        });
    }
}

//! The stages around the handler, in the order they run. This list is the one place that says
//! what happens to an event before and after its handler; the partition worker walks it and does
//! not grow a branch per feature.
//!
//! **Admit** stages run when an event is about to become its key's in-flight event (so they see
//! the key's earlier events finished). Each may let the event through or take it over:
//! - [`Admit::SourceSystem`]: a record whose `source-system` header names this consumer group
//!   was produced by this group itself; its offset finishes without a handler call.
//! - [`Admit::EventType`] (with `allowed_events`): a message whose top-level `type` String starts
//!   with none of the prefixes finishes without a handler call (see [`crate::filter`]).
//! - [`Admit::Dedup`] (unless `idempotence_cache_size` is 0): a message whose `id` was handled
//!   for its key before finishes without a handler call (see [`crate::dedup`]). When the cache
//!   does not know the id, the stage holds the event while the store is read, then resumes the
//!   walk after itself (or skips the event).
//! - [`Admit::Deferred`] (pipeline mode): a message of a deferred key is appended to the key's
//!   deferred list instead of running; its offset finishes once the store acknowledged it. To
//!   keep a key's order this stage also sees each record as it arrives and as it leaves the
//!   admit walk (`deferral_received`, `deferral_admitted`), the only calls outside the list.
//! - [`Admit::Monopolization`] (pipeline mode): a message (fresh or deferred) of a key that used
//!   more than `monopolization_threshold` of the window is rejected without running, as if its
//!   handler had failed with a transient `Prosody::MonopolizationError`: the outcome stages
//!   then defer it (or back it off in place while the failure rate gates deferral).
//!
//! A skipped message (source system, event type, duplicate) finishes like a success: a fresh
//! message's offset finishes, a deferred message leaves its key's list.
//!
//! **Outcome** stages run, in order, after a handler call ended; the first that takes the event
//! over ends the walk:
//! - [`Outcome::Report`]: records how the call ended on the event's span (`prosody.attempt`, a
//!   `handler failure` event) and sends `message.succeeded` / `message.failed` (or the timer
//!   ones) to the telemetry topic (never takes over). Where an event finishes, the stage that
//!   finishes it ends its span and reports it (a skip, a retry, a deferral, a dead letter), and
//!   a record's `message.received` is reported as it arrives (see [`crate::spans`] and
//!   [`crate::telemetry`]).
//! - [`Outcome::Remember`]: a message with an `id` that succeeded or failed permanently is
//!   marked to be remembered for deduplication when it finishes for good (never takes over; a
//!   transient failure clears the mark). The worker's finish (`succeeded`, which every exit goes
//!   through: success, give-up, the failure topic's acknowledgement) writes the marked id, so a
//!   permanent failure is remembered only once its dead letter is acknowledged.
//! - [`Outcome::Account`]: counts the call for failure-rate gating (never takes over).
//! - [`Outcome::Defer`] (pipeline mode): a transient failure defers the key while the failure
//!   rate allows it; a deferred message that failed again waits for its next retry.
//! - [`Outcome::Policy`]: the failure policy of the mode: retry in place, dead-letter, or give up
//!   (see [`crate::failure`]); a success finishes the event.
//!
//! To add a stage, add a variant at its place in [`ADMIT`] or [`OUTCOME`], and its arm in the
//! worker's `admit_stage` or `outcome_stage` (`partition/worker.rs`), which calls into the
//! stage's own module. Document it here and in ARCHITECTURE.md.

/// Admit stages, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Skip records this consumer group produced.
    SourceSystem,
    /// Skip messages whose event type is not allowed.
    EventType,
    /// Skip messages whose id was handled before.
    Dedup,
    /// Append messages of deferred keys to their list.
    Deferred,
    /// Reject messages of keys that monopolize handler time.
    Monopolization,
}

/// The admit stages, in the order they run.
pub(crate) const ADMIT: [Admit; 5] = [
    Admit::SourceSystem,
    Admit::EventType,
    Admit::Dedup,
    Admit::Deferred,
    Admit::Monopolization,
];

/// Where the walk resumes after `stage` held an event.
pub(crate) fn after(stage: Admit) -> usize {
    ADMIT
        .iter()
        .position(|s| *s == stage)
        .map_or(ADMIT.len(), |i| i + 1)
}

/// What an admit stage decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admission {
    /// On to the next stage (after the last: run the handler).
    Pass,
    /// The stage took the event over; the key's next event may start.
    Taken,
    /// The event finishes without running (as a success would); the key's next event may start.
    Skip,
    /// The stage holds the event and resumes the walk later (its key waits meanwhile).
    Hold,
    /// The event fails without running, with this failure: the outcome stages handle it.
    Reject(crate::handler::Failure),
}

/// Outcome stages, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Record the call's end on the event's span and the telemetry topic.
    Report,
    /// Remember the id of a message handled for good, for deduplication.
    Remember,
    /// Count the call for failure-rate gating.
    Account,
    /// Defer a transiently failing key (pipeline mode).
    Defer,
    /// Apply the mode's failure policy, or finish a success.
    Policy,
}

/// The outcome stages, in the order they run.
pub(crate) const OUTCOME: [Outcome; 5] = [
    Outcome::Report,
    Outcome::Remember,
    Outcome::Account,
    Outcome::Defer,
    Outcome::Policy,
];

/// What an outcome stage did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handled {
    /// On to the next stage.
    Next,
    /// The stage took the event over.
    Done,
}

//! # prosody-core
//!
//! The engine of the Prosody gem: Kafka consumption with per-key order and cross-key
//! concurrency, exact offset tracking, bounded memory, and an idempotent producer. No Ruby here;
//! the binding (`ext/prosody`) pulls jobs from the [`scheduler`] to run handlers.
//!
//! | concept | module |
//! | --- | --- |
//! | options, env vars, defaults, validation | [`config`] |
//! | client facade: send, subscribe, state | [`client`] |
//! | poll thread, rebalance, commits | [`kafka::consumer`] |
//! | idempotent producer | [`kafka::producer`] |
//! | in-process mock cluster | [`kafka::mock`] |
//! | per-partition worker, key queues, offset tracker | [`partition`] |
//! | fair scheduler: permits, virtual time, retry share, wait boost, timeouts, quarantine | [`scheduler`] |
//! | failure policy by mode, retry backoff, dead-letter records | [`failure`] |
//! | what a handler receives | [`event`] |
//! | engine ⇄ runner contract (jobs, outcomes) | [`handler`] |
//! | cancellation signal | [`cancel`] |
//! | shared tokio runtime | [`runtime`] |
//! | values created once per process, fork-safe | [`process`] |
//! | raw producer for tests and benchmarks | [`testing`] |
//! | per-key timers: store contract, memory and Cassandra stores, context handle | [`timers`] |
//! | Cassandra session and versioned schema migrations | [`cassandra`] |
//! | deferred retry: store contract, memory and Cassandra stores, failure-rate gate | [`defer`] |
//! | the one place that opens a client's stores | [`stores`] |
//! | monopolization detection: per-key handler time over a rolling window | [`monopoly`] |

pub mod cancel;
pub mod cassandra;
pub mod client;
pub mod config;
pub mod dedup;
pub mod defer;
pub mod engine;
pub mod event;
pub mod failure;
pub mod filter;
pub mod handler;
pub mod kafka;
pub mod metrics;
pub mod monopoly;
pub mod partition;
pub mod payload;
pub mod probe;
pub mod process;
pub mod runtime;
pub mod scheduler;
pub mod spans;
pub mod stores;
pub mod telemetry;
pub mod testing;
pub mod timers;
pub mod waker;

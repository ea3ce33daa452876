//! The poll thread and rebalance handling.
//!
//! One plain OS thread per subscription owns the librdkafka consumer. Each assigned partition is
//! read from its own queue (`split_partition_queue`) and only while its worker has room
//! (`max_uncommitted`); a full partition is simply not read, and librdkafka's bounded prefetch
//! queue stops fetching it. Pause/resume is not used for routine flow control: on librdkafka each
//! pause+resume idles a partition for about a second.
//!
//! Rebalance callbacks run on this thread inside `poll`. On revoke the partition's worker drains
//! (in-flight handlers finish or are cancelled near `shutdown_timeout`) and its offsets are
//! committed before the partition is released, so a key never runs on two clients at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    base_consumer::PartitionQueue, BaseConsumer, CommitMode, Consumer as _, ConsumerContext,
    Rebalance,
};
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use super::KafkaError;
use crate::config::GroupProtocol;
use crate::engine::Engine;
use crate::partition::{spawn_worker, PartitionShared, WorkerInput};
use crate::waker::Waker;

type TopicPartition = (Arc<str>, i32);

/// Messages read from one partition queue per round, so one busy partition cannot starve others.
const READ_BATCH: usize = 1024;

/// A running subscription: the poll thread and what it shares.
pub struct Subscription {
    /// Set to ask the poll thread to stop.
    stop: Arc<AtomicBool>,
    /// Set (by tests, see [`Subscription::inject_fault`]) to make the poll thread panic.
    fault: Arc<AtomicBool>,
    /// Wakes the poll thread.
    waker: Arc<Waker>,
    /// The poll thread; joined by `shutdown`.
    thread: Option<JoinHandle<()>>,
    /// The subscription's engine, for health checks.
    engine: Arc<Engine>,
    /// Its place on the probe server, when one runs; dropped once the poll thread stopped.
    probe: Option<crate::probe::Registration>,
}

impl Subscription {
    /// Creates the consumer (librdkafka prefetching up to `prefetch_per_partition` records per
    /// partition), subscribes, and starts the poll thread; keeps `probe` (the subscription's
    /// place on the probe server) until it stops.
    pub fn start(
        engine: Arc<Engine>,
        bootstrap: &str,
        probe: Option<crate::probe::Registration>,
        prefetch_per_partition: u64,
    ) -> Result<Self, KafkaError> {
        let config = &engine.config;
        let group = config
            .group_id
            .clone()
            .ok_or(KafkaError::NotConsumer("group_id is not set"))?;
        if config.subscribed_topics.is_empty() {
            return Err(KafkaError::NotConsumer("subscribed_topics is empty"));
        }
        let waker = Arc::new(Waker::new());
        let context = PollContext {
            engine: engine.clone(),
            consumer: OnceLock::new(),
            partitions: Mutex::new(HashMap::new()),
            waker: waker.clone(),
        };
        let mut settings = ClientConfig::new();
        match config.group_protocol {
            GroupProtocol::Consumer => settings.set("group.protocol", "consumer"),
            GroupProtocol::Classic => settings
                .set("group.protocol", "classic")
                .set("partition.assignment.strategy", "cooperative-sticky"),
        };
        if config.mock {
            // The mock broker does not answer a long-poll fetch early when data arrives, so the
            // default 500 ms wait would add up to half a second of latency in tests.
            settings.set("fetch.wait.max.ms", "10");
        }
        settings
            .set("bootstrap.servers", bootstrap)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Bounded prefetch per partition; a full queue backs off only briefly (librdkafka
            // otherwise waits fetch.queue.backoff.ms = 1 s before fetching again).
            .set("queued.max.messages.kbytes", "16384")
            // librdkafka fetches a partition until it holds this many records: the client's
            // `prefetch_records` shared by its partitions (see `super::prefetch_share`). Its
            // default, 100,000 per partition, binds before the byte bound for small records
            // (which counts payloads, not the ~350 bytes each record costs in memory).
            .set("queued.min.messages", prefetch_per_partition.to_string())
            .set("fetch.queue.backoff.ms", "10")
            // Consumer lag, fetch queues and broker round trips for /metrics.
            .set("statistics.interval.ms", super::STATISTICS_INTERVAL_MS);
        super::settings::apply(
            &mut settings,
            &super::settings::properties(config, super::settings::Side::Consumer),
        );
        let mut consumer: BaseConsumer<PollContext> = settings
            .create_with_context(context)
            .map_err(|source| KafkaError::Create {
                what: "consumer",
                source,
            })?;
        let wake = waker.clone();
        consumer.set_nonempty_callback(move || wake.wake());
        let consumer = Arc::new(consumer);
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        let topics: Vec<&str> = config
            .subscribed_topics
            .iter()
            .map(String::as_str)
            .collect();
        consumer
            .subscribe(&topics)
            .map_err(|source| KafkaError::Subscribe {
                topics: config.subscribed_topics.clone(),
                source,
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let fault = Arc::new(AtomicBool::new(false));
        let poll = PollLoop {
            consumer,
            stop: stop.clone(),
            fault: fault.clone(),
            waker: waker.clone(),
            commit_interval: config.commit_interval,
            poll_interval: config.poll_interval,
        };
        let failed = engine.clone();
        let thread = std::thread::Builder::new()
            .name("prosody-poll".into())
            .spawn(move || poll.run(&failed))
            .map_err(|source| KafkaError::Thread {
                what: "poll",
                source,
            })?;
        Ok(Self {
            stop,
            fault,
            waker,
            thread: Some(thread),
            engine,
            probe,
        })
    }

    /// Whether an assigned partition has an unfinished message older than `stall_threshold`.
    pub fn is_stalled(&self) -> bool {
        self.engine.is_stalled()
    }

    /// The subscription's engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Partitions currently assigned to this subscription.
    pub fn assigned_partitions(&self) -> usize {
        self.engine.assigned_partitions()
    }

    /// Drains in-flight work (within `shutdown_timeout`), commits, leaves the group, and joins the
    /// poll thread. Blocks. Returns the failure of a thread or task of the subscription, if one
    /// died.
    pub fn shutdown(mut self) -> Option<String> {
        self.stop_and_join();
        // The last subscription of a probe server closes it: a probe now is refused.
        drop(self.probe.take());
        // The workers are drained: nothing reads deferred messages any more.
        if let Some(deferral) = self.engine.deferral.as_ref() {
            deferral.reloader.stop();
        }
        self.engine.failure.get().cloned()
    }

    /// Test support: makes the poll thread panic at its next turn, as a bug would.
    pub fn inject_fault(&self) {
        self.fault.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                self.engine
                    .fail("the poll thread panicked during shutdown".into());
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// An assigned partition as the poll thread sees it.
struct Assigned {
    /// The partition's own message queue.
    queue: PartitionQueue<PollContext>,
    /// Room and committable position, shared with the worker.
    shared: Arc<PartitionShared>,
    /// Input of the partition's worker.
    worker: mpsc::UnboundedSender<WorkerInput>,
    /// Last position committed, to skip commits that would change nothing.
    committed: Option<i64>,
}

/// librdkafka callbacks, run on the poll thread.
struct PollContext {
    /// The subscription's engine.
    engine: Arc<Engine>,
    /// The consumer itself, to split partition queues inside the assign callback.
    consumer: OnceLock<Weak<BaseConsumer<PollContext>>>,
    /// Assigned partitions. Locked by the poll loop between polls and by rebalance callbacks
    /// (which run inside `poll`), never across a `poll` call.
    partitions: Mutex<HashMap<TopicPartition, Assigned>>,
    /// Wakes the poll thread.
    waker: Arc<Waker>,
}

impl ClientContext for PollContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if super::log_librdkafka(level, facility, message) {
            self.engine.fail(format!(
                "the Kafka cluster behind bootstrap_servers changed under this consumer \
                 ({message}); the group, offsets and topics it was reading are gone"
            ));
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        super::log_client_error(&error, reason);
    }

    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        let figures = crate::metrics::KafkaStats::from_statistics(&statistics);
        if let Ok(mut stats) = self.engine.kafka_stats.lock() {
            *stats = figures;
        }
    }
}

impl ConsumerContext for PollContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<TopicPartition> = tpl
                .elements()
                .iter()
                .map(|e| (Arc::<str>::from(e.topic()), e.partition()))
                .collect();
            let lost = consumer.assignment_lost();
            if lost {
                let names: Vec<String> = revoked.iter().map(|(t, p)| format!("{t}/{p}")).collect();
                tracing::warn!(
                    "this consumer lost its group membership (session timed out or fenced): \
                     partitions {} were taken away without a final commit; their messages not \
                     yet committed will be delivered again to the next owner",
                    names.join(", ")
                );
            }
            self.release(consumer, &revoked, !lost);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
                    return;
                };
                let Ok(mut partitions) = self.partitions.lock() else {
                    return;
                };
                // Every new partition's queue is split first: records fetched before the split
                // reach the main queue (see `route_stray`), so the split comes before anything
                // that waits on the broker.
                let mut split = Vec::new();
                for element in tpl.elements() {
                    let tp: TopicPartition = (Arc::from(element.topic()), element.partition());
                    if partitions.contains_key(&tp) {
                        continue;
                    }
                    let Some(mut queue) = consumer.split_partition_queue(&tp.0, tp.1) else {
                        tracing::error!(
                            "could not read topic={} partition={} from its own queue",
                            tp.0,
                            tp.1
                        );
                        continue;
                    };
                    let wake = self.waker.clone();
                    queue.set_nonempty_callback(move || wake.wake());
                    split.push((tp, queue));
                }
                // Deferral needs each new partition's committed position (offsets from there
                // on come again to the new worker); one round trip for the whole assignment.
                let committed: HashMap<TopicPartition, i64> = if self.engine.deferral.is_some() {
                    committed_positions(&consumer, tpl)
                } else {
                    HashMap::new()
                };
                let mut added = Vec::new();
                for (tp, queue) in split {
                    let max = usize::try_from(self.engine.config.max_uncommitted.get())
                        .unwrap_or(usize::MAX);
                    let shared = Arc::new(PartitionShared::new(max, self.waker.clone()));
                    let worker = spawn_worker(
                        self.engine.clone(),
                        tp.0.clone(),
                        tp.1,
                        shared.clone(),
                        committed.get(&tp).copied(),
                    );
                    if let Ok(mut health) = self.engine.partitions.lock() {
                        health.insert(tp.clone(), shared.clone());
                    }
                    added.push(format!("{}/{}", tp.0, tp.1));
                    partitions.insert(
                        tp,
                        Assigned {
                            queue,
                            shared,
                            worker,
                            committed: None,
                        },
                    );
                }
                if !added.is_empty() {
                    added.sort();
                    tracing::info!(
                        "assigned {} partition(s): {}",
                        added.len(),
                        added.join(", ")
                    );
                }
                self.waker.wake();
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::error!("rebalance failed: {e}"),
        }
    }
}

/// The group's committed positions of the partitions in `tpl` (absent: none committed, or the
/// lookup failed, which is logged).
fn committed_positions(
    consumer: &BaseConsumer<PollContext>,
    tpl: &TopicPartitionList,
) -> HashMap<TopicPartition, i64> {
    match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
        Ok(list) => list
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => Some(((Arc::from(e.topic()), e.partition()), o)),
                _ => None,
            })
            .collect(),
        Err(e) => {
            tracing::warn!(
                "could not read the committed positions of the assigned partitions ({e}); \
                 a deferred key's messages that an earlier owner could not finish storing wait \
                 until they are read again"
            );
            HashMap::new()
        }
    }
}

impl PollContext {
    /// Stops reading the partitions, drains their workers, and commits their final positions.
    fn release(&self, consumer: &BaseConsumer<Self>, revoked: &[TopicPartition], commit: bool) {
        let removed: Vec<(TopicPartition, Assigned)> = {
            let Ok(mut partitions) = self.partitions.lock() else {
                return;
            };
            let removed: Vec<(TopicPartition, Assigned)> = revoked
                .iter()
                .filter_map(|tp| partitions.remove_entry(tp))
                .collect();
            if let Ok(mut health) = self.engine.partitions.lock() {
                for (tp, _) in &removed {
                    health.remove(tp);
                }
            }
            removed
        };
        if removed.is_empty() {
            return;
        }
        let timeout = self.engine.config.shutdown_timeout;
        let start = Instant::now();
        // Handlers run freely for most of the budget; cancellation fires near its end.
        let cancel_at = start + timeout.mul_f64(0.9);
        let give_up_at = start + timeout;
        let mut acks = Vec::with_capacity(removed.len());
        for (tp, assigned) in removed {
            let Assigned {
                queue,
                worker,
                committed,
                ..
            } = assigned;
            drop(queue);
            let (ack, rx) = oneshot::channel();
            let _ = worker.send(WorkerInput::Drain {
                cancel_at,
                give_up_at,
                ack,
            });
            acks.push((tp, rx, committed));
        }
        let mut tpl = TopicPartitionList::new();
        let mut names = Vec::with_capacity(acks.len());
        for (tp, rx, committed) in acks {
            let position = self
                .engine
                .runtime
                .block_on(async {
                    tokio::time::timeout(timeout + Duration::from_secs(1), rx).await
                })
                .ok()
                .and_then(Result::ok)
                .flatten();
            names.push(format!("{}/{}", tp.0, tp.1));
            if let Some(position) = position.filter(|p| Some(*p) != committed) {
                if let Err(e) = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(position)) {
                    tracing::warn!("could not record the offset of {}/{}: {e}", tp.0, tp.1);
                }
            }
        }
        names.sort();
        tracing::info!(
            "released {} partition(s) after {:?}: {}",
            names.len(),
            start.elapsed(),
            names.join(", ")
        );
        if commit && tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(
                    "final commit on revoke failed: {e}; the uncommitted tail will be re-delivered"
                );
            }
        }
    }
}

struct PollLoop {
    /// The consumer; partition queues hold clones of it.
    consumer: Arc<BaseConsumer<PollContext>>,
    /// Set by `Subscription::shutdown`.
    stop: Arc<AtomicBool>,
    /// Set by `Subscription::inject_fault`.
    fault: Arc<AtomicBool>,
    /// Woken by queue callbacks, workers regaining room, and shutdown.
    waker: Arc<Waker>,
    /// How often positions are committed.
    commit_interval: Duration,
    /// Longest idle wait.
    poll_interval: Duration,
}

impl PollLoop {
    /// Polls until stopped, then closes the consumer. A panic (a bug) never ends the thread
    /// silently: it is reported through the engine, and the consumer is closed all the same, so
    /// that what finished is committed and the partitions go to other members at once.
    fn run(self, engine: &Engine) {
        let turns = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.turns()));
        if let Err(panic) = turns {
            engine.fail(format!(
                "the poll thread panicked: {}",
                crate::engine::panic_message(panic.as_ref())
            ));
        }
        let closed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.close()));
        if closed.is_err() {
            engine.fail("the poll thread panicked while closing the consumer".into());
        }
    }

    fn turns(&self) {
        let mut next_commit = Instant::now() + self.commit_interval;
        while !self.stop.load(Ordering::Acquire) {
            if self.fault.load(Ordering::Relaxed) {
                #[allow(clippy::panic)] // the fault a test injected, standing for a bug
                {
                    panic!("injected fault");
                }
            }
            // Serves rebalance callbacks and errors; messages arrive here only for a partition
            // fetched before its queue was split.
            while let Some(result) = self.consumer.poll(Duration::ZERO) {
                match result {
                    Ok(message) => self.route_stray(message.detach()),
                    Err(e) => tracing::warn!("Kafka consumer error: {e}"),
                }
            }
            let read = self.read_partitions();
            let now = Instant::now();
            if now >= next_commit {
                self.commit(CommitMode::Async);
                next_commit = now + self.commit_interval;
            }
            if read == 0 {
                let until_commit = next_commit.saturating_duration_since(now);
                self.waker.wait(self.poll_interval.min(until_commit));
            }
        }
    }

    /// Reads every partition that has room; returns how many messages were read.
    fn read_partitions(&self) -> usize {
        let context = self.consumer.context();
        let Ok(partitions) = context.partitions.lock() else {
            return 0;
        };
        let mut read = 0;
        for ((topic, partition), assigned) in partitions.iter() {
            let budget = assigned.shared.room().min(READ_BATCH);
            // One hand-off (and at most one wake of the worker) per partition and round, not
            // one per record.
            let mut records = Vec::new();
            while records.len() < budget {
                match assigned.queue.poll(Duration::ZERO) {
                    None => break,
                    Some(Ok(message)) => records.push(message.detach()),
                    Some(Err(e)) => {
                        tracing::warn!("error reading topic={topic} partition={partition}: {e}");
                        break;
                    }
                }
            }
            if !records.is_empty() {
                read += records.len();
                assigned.shared.took(records.len());
                let _ = assigned.worker.send(WorkerInput::Records(records));
            }
        }
        read
    }

    fn route_stray(&self, message: rdkafka::message::OwnedMessage) {
        let context = self.consumer.context();
        let Ok(partitions) = context.partitions.lock() else {
            return;
        };
        let tp: TopicPartition = (Arc::from(message.topic()), message.partition());
        match partitions.get(&tp) {
            Some(assigned) => {
                assigned.shared.took(1);
                let _ = assigned.worker.send(WorkerInput::Records(vec![message]));
            }
            None => tracing::debug!(
                "dropping a record of unassigned topic={} partition={} offset={}; it stays uncommitted",
                tp.0,
                tp.1,
                message.offset()
            ),
        }
    }

    fn commit(&self, mode: CommitMode) {
        let context = self.consumer.context();
        let Ok(mut partitions) = context.partitions.lock() else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), assigned) in partitions.iter_mut() {
            let Some(position) = assigned.shared.committable() else {
                continue;
            };
            if assigned.committed == Some(position) {
                continue;
            }
            if tpl
                .add_partition_offset(topic, *partition, Offset::Offset(position))
                .is_ok()
            {
                assigned.committed = Some(position);
            }
        }
        drop(partitions);
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, mode) {
                tracing::warn!("offset commit failed: {e}; it is retried at the next interval");
                // Forget what we believed committed so the next round tries again.
                if let Ok(mut partitions) = context.partitions.lock() {
                    for assigned in partitions.values_mut() {
                        assigned.committed = None;
                    }
                }
            }
        }
    }

    /// Drains every partition, commits, and leaves the group.
    fn close(self) {
        let context = self.consumer.context();
        let all: Vec<TopicPartition> = match context.partitions.lock() {
            Ok(partitions) => partitions.keys().cloned().collect(),
            Err(_) => Vec::new(),
        };
        context.release(&self.consumer, &all, true);
        self.consumer.unsubscribe();
        // Serve the final callbacks; dropping the consumer then closes it.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline
            && !self
                .consumer
                .assignment()
                .map(|a| a.count() == 0)
                .unwrap_or(true)
        {
            let _ = self.consumer.poll(Duration::from_millis(20));
        }
        close_bounded(self.consumer);
        tracing::info!("consumer stopped");
    }
}

/// How long the final close of a consumer may take before the poll thread stops waiting for it.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Drops (closes) the consumer on a thread of its own and waits at most [`CLOSE_WAIT`]. Closing
/// can hang inside librdkafka when the group sends one more assignment change while the consumer
/// closes (librdkafka #4527; the partitions were already released and committed by then), and a
/// hang there must not become a hung `unsubscribe`: the closing thread is then left to finish, or
/// not, in the background.
fn close_bounded(consumer: Arc<BaseConsumer<PollContext>>) {
    let (closed, wait) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("prosody-close".into())
        .spawn(move || {
            drop(consumer);
            let _ = closed.send(());
        });
    match spawned {
        Ok(_) => {
            if wait.recv_timeout(CLOSE_WAIT).is_err() {
                tracing::warn!(
                    "closing the Kafka consumer did not finish within {CLOSE_WAIT:?} (a known \
                     librdkafka issue when the group changes the assignment during close); its \
                     partitions were released and committed, so it is left to finish in the \
                     background"
                );
            }
        }
        Err(e) => tracing::warn!("could not start a thread to close the Kafka consumer ({e})"),
    }
}

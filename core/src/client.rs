//! The client facade the binding wraps: producer, subscription lifecycle, and state.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::config::{Config, Mode};
use crate::dedup::Dedup;
use crate::defer::gate::FailureRate;
use crate::defer::{Backoff, Deferral};
use crate::engine::{Engine, Skipped};
use crate::failure::deadletter::DeadLetters;
use crate::failure::Policy;
use crate::kafka::consumer::Subscription;
use crate::kafka::mock;
use crate::kafka::producer::{Delivery, Done, Producer, RawRecord, Record, SendError};
use crate::kafka::reload::Reloader;
use crate::kafka::KafkaError;
use crate::monopoly::Monopolization;
use crate::scheduler::{FairConfig, Scheduler};
use crate::stores::Stores;

/// Longest `subscribe` waits for each subscribed topic's partition count (for the prefetch
/// share); a cluster that does not answer in time gets the share for
/// [`crate::kafka::UNKNOWN_PARTITIONS`] partitions.
const PREFETCH_METADATA_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Lifecycle of the consumer side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerState {
    /// No group or no topics: this client can only produce.
    Unconfigured,
    /// Could subscribe but is not subscribed.
    Configured,
    /// Subscribed.
    Running,
}

/// One client: a producer, and at most one subscription at a time.
pub struct Client {
    /// Resolved configuration.
    config: Arc<Config>,
    /// `bootstrap.servers` in use (the mock cluster's when `mock`).
    bootstrap: String,
    /// Created with the client; connects lazily. Shared with the dead-letter sender.
    producer: Arc<Producer>,
    /// The running subscription, if any.
    subscription: Mutex<Option<Subscription>>,
    /// The stores (Cassandra ones are opened on the first subscribe and kept for later ones).
    stores: Mutex<Option<Stores>>,
    /// Deduplication (its cache outlives subscriptions); built on the first subscribe.
    dedup: Mutex<Option<Arc<Dedup>>>,
    /// Events finished without a handler call, over this client's life.
    skipped: Arc<Skipped>,
    /// The client's spans.
    spans: crate::spans::Spans,
    /// The telemetry emitter, when `telemetry_enabled` (see [`Config::effective_telemetry`]).
    telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    /// The clock timers come due by (kept across subscriptions; only tests move it).
    clock: Arc<crate::timers::Clock>,
    /// In mock mode, the cluster this client was created with (held: a reset of the mock cluster
    /// leaves this client on it).
    mock: Option<Arc<mock::MockKafka>>,
}

impl Client {
    /// Creates a client. In mock mode this starts (or joins) the process's mock cluster.
    pub fn new(config: Config) -> Result<Self, KafkaError> {
        let mock = if config.mock {
            Some(mock::shared()?)
        } else {
            None
        };
        let bootstrap = if let Some(mock) = &mock {
            mock.bootstrap_servers().to_owned()
        } else {
            config
                .bootstrap_servers
                .as_ref()
                .map(|s| s.join(","))
                .unwrap_or_default()
        };
        let spans = crate::spans::Spans::new(
            config.message_spans,
            config.timer_spans,
            config.group_id.clone(),
        )
        .map_err(KafkaError::Tracing)?;
        let producer_properties =
            crate::kafka::settings::properties(&config, crate::kafka::settings::Side::Producer);
        let producer = Arc::new(Producer::new(
            &bootstrap,
            producer_properties.clone(),
            config.effective_source_system(),
            config.send_timeout,
            config.mock,
        )?);
        let telemetry = if config.effective_telemetry() {
            if let Some(mock) = &mock {
                mock.ensure_topic(&config.telemetry_topic, config.mock_partitions.get())?;
            }
            let runtime = crate::runtime::handle().map_err(KafkaError::Runtime)?;
            Some(Arc::new(crate::telemetry::Telemetry::start(
                &runtime,
                &bootstrap,
                &producer_properties,
                config.send_timeout,
                config.telemetry_topic.clone(),
                config.group_id.clone().unwrap_or_default(),
            )?))
        } else {
            None
        };
        Ok(Self {
            config: Arc::new(config),
            bootstrap,
            producer,
            subscription: Mutex::new(None),
            stores: Mutex::new(None),
            dedup: Mutex::new(None),
            skipped: Arc::new(Skipped::default()),
            spans,
            telemetry,
            clock: Arc::default(),
            mock,
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// In mock mode, creates the topic on first use.
    pub fn prepare_topic(&self, topic: &str) -> Result<(), KafkaError> {
        if let Some(mock) = &self.mock {
            mock.ensure_topic(topic, self.config.mock_partitions.get())?;
        }
        Ok(())
    }

    /// Sends one record and waits for its acknowledgement (at most `send_timeout`).
    pub async fn send(&self, record: &Record) -> Result<Delivery, SendError> {
        self.send_raw(record.as_raw()).await
    }

    /// [`Client::send`] for a record given as bytes.
    pub async fn send_raw(&self, record: RawRecord<'_>) -> Result<Delivery, SendError> {
        self.prepare_topic(record.topic)
            .map_err(|e| SendError::of_raw(record, e.to_string()))?;
        let result = self.producer.send_raw(record).await;
        self.tell_sent(record, &result);
        result
    }

    /// A `message.sent` telemetry event for a record the broker acknowledged.
    fn tell_sent(&self, record: RawRecord<'_>, result: &Result<Delivery, SendError>) {
        if let (Some(telemetry), Ok(delivery)) = (&self.telemetry, result) {
            telemetry.send(sent_event(record).landed(delivery));
        }
    }

    /// Sends `records` (all prepared) and reports each acknowledged one to telemetry.
    async fn send_prepared(&self, records: &[RawRecord<'_>]) -> Vec<Result<Delivery, SendError>> {
        let results = self.producer.send_batch(records).await;
        for (record, result) in records.iter().zip(&results) {
            self.tell_sent(*record, result);
        }
        results
    }

    /// Queues `record` at once and reports its outcome to `done` (see [`Producer::send_now`]);
    /// gives `done` back, with nothing sent, when the send must wait: use [`Client::send_raw`]
    /// then.
    pub fn send_now(&self, record: RawRecord<'_>, done: Done) -> Option<Done> {
        if let Err(e) = self.prepare_topic(record.topic) {
            done(Err(SendError::of_raw(record, e.to_string())));
            return None;
        }
        let done = match &self.telemetry {
            Some(telemetry) => {
                let (telemetry, event) = (telemetry.clone(), sent_event(record));
                Box::new(move |result: Result<Delivery, SendError>| {
                    if let Ok(delivery) = &result {
                        telemetry.send(event.landed(delivery));
                    }
                    done(result);
                })
            }
            None => done,
        };
        self.producer.send_now(record, done)
    }

    /// Sends every record at once and waits once (see [`Producer::send_batch`]): one result per
    /// record, in order. Records to a topic that could not be prepared fail; the others are sent.
    pub async fn send_batch(&self, records: &[RawRecord<'_>]) -> Vec<Result<Delivery, SendError>> {
        let mut unprepared: HashMap<&str, String> = HashMap::new();
        let mut prepared: HashSet<&str> = HashSet::new();
        for record in records {
            let topic = record.topic;
            if prepared.contains(topic) || unprepared.contains_key(topic) {
                continue;
            }
            match self.prepare_topic(topic) {
                Ok(()) => prepared.insert(topic),
                Err(e) => unprepared.insert(topic, e.to_string()).is_none(),
            };
        }
        if unprepared.is_empty() {
            return self.send_prepared(records).await;
        }
        let ready: Vec<RawRecord<'_>> = records
            .iter()
            .filter(|r| !unprepared.contains_key(r.topic))
            .copied()
            .collect();
        let mut sent = self.send_prepared(&ready).await.into_iter();
        records
            .iter()
            .map(|r| match unprepared.get(r.topic) {
                Some(reason) => Err(SendError::of_raw(*r, reason.clone())),
                None => sent.next().unwrap_or_else(|| {
                    Err(SendError::of_raw(*r, "no result for this record".into()))
                }),
            })
            .collect()
    }

    /// Subscribes the configured topics and returns the subscription's scheduler, built from this
    /// client's configuration, from which the caller's runners pull ready events; `notify` is
    /// called when events arrive while runners are idle. The caller closes the scheduler after
    /// `unsubscribe`.
    pub fn subscribe(
        &self,
        notify: impl Fn() + Send + Sync + 'static,
    ) -> Result<Arc<Scheduler>, KafkaError> {
        let mut slot = self
            .subscription
            .lock()
            .map_err(|_| KafkaError::Runtime("subscription state poisoned".into()))?;
        if slot.is_some() {
            return Err(KafkaError::AlreadySubscribed);
        }
        for topic in &self.config.subscribed_topics {
            self.prepare_topic(topic)?;
        }
        let dead_letters = match &self.config.failure_topic {
            Some(topic) => {
                self.prepare_topic(topic)?;
                Some(Arc::new(DeadLetters {
                    topic: topic.clone(),
                    group: self.config.group_id.clone().unwrap_or_default(),
                    producer: self.producer.clone(),
                }))
            }
            None => None,
        };
        let runtime = crate::runtime::handle().map_err(KafkaError::Runtime)?;
        let scheduler = Arc::new(Scheduler::with_config(FairConfig::from_config(
            &self.config,
        )));
        scheduler.set_notify(notify);
        let stores = self.stores()?;
        let deferral = self.deferral(stores.as_ref())?;
        let monopoly = self.monopolization(&scheduler, &runtime);
        let dedup = self.dedup(stores.as_ref())?;
        let engine = Arc::new(Engine {
            config: self.config.clone(),
            scheduler: scheduler.clone(),
            runtime: runtime.clone(),
            timers: stores.map(|s| s.timers),
            deferral,
            monopoly,
            policy: Policy::from_config(&self.config),
            dead_letters,
            filter: crate::filter::EventFilter::new(&self.config.allowed_events),
            dedup,
            skipped: self.skipped.clone(),
            spans: self.spans.clone(),
            telemetry: self.telemetry.clone(),
            partitions: Mutex::new(HashMap::new()),
            kafka_stats: Mutex::default(),
            clock: self.clock.clone(),
            failure: std::sync::OnceLock::new(),
        });
        // The probe server first: a port in use fails the subscribe before it joins the group.
        let probe = match self.config.effective_probe() {
            Some(addr) => Some(crate::probe::register(addr, engine.clone(), &runtime)?),
            None => None,
        };
        let prefetch = self.prefetch_per_partition();
        *slot = Some(Subscription::start(
            engine,
            &self.bootstrap,
            probe,
            prefetch,
        )?);
        scheduler.watch(&runtime);
        Ok(scheduler)
    }

    /// Records librdkafka may prefetch per partition when this client subscribes:
    /// `prefetch_records` shared by the partitions of the subscribed topics, as the cluster
    /// tells within [`PREFETCH_METADATA_WAIT`] (see [`crate::kafka::prefetch_share`]). Blocks.
    pub fn prefetch_per_partition(&self) -> u64 {
        let partitions: Option<usize> = self
            .config
            .subscribed_topics
            .iter()
            .map(|topic| self.producer.partition_count(topic, PREFETCH_METADATA_WAIT))
            .sum();
        if partitions.is_none() {
            tracing::debug!(
                "the partition count of {:?} is unknown; prefetching as if there were {}",
                self.config.subscribed_topics,
                crate::kafka::UNKNOWN_PARTITIONS
            );
        }
        crate::kafka::prefetch_share(self.config.prefetch_records.get(), partitions)
    }

    /// Whether timers (and deferred retry) can be used: in mock mode (memory) or with
    /// `cassandra_nodes`.
    pub fn timers_available(&self) -> bool {
        self.config.mock || !self.config.cassandra_nodes.is_empty()
    }

    /// The client's stores: in memory in mock mode; in Cassandra when `cassandra_nodes` is set
    /// (connecting and migrating once, on first use; blocks); `None` otherwise.
    pub fn stores(&self) -> Result<Option<Stores>, KafkaError> {
        if !self.timers_available() {
            return Ok(None);
        }
        if self.config.mock {
            return Ok(Some(Stores::memory()));
        }
        let mut cached = self
            .stores
            .lock()
            .map_err(|_| KafkaError::Timers("store state poisoned".into()))?;
        if let Some(stores) = cached.as_ref() {
            return Ok(Some(stores.clone()));
        }
        let config = self.config.clone();
        let runtime = crate::runtime::handle().map_err(KafkaError::Runtime)?;
        let stores = runtime
            .block_on(async move { Stores::cassandra(&config).await })
            .map_err(KafkaError::Timers)?;
        *cached = Some(stores.clone());
        Ok(Some(stores))
    }

    /// Deduplication, unless `idempotence_cache_size` is 0: built once per client (its cache
    /// serves later subscriptions too), with the client's store when it has one.
    fn dedup(&self, stores: Option<&Stores>) -> Result<Option<Arc<Dedup>>, KafkaError> {
        let config = &self.config;
        if config.idempotence_cache_size == 0 {
            return Ok(None);
        }
        let mut slot = self
            .dedup
            .lock()
            .map_err(|_| KafkaError::Runtime("dedup state poisoned".into()))?;
        if let Some(dedup) = slot.as_ref() {
            return Ok(Some(dedup.clone()));
        }
        if stores.is_none() {
            tracing::info!(
                "deduplication keeps message ids in memory only (no cassandra_nodes): a message \
                 redelivered after a restart is handled again"
            );
        }
        let dedup = Arc::new(Dedup::new(
            usize::try_from(config.idempotence_cache_size).unwrap_or(usize::MAX),
            config.idempotence_version.clone(),
            config.idempotence_ttl,
            stores.map(|s| s.dedup.clone()),
        ));
        *slot = Some(dedup.clone());
        Ok(Some(dedup))
    }

    /// Events finished without a handler call since this client was created, by reason.
    pub fn skipped(&self) -> &Skipped {
        &self.skipped
    }

    /// What the telemetry emitter did, when it runs.
    pub fn telemetry(&self) -> Option<&crate::telemetry::Counts> {
        self.telemetry.as_deref().map(|t| t.counts.as_ref())
    }

    /// Monopolization detection for a subscription (pipeline mode with
    /// `monopolization_enabled`), fed the handler time `scheduler` measures. The scheduler tells
    /// each batch on a runner's thread (a Ruby processor's, in the gem); a task on `runtime`
    /// records it, so that work stays off that thread. The task is owned by the scheduler: it
    /// ends once the scheduler, holding the only sender, is dropped.
    fn monopolization(
        &self,
        scheduler: &Scheduler,
        runtime: &tokio::runtime::Handle,
    ) -> Option<Arc<Monopolization>> {
        let config = &self.config;
        if config.mode != Mode::Pipeline || !config.monopolization_enabled {
            return None;
        }
        let monopoly = Arc::new(Monopolization::new(
            config.monopolization_window,
            config.monopolization_threshold,
            usize::try_from(config.monopolization_cache_size).unwrap_or(usize::MAX),
        ));
        let (batches, mut incoming) =
            tokio::sync::mpsc::unbounded_channel::<Vec<crate::scheduler::Charge>>();
        let observed = monopoly.clone();
        runtime.spawn(async move {
            while let Some(charges) = incoming.recv().await {
                observed.record(
                    charges
                        .iter()
                        .filter_map(|(key, secs, at)| key.as_ref().map(|k| (k, *secs, *at))),
                );
            }
        });
        scheduler.observe_usage(Arc::new(move |charges| {
            let _ = batches.send(charges);
        }));
        Some(monopoly)
    }

    /// Deferred retry for a subscription: in pipeline mode with `defer_enabled`, when a store is
    /// available.
    fn deferral(&self, stores: Option<&Stores>) -> Result<Option<Arc<Deferral>>, KafkaError> {
        let config = &self.config;
        let Some(stores) = stores else {
            if config.mode == Mode::Pipeline && config.defer_enabled {
                tracing::info!(
                    "deferred retry needs a store (cassandra_nodes, or mock: true); failing \
                     messages retry in place and hold their partition"
                );
            }
            return Ok(None);
        };
        if config.mode != Mode::Pipeline || !config.defer_enabled {
            return Ok(None);
        }
        let reloader = Reloader::start(
            &self.bootstrap,
            &crate::kafka::settings::properties(config, crate::kafka::settings::Side::Consumer),
            config.group_id.as_deref().unwrap_or_default(),
            config.defer_seek_timeout,
            config.defer_discard_threshold,
        )?;
        Ok(Some(Arc::new(Deferral {
            store: stores.defer.clone(),
            reloader,
            backoff: Backoff {
                base: config.defer_base,
                max: config.defer_max_delay,
            },
            gate: FailureRate::new(config.defer_failure_window, config.defer_failure_threshold),
            max_retries: config
                .defer_max_retries
                .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
            cache_size: usize::try_from(config.defer_cache_size).unwrap_or(usize::MAX),
        })))
    }

    /// Stops the subscription (drains, commits, leaves the group). A no-op when not subscribed.
    /// Reports, after stopping, a thread or task of the subscription that had died.
    pub fn unsubscribe(&self) -> Result<(), KafkaError> {
        let subscription = self.subscription.lock().ok().and_then(|mut s| s.take());
        let failure = subscription.and_then(Subscription::shutdown);
        // Spans and telemetry events of the subscription's last events leave now, not at the
        // next batch (the process may exit right after).
        crate::spans::flush();
        if let Some(telemetry) = &self.telemetry {
            telemetry.flush(self.config.send_timeout);
        }
        match failure {
            Some(failure) => Err(KafkaError::EngineFailed(failure)),
            None => Ok(()),
        }
    }

    /// The consumer's lifecycle state.
    pub fn consumer_state(&self) -> ConsumerState {
        if self.with_subscription(|_| true) {
            ConsumerState::Running
        } else if self.config.can_consume() {
            ConsumerState::Configured
        } else {
            ConsumerState::Unconfigured
        }
    }

    /// Whether an assigned partition has an unfinished message older than `stall_threshold`
    /// (false when not subscribed).
    pub fn is_stalled(&self) -> bool {
        self.with_subscription(Subscription::is_stalled)
    }

    /// Test support: makes the subscription's poll thread panic, as a bug would. Returns false
    /// when not subscribed.
    pub fn inject_fault(&self) -> bool {
        self.with_subscription(|s| {
            s.inject_fault();
            true
        })
    }

    /// Test support: moves this client's timer clock `seconds` forward (see
    /// [`crate::timers::Clock`]); returns the move's number.
    pub fn advance_timers(&self, seconds: i64) -> u64 {
        self.clock.advance(seconds)
    }

    /// Test support: whether the subscription acted on move `number` of the timer clock in
    /// every assigned partition and has nothing in flight (false when not subscribed).
    pub fn timers_caught_up(&self, number: u64) -> bool {
        self.with_subscription(|s| s.engine().timers_caught_up(number))
    }

    /// Test support: see [`Engine::settled`] (false when not subscribed).
    pub fn settled(&self, high: &[(String, i32, i64)]) -> bool {
        self.with_subscription(|s| s.engine().settled(high))
    }

    /// What `f` says of the running subscription; the default (false, 0) when not subscribed.
    fn with_subscription<T: Default>(&self, f: impl FnOnce(&Subscription) -> T) -> T {
        self.subscription
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(f))
            .unwrap_or_default()
    }

    /// Partitions currently assigned (0 when not subscribed).
    pub fn assigned_partitions(&self) -> usize {
        self.with_subscription(Subscription::assigned_partitions)
    }
}

/// The `message.sent` telemetry event of `record` (where it landed is set on acknowledgement,
/// see [`Event::landed`](crate::telemetry::Event::landed)); its trace is the one the record's
/// headers name, if any.
fn sent_event(record: RawRecord<'_>) -> crate::telemetry::Event {
    crate::telemetry::Event::new(
        crate::telemetry::Kind::MessageSent,
        Arc::from(record.topic),
        record.partition.unwrap_or(-1),
        record.key.map(crate::event::Key::from),
        &crate::spans::extract(record.headers),
    )
}

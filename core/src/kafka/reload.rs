//! Re-reading deferred messages from Kafka by offset.
//!
//! One reader thread per subscription owns a consumer that is not part of the group (it never
//! commits; it only assigns). A request names one partition and the offsets wanted, lowest
//! first; the reader reads them in one forward pass: it seeks (re-assigns) only when the next
//! wanted offset is behind its position or more than `defer_discard_threshold` records ahead,
//! and otherwise reads on, discarding what is not wanted. So the contiguous or nearby offsets of
//! many keys come back from one fetch stream. An offset that the log no longer holds (deleted by
//! retention, compacted away) is reported [`Fetched::Gone`]: the reader saw a later record, or
//! the end of the partition, instead.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::oneshot;

use super::KafkaError;

/// How long the reader waits for a request before checking whether it should stop.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// One wanted offset's result.
#[derive(Debug)]
pub enum Fetched {
    /// The record as stored.
    Found(OwnedMessage),
    /// The log no longer holds this offset.
    Gone(i64),
}

/// A request to the reader thread.
struct Request {
    topic: Arc<str>,
    partition: i32,
    /// Ascending, without duplicates.
    offsets: Vec<i64>,
    reply: oneshot::Sender<Result<Vec<Fetched>, String>>,
}

/// The reader of a subscription. Its subscription stops it ([`stop`](Self::stop)) once the
/// partition workers are gone; dropping it also disconnects the thread (it ends at once, or
/// after the read it is doing).
pub struct Reloader {
    requests: Mutex<Option<mpsc::Sender<Request>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Reloader {
    /// Starts the reader thread against `bootstrap`, with `properties` (see
    /// [`super::settings`]).
    pub fn start(
        bootstrap: &str,
        properties: &[(String, String)],
        group: &str,
        timeout: Duration,
        discard_threshold: u64,
    ) -> Result<Self, KafkaError> {
        let mut settings = ClientConfig::new();
        settings
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("{group}.prosody-reload"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            // A reader waits for the records it asked for: a fetch that finds nothing new (at
            // the end of the partition) must not hold the next seek's fetch for 500 ms.
            .set("fetch.wait.max.ms", "10")
            .set("fetch.queue.backoff.ms", "1");
        super::settings::apply(&mut settings, properties);
        let consumer: BaseConsumer<ReaderContext> = settings
            .create_with_context(ReaderContext)
            .map_err(|source| KafkaError::Create {
                what: "deferred message reader",
                source,
            })?;
        let (requests, inbox) = mpsc::channel::<Request>();
        let reader = Reader {
            consumer,
            position: None,
            timeout,
            discard_threshold: i64::try_from(discard_threshold).unwrap_or(i64::MAX),
        };
        let thread = std::thread::Builder::new()
            .name("prosody-reload".into())
            .spawn(move || reader.run(&inbox))
            .map_err(|source| KafkaError::Thread {
                what: "deferred message reader",
                source,
            })?;
        Ok(Self {
            requests: Mutex::new(Some(requests)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Reads `offsets` (ascending) of one partition: one result per offset, in order, or an
    /// error when the reader could not finish within `defer_seek_timeout`.
    pub async fn fetch(
        &self,
        topic: Arc<str>,
        partition: i32,
        offsets: Vec<i64>,
    ) -> Result<Vec<Fetched>, String> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            topic,
            partition,
            offsets,
            reply,
        };
        let requests = self
            .requests
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .ok_or("the deferred message reader stopped")?;
        requests
            .send(request)
            .map_err(|_| "the deferred message reader stopped".to_owned())?;
        answer
            .await
            .map_err(|_| "the deferred message reader stopped".to_owned())?
    }

    /// Stops the thread and waits for it (and its librdkafka consumer) to end.
    pub fn stop(&self) {
        if let Ok(mut requests) = self.requests.lock() {
            requests.take();
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Reloader {
    fn drop(&mut self) {
        // Disconnecting is enough: the thread ends without being waited for (this may run on a
        // runtime thread).
        if let Ok(mut requests) = self.requests.lock() {
            requests.take();
        }
    }
}

/// The reader's librdkafka callbacks: its log lines as usual; the end of a partition, which
/// the reader asks for, is not an error.
struct ReaderContext;

impl ClientContext for ReaderContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        super::log_librdkafka(level, facility, message);
    }

    fn error(&self, error: RdKafkaError, reason: &str) {
        let end = matches!(
            error,
            RdKafkaError::PartitionEOF(_) | RdKafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !end {
            super::log_client_error(&error, reason);
        }
    }
}

impl ConsumerContext for ReaderContext {}

struct Reader {
    consumer: BaseConsumer<ReaderContext>,
    /// The partition assigned and the offset the next record will have.
    position: Option<(Arc<str>, i32, i64)>,
    timeout: Duration,
    discard_threshold: i64,
}

impl Reader {
    fn run(mut self, inbox: &mpsc::Receiver<Request>) {
        // Connects to the cluster before the first request needs it (a cold first read waited
        // about a second for its metadata and connection).
        let _ = self.consumer.fetch_metadata(None, Duration::from_secs(5));
        loop {
            match inbox.recv_timeout(IDLE_POLL) {
                Ok(request) => {
                    let result = self.read(&request.topic, request.partition, &request.offsets);
                    if result.is_err() {
                        // Start from a clean seek next time.
                        self.position = None;
                    }
                    let _ = request.reply.send(result);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn seek(&mut self, topic: &Arc<str>, partition: i32, offset: i64) -> Result<(), String> {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, partition, Offset::Offset(offset))
            .map_err(|e| e.to_string())?;
        self.consumer.assign(&list).map_err(|e| e.to_string())?;
        self.position = Some((topic.clone(), partition, offset));
        Ok(())
    }

    fn read(
        &mut self,
        topic: &Arc<str>,
        partition: i32,
        wanted: &[i64],
    ) -> Result<Vec<Fetched>, String> {
        // `defer_seek_timeout` bounds the wait for each wanted offset, not the whole request.
        let mut deadline = Instant::now() + self.timeout;
        let mut out = Vec::with_capacity(wanted.len());
        let mut next = 0;
        // An end of partition seen since the last seek without a record in between.
        let mut at_end = false;
        while next < wanted.len() {
            let target = wanted[next];
            let reusable = match &self.position {
                Some((t, p, at)) => {
                    t == topic
                        && *p == partition
                        && *at <= target
                        && target - *at <= self.discard_threshold
                }
                None => false,
            };
            if !reusable {
                self.seek(topic, partition, target)?;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "could not read offset {target} of topic={topic} partition={partition} within \
                     defer_seek_timeout ({:?})",
                    self.timeout
                ));
            }
            let before = next;
            match self.consumer.poll(left.min(IDLE_POLL)) {
                None => {}
                Some(Ok(record)) => {
                    if record.topic() != &**topic || record.partition() != partition {
                        continue;
                    }
                    at_end = false;
                    let offset = record.offset();
                    self.position = Some((topic.clone(), partition, offset + 1));
                    while next < wanted.len() && wanted[next] < offset {
                        out.push(Fetched::Gone(wanted[next]));
                        next += 1;
                    }
                    if next < wanted.len() && wanted[next] == offset {
                        out.push(Fetched::Found(record.detach()));
                        next += 1;
                    }
                }
                Some(Err(RdKafkaError::PartitionEOF(p))) if p == partition => {
                    let (low, high) = self
                        .consumer
                        .fetch_watermarks(topic, partition, left.min(Duration::from_secs(5)))
                        .map_err(|e| e.to_string())?;
                    // Below the log start (retention, DeleteRecords), past its end, or, after a
                    // second end of partition since a fresh seek (the first may belong to an
                    // earlier read), removed from the middle (compaction): not there.
                    let gone_below = if target >= high {
                        i64::MAX
                    } else if target < low {
                        low
                    } else if at_end {
                        high
                    } else {
                        i64::MIN
                    };
                    while next < wanted.len() && wanted[next] < gone_below {
                        out.push(Fetched::Gone(wanted[next]));
                        next += 1;
                    }
                    if next == before {
                        at_end = true;
                        // Read again from the target to see whether the end was this read's.
                        self.position = None;
                    }
                }
                Some(Err(e)) => tracing::debug!("deferred message reader: {e}"),
            }
            if next > before {
                deadline = Instant::now() + self.timeout;
                at_end = false;
            }
        }
        Ok(out)
    }
}

//! Deterministic simulations of the fair scheduler on paused tokio time: runners take jobs,
//! "run" them by sleeping for a simulated handler time, and release their permits. Nothing here
//! depends on the machine's speed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prosody_core::handler::{Finished, Job, Outcome};
use prosody_core::scheduler::{Class, FairConfig, Scheduler, Take};
use tokio::sync::mpsc;
use tokio::time::Instant;

fn job(key: &str, done: &mpsc::UnboundedSender<Finished>, class: Class) -> Job {
    prosody_core::testing::timer_job(&Arc::from(key.as_bytes()), done, class)
}

/// One run of a job: its key, class, when it became ready (as the submitter recorded it) and when
/// it was granted.
#[derive(Debug, Clone)]
struct Grant {
    key: String,
    class: Class,
    granted: Instant,
    ran: Duration,
}

/// Runs `runners` runners until `until`; a job of key `k` runs for `cost(k)`.
async fn run_runners(
    scheduler: Arc<Scheduler>,
    runners: usize,
    until: Instant,
    cost: Arc<dyn Fn(&str) -> Duration + Send + Sync>,
) -> Vec<Grant> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..runners {
        let scheduler = scheduler.clone();
        let log = log.clone();
        let cost = cost.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                match scheduler.take() {
                    Take::Job(job, grant) => {
                        let key = String::from_utf8_lossy(job.key().as_deref().unwrap_or_default())
                            .into_owned();
                        let ran = cost(&key);
                        let granted = Instant::now();
                        tokio::time::sleep(ran).await;
                        drop(grant);
                        log.lock().unwrap().push(Grant {
                            key,
                            class: job.class,
                            granted,
                            ran,
                        });
                    }
                    Take::Empty => tokio::time::sleep(Duration::from_millis(1)).await,
                    Take::Closed => return,
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let out = log.lock().unwrap().clone();
    out
}

fn config(max_concurrency: usize) -> FairConfig {
    FairConfig {
        max_concurrency,
        ..FairConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_hot_key_cannot_starve_cold_keys() {
    let scheduler = Arc::new(Scheduler::with_config(config(2)));
    let (done, _rx) = mpsc::unbounded_channel();
    for _ in 0..2_000 {
        scheduler.submit(job("hot", &done, Class::Fresh));
    }
    let start = Instant::now();
    let cost: Arc<dyn Fn(&str) -> Duration + Send + Sync> = Arc::new(|_| Duration::from_millis(10));
    // The hot key has the runners to itself for a second, then 100 cold keys arrive.
    let runners = tokio::spawn(run_runners(
        scheduler.clone(),
        2,
        start + Duration::from_secs(4),
        cost,
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cold_at = Instant::now();
    for i in 0..100 {
        scheduler.submit(job(&format!("cold-{i}"), &done, Class::Fresh));
    }
    let grants = runners.await.unwrap();
    let cold: Vec<&Grant> = grants.iter().filter(|g| g.key != "hot").collect();
    assert_eq!(cold.len(), 100, "every cold key ran");
    let longest = cold
        .iter()
        .map(|g| g.granted - cold_at)
        .max()
        .unwrap_or_default();
    // 100 jobs of 10 ms on 2 runners take 500 ms; in arrival order they would wait behind
    // ~1,900 hot jobs (9.5 s).
    assert!(
        longest <= Duration::from_millis(520),
        "the last cold key waited {longest:?}"
    );
    let hot_during = grants
        .iter()
        .filter(|g| g.key == "hot" && g.granted >= cold_at && g.granted < cold_at + longest)
        .count();
    assert!(
        hot_during <= 2,
        "{hot_during} hot jobs went before the cold keys were served"
    );
    // And the hot key is not starved either: it runs again once the cold keys are done.
    assert!(grants
        .iter()
        .any(|g| g.key == "hot" && g.granted > cold_at + longest));
}

#[tokio::test(start_paused = true)]
async fn during_a_failure_storm_fresh_events_keep_about_70_percent() {
    let scheduler = Arc::new(Scheduler::with_config(config(4)));
    let (done, _rx) = mpsc::unbounded_channel();
    // More of both than 20 s of 4 runners can serve: 100 s of fresh work, 250 s of retries.
    for i in 0..20_000 {
        if i < 5_000 {
            scheduler.submit(job(&format!("retry-{i}"), &done, Class::Retry));
        }
        scheduler.submit(job(&format!("fresh-{i}"), &done, Class::Fresh));
    }
    let start = Instant::now();
    // Retries are slow (a failing dependency times out); fresh events are quick.
    let cost: Arc<dyn Fn(&str) -> Duration + Send + Sync> = Arc::new(|k: &str| {
        if k.starts_with("retry") {
            Duration::from_millis(50)
        } else {
            Duration::from_millis(5)
        }
    });
    let grants = run_runners(scheduler.clone(), 4, start + Duration::from_secs(20), cost).await;
    let time = |class: Class| -> f64 {
        grants
            .iter()
            .filter(|g| g.class == class)
            .map(|g| g.ran.as_secs_f64())
            .sum()
    };
    let fresh = time(Class::Fresh);
    let retry = time(Class::Retry);
    let share = fresh / (fresh + retry);
    assert!(
        (0.66..=0.74).contains(&share),
        "fresh events got {:.1}% of handler time",
        share * 100.0
    );
    // Retries still progress.
    assert!(grants.iter().filter(|g| g.class == Class::Retry).count() > 100);
}

#[tokio::test(start_paused = true)]
async fn retries_get_everything_when_nothing_fresh_waits() {
    let scheduler = Arc::new(Scheduler::with_config(config(4)));
    let (done, _rx) = mpsc::unbounded_channel();
    for i in 0..400 {
        scheduler.submit(job(&format!("retry-{i}"), &done, Class::Retry));
    }
    let start = Instant::now();
    let cost: Arc<dyn Fn(&str) -> Duration + Send + Sync> = Arc::new(|_| Duration::from_millis(10));
    let grants = run_runners(scheduler.clone(), 4, start + Duration::from_secs(2), cost).await;
    // 4 runners x 2 s / 10 ms = 800 possible; all 400 ran, back to back.
    assert_eq!(grants.len(), 400);
    let last = grants.iter().map(|g| g.granted - start).max().unwrap();
    assert!(last <= Duration::from_millis(1_000), "{last:?}");
}

#[tokio::test(start_paused = true)]
async fn the_longest_wait_stays_bounded_by_max_wait() {
    let max_wait = Duration::from_secs(10);
    let scheduler = Arc::new(Scheduler::with_config(FairConfig {
        max_concurrency: 1,
        max_wait,
        ..FairConfig::default()
    }));
    let (done, _rx) = mpsc::unbounded_channel();
    // The heavy key first uses 100 s of handler time: a large virtual time.
    scheduler.submit(job("heavy", &done, Class::Fresh));
    let cost: Arc<dyn Fn(&str) -> Duration + Send + Sync> = Arc::new(|k: &str| {
        if k == "heavy" {
            Duration::from_secs(100)
        } else {
            Duration::from_millis(10)
        }
    });
    let start = Instant::now();
    let runner = tokio::spawn(run_runners(
        scheduler.clone(),
        1,
        start + Duration::from_secs(150),
        cost,
    ));
    tokio::time::sleep(Duration::from_secs(101)).await;
    // Now it waits again while fresh keys (virtual time 0) arrive faster than they can run.
    for i in 0..4 {
        scheduler.submit(job(&format!("cold-first-{i}"), &done, Class::Fresh));
    }
    let heavy_ready = Instant::now();
    scheduler.submit(job("heavy", &done, Class::Fresh));
    let feeder = {
        let scheduler = scheduler.clone();
        let done = done.clone();
        tokio::spawn(async move {
            for i in 0..3_000 {
                scheduler.submit(job(&format!("cold-{i}"), &done, Class::Fresh));
                scheduler.submit(job(&format!("cold-b-{i}"), &done, Class::Fresh));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let grants = runner.await.unwrap();
    feeder.await.unwrap();
    let second = grants
        .iter()
        .filter(|g| g.key == "heavy")
        .nth(1)
        .expect("the heavy key ran again");
    let waited = second.granted - heavy_ready;
    assert!(
        waited <= max_wait + Duration::from_millis(20),
        "the heavy key waited {waited:?}"
    );
    // Its large virtual time did hold it back for a while (the boost, not arrival order, let it in).
    assert!(
        waited >= max_wait / 4,
        "the heavy key waited only {waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn permits_bound_concurrency_and_return_on_release() {
    let scheduler = Scheduler::with_config(config(2));
    let (done, _rx) = mpsc::unbounded_channel();
    for i in 0..3 {
        scheduler.submit(job(&format!("k{i}"), &done, Class::Fresh));
    }
    let a = scheduler.take();
    let b = scheduler.take();
    assert!(matches!(a, Take::Job(..)) && matches!(b, Take::Job(..)));
    assert!(matches!(scheduler.take(), Take::Empty), "only two permits");
    drop(a);
    assert!(matches!(scheduler.take(), Take::Job(..)));
}

/// Counts the scheduler's wake-ups of idle runners; the returned function reads the count.
fn counting_wakes(scheduler: &Scheduler) -> impl Fn() -> usize {
    let wakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&wakes);
    scheduler.set_notify(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    move || wakes.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(start_paused = true)]
async fn a_release_wakes_a_runner_that_found_every_permit_out_and_only_then() {
    let scheduler = Scheduler::with_config(config(2));
    let count = counting_wakes(&scheduler);
    let (done, _rx) = mpsc::unbounded_channel();
    for i in 0..4 {
        scheduler.submit(job(&format!("k{i}"), &done, Class::Fresh));
    }
    let Take::Job(_a, grant_a) = scheduler.take() else {
        panic!("a job")
    };
    let Take::Job(_b, grant_b) = scheduler.take() else {
        panic!("a job")
    };
    // A release while a permit is still free to take is only noted: no wake, and the next take
    // applies it.
    drop(grant_a);
    assert_eq!(count(), 0, "nobody waits for a permit");
    let Take::Job(_c, grant_c) = scheduler.take() else {
        panic!("the released permit is taken again")
    };
    // Every permit out: the runner goes idle, and the next release wakes it at once.
    assert!(matches!(scheduler.take(), Take::Empty), "only two permits");
    drop(grant_b);
    assert_eq!(count(), 1, "the waiting runner is woken by the release");
    assert_eq!(
        scheduler.load(),
        (1, 1),
        "the permit is back without a take"
    );
    let Take::Job(_d, grant_d) = scheduler.take() else {
        panic!("the last job")
    };
    drop(grant_c);
    drop(grant_d);
    assert_eq!(count(), 1, "nothing waits: no more wakes");
    assert_eq!(scheduler.load(), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_submit_wakes_a_runner_that_found_nothing_once_and_not_while_every_permit_is_out() {
    let scheduler = Scheduler::with_config(config(1));
    let count = counting_wakes(&scheduler);
    let (done, _rx) = mpsc::unbounded_channel();
    assert!(matches!(scheduler.take(), Take::Empty), "nothing yet");
    scheduler.submit(job("k0", &done, Class::Fresh));
    assert_eq!(count(), 1, "the idle runner is woken");
    scheduler.submit(job("k1", &done, Class::Fresh));
    assert_eq!(count(), 1, "once: it has not looked again yet");
    assert_eq!(scheduler.load(), (0, 2), "submitted jobs count as ready");
    let Take::Job(_a, grant) = scheduler.take() else {
        panic!("a job")
    };
    assert!(matches!(scheduler.take(), Take::Empty), "one permit");
    scheduler.submit(job("k2", &done, Class::Fresh));
    assert_eq!(count(), 1, "every permit is out: a submit does not wake");
    drop(grant);
    assert_eq!(count(), 2, "the release that frees one does");
    for _ in 0..2 {
        let Take::Job(..) = scheduler.take() else {
            panic!("the waiting jobs run")
        };
    }
    assert!(matches!(scheduler.take(), Take::Empty));
}

/// Real threads, ping-pong: a submitter submits one job and waits until a runner took it; the
/// runner sleeps whenever a take finds nothing and is woken only by the notifier. Every round
/// opens the window between a runner's empty take and its sleep: a wake-up lost there leaves
/// the job ready with the runner asleep, and the submitter gives up after seconds.
#[test]
fn no_wake_up_is_lost_between_a_submitter_and_a_runner() {
    const ROUNDS: usize = 20_000;
    let scheduler = Arc::new(Scheduler::with_config(config(4)));
    let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let runner_thread = Arc::new(Mutex::new(None::<std::thread::Thread>));
    {
        let runner_thread = Arc::clone(&runner_thread);
        scheduler.set_notify(move || {
            if let Some(t) = runner_thread.lock().unwrap().as_ref() {
                t.unpark();
            }
        });
    }
    let runner = {
        let scheduler = Arc::clone(&scheduler);
        let taken = Arc::clone(&taken);
        let runner_thread = Arc::clone(&runner_thread);
        std::thread::spawn(move || {
            *runner_thread.lock().unwrap() = Some(std::thread::current());
            loop {
                match scheduler.take() {
                    Take::Job(job, grant) => {
                        drop((job, grant));
                        taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Take::Empty => std::thread::park_timeout(Duration::from_secs(60)),
                    Take::Closed => return,
                }
            }
        })
    };
    while runner_thread.lock().unwrap().is_none() {
        std::thread::yield_now();
    }
    let (done, _rx) = mpsc::unbounded_channel();
    for round in 0..ROUNDS {
        scheduler.submit(job(&format!("k{}", round % 7), &done, Class::Fresh));
        let since = std::time::Instant::now();
        while taken.load(std::sync::atomic::Ordering::SeqCst) <= round {
            assert!(
                since.elapsed() < Duration::from_secs(5),
                "a wake-up was lost in round {round}: the job is ready, the runner asleep"
            );
            std::thread::yield_now();
        }
    }
    scheduler.close();
    runner.join().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_handler_past_its_timeout_is_cancelled_then_quarantined() {
    let scheduler = Scheduler::with_config(FairConfig {
        max_concurrency: 1,
        timeout: Duration::from_secs(1),
        grace: Duration::from_secs(2),
        ..FairConfig::default()
    });
    let (done, mut rx) = mpsc::unbounded_channel();
    scheduler.submit(job("stuck", &done, Class::Fresh));
    scheduler.submit(job("next", &done, Class::Fresh));
    let Take::Job(stuck, grant) = scheduler.take() else {
        panic!("a job")
    };
    tokio::time::sleep(Duration::from_millis(900)).await;
    scheduler.check_deadlines();
    assert!(!stuck.cancel.is_cancelled());
    tokio::time::sleep(Duration::from_millis(200)).await;
    scheduler.check_deadlines();
    assert!(stuck.cancel.is_cancelled(), "cancelled at the timeout");
    assert!(
        matches!(scheduler.take(), Take::Empty),
        "the permit is still held"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    scheduler.check_deadlines();
    let notice = rx.try_recv().expect("the worker is told");
    assert_eq!(notice.outcome, Outcome::Quarantined);
    assert_eq!(notice.key.as_deref(), Some("stuck".as_bytes()));
    let Take::Job(next, _g) = scheduler.take() else {
        panic!("the permit was released to the next key")
    };
    assert_eq!(next.key().as_deref(), Some("next".as_bytes()));
    // The stuck handler finally returns: its grant is released without giving back a second
    // permit.
    drop(grant);
    assert_eq!(scheduler.load(), (1, 0));
}

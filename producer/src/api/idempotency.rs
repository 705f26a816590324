//! The write API's memory of `Idempotency-Key`s: which keys are being served, which
//! succeeded and with what answer, for how long. Synchronous and free of I/O (the clock is
//! passed in), so its guarantees are tested without a server.
//!
//! Talks to nothing; [`super`] wraps it in a mutex and waits on the `watch` channels it
//! hands out.
//!
//! ## Invariants
//!
//! - A key is run by at most one caller at a time: a second caller of a running key gets a
//!   receiver that wakes when the first finishes, then looks again.
//! - A key whose first run succeeded answers every later lookup within `window` of that
//!   success with that run's value, never a later one; nothing runs again.
//! - A failed (or abandoned) run leaves nothing behind: the next lookup runs.
//! - At most `max_keys` keys are held; when full, the oldest success is forgotten first, and
//!   when every held key is still running, a new key is refused ([`Lookup::Busy`]), never
//!   run without the guarantee.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What a lookup found.
#[derive(Debug)]
pub(crate) enum Lookup<V> {
    /// Nobody ran the key (or its run failed): run it, then [`Cache::finish`] the ticket.
    Run(u64),
    /// The key succeeded before: its first value.
    Replay(V),
    /// The key is running: wait until the receiver's sender is gone, then look again.
    Wait(watch::Receiver<()>),
    /// Every held key is running; nothing can be forgotten to make room.
    Busy,
}

#[derive(Debug)]
enum Entry<V> {
    Running {
        ticket: u64,
        /// Dropped when the run ends: wakes the waiters.
        _done: watch::Sender<()>,
    },
    Done {
        ticket: u64,
        value: V,
    },
}

/// The keys and their outcomes; see the module documentation.
#[derive(Debug)]
pub(crate) struct Cache<V> {
    window: Duration,
    max_keys: usize,
    entries: HashMap<String, Entry<V>>,
    /// Successes in the order they happened (key, ticket, when): expiry and eviction take
    /// from the front. An item whose entry has another ticket is stale and skipped.
    done: VecDeque<(String, u64, Instant)>,
    next_ticket: u64,
}

impl<V: Clone> Cache<V> {
    /// Remembers successes for `window`, at most `max_keys` keys (at least 1).
    pub(crate) fn new(window: Duration, max_keys: usize) -> Cache<V> {
        Cache {
            window,
            max_keys: max_keys.max(1),
            entries: HashMap::new(),
            done: VecDeque::new(),
            next_ticket: 1,
        }
    }

    /// Keys held (running or succeeded, not yet expired at the last lookup).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// What to do with `key` at `now`.
    pub(crate) fn lookup(&mut self, key: &str, now: Instant) -> Lookup<V> {
        self.expire(now);
        match self.entries.get(key) {
            Some(Entry::Done { value, .. }) => return Lookup::Replay(value.clone()),
            Some(Entry::Running { _done, .. }) => return Lookup::Wait(_done.subscribe()),
            None => {}
        }
        if self.entries.len() >= self.max_keys && !self.forget_oldest() {
            return Lookup::Busy;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let (tx, _) = watch::channel(());
        self.entries
            .insert(key.to_owned(), Entry::Running { ticket, _done: tx });
        Lookup::Run(ticket)
    }

    /// Ends the run `ticket` of `key`: a success (`Some`) is remembered from `now`, a failure
    /// (`None`) forgotten. Waiters wake either way. A ticket that is not the key's running
    /// one changes nothing.
    pub(crate) fn finish(&mut self, key: &str, ticket: u64, value: Option<V>, now: Instant) {
        if !matches!(self.entries.get(key), Some(Entry::Running { ticket: t, .. }) if *t == ticket)
        {
            return;
        }
        match value {
            Some(value) => {
                self.entries
                    .insert(key.to_owned(), Entry::Done { ticket, value });
                self.done.push_back((key.to_owned(), ticket, now));
            }
            None => {
                self.entries.remove(key);
            }
        }
    }

    /// Drops successes older than the window.
    fn expire(&mut self, now: Instant) {
        while let Some((_, _, at)) = self.done.front() {
            if now.saturating_duration_since(*at) < self.window {
                break;
            }
            if let Some((key, ticket, _)) = self.done.pop_front() {
                self.remove_done(&key, ticket);
            }
        }
    }

    /// Forgets the oldest success; `false` when there is none.
    fn forget_oldest(&mut self) -> bool {
        while let Some((key, ticket, _)) = self.done.pop_front() {
            if self.remove_done(&key, ticket) {
                return true;
            }
        }
        false
    }

    fn remove_done(&mut self, key: &str, ticket: u64) -> bool {
        if matches!(self.entries.get(key), Some(Entry::Done { ticket: t, .. }) if *t == ticket) {
            self.entries.remove(key);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const WINDOW: Duration = Duration::from_secs(120);

    #[test]
    fn a_success_is_replayed_within_the_window_and_forgotten_after() {
        let t0 = Instant::now();
        let mut c = Cache::new(WINDOW, 10);
        let Lookup::Run(t) = c.lookup("k", t0) else {
            panic!("first lookup runs")
        };
        let Lookup::Wait(rx) = c.lookup("k", t0) else {
            panic!("a running key waits")
        };
        c.finish("k", t, Some("receipt-1"), t0);
        // The waiter wakes: its sender is gone.
        assert!(rx.has_changed().is_err());
        assert!(matches!(
            c.lookup("k", t0 + WINDOW - Duration::from_millis(1)),
            Lookup::Replay("receipt-1")
        ));
        assert!(matches!(c.lookup("k", t0 + WINDOW), Lookup::Run(_)));
    }

    #[test]
    fn a_failure_is_not_remembered_and_a_stale_ticket_changes_nothing() {
        let t0 = Instant::now();
        let mut c = Cache::new(WINDOW, 10);
        let Lookup::Run(t1) = c.lookup("k", t0) else {
            panic!()
        };
        c.finish("k", t1, None, t0);
        assert_eq!(c.len(), 0);
        let Lookup::Run(t2) = c.lookup("k", t0) else {
            panic!("runs again after a failure")
        };
        c.finish("k", t1, Some("stale"), t0);
        assert!(matches!(c.lookup("k", t0), Lookup::Wait(_)));
        c.finish("k", t2, Some("second"), t0);
        assert!(matches!(c.lookup("k", t0), Lookup::Replay("second")));
    }

    #[test]
    fn when_full_the_oldest_success_goes_and_running_keys_are_never_dropped() {
        let t0 = Instant::now();
        let mut c = Cache::new(WINDOW, 2);
        let Lookup::Run(a) = c.lookup("a", t0) else {
            panic!()
        };
        let Lookup::Run(b) = c.lookup("b", t0) else {
            panic!()
        };
        assert!(matches!(c.lookup("c", t0), Lookup::Busy));
        c.finish("a", a, Some(1), t0);
        c.finish("b", b, Some(2), t0 + Duration::from_secs(1));
        assert!(matches!(c.lookup("c", t0), Lookup::Run(_)));
        assert_eq!(c.len(), 2);
        // "a" was the oldest success; then "b" goes to make room for "a" again.
        assert!(matches!(c.lookup("b", t0), Lookup::Replay(2)));
        assert!(matches!(c.lookup("a", t0), Lookup::Run(_)));
        assert_eq!(c.len(), 2);
        // "a" and "c" run: nothing can be forgotten.
        assert!(matches!(c.lookup("b", t0), Lookup::Busy));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Lookup(u8),
        Succeed(u8),
        Fail(u8),
        Advance(u16),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                (0u8..6).prop_map(Op::Lookup),
                (0u8..6).prop_map(Op::Succeed),
                (0u8..6).prop_map(Op::Fail),
                (0u16..200).prop_map(Op::Advance),
            ],
            0..200,
        )
    }

    proptest! {
        /// Against a model without a size limit: runs never overlap per key, a success is
        /// replayed (its own value) exactly while its window lasts, a failure is forgotten.
        #[test]
        fn the_cache_follows_the_model(ops in ops()) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut c = Cache::new(WINDOW, usize::MAX);
            // key -> (running ticket) / (value, succeeded at)
            let mut running: BTreeMap<String, u64> = BTreeMap::new();
            let mut done: BTreeMap<String, (u64, Instant)> = BTreeMap::new();
            let mut value = 0u64;
            for op in ops {
                match op {
                    Op::Advance(s) => now += Duration::from_secs(u64::from(s)),
                    Op::Lookup(k) => {
                        let key = k.to_string();
                        let live = done.get(&key).filter(|(_, at)| now - *at < WINDOW).copied();
                        match c.lookup(&key, now) {
                            Lookup::Run(t) => {
                                prop_assert!(live.is_none() && !running.contains_key(&key));
                                done.remove(&key);
                                running.insert(key, t);
                            }
                            Lookup::Replay(v) => prop_assert_eq!(Some(v), live.map(|l| l.0)),
                            Lookup::Wait(_) => prop_assert!(running.contains_key(&key)),
                            Lookup::Busy => prop_assert!(false, "no limit, never busy"),
                        }
                    }
                    Op::Succeed(k) | Op::Fail(k) => {
                        let key = k.to_string();
                        if let Some(t) = running.remove(&key) {
                            value += 1;
                            let ok = matches!(op, Op::Succeed(_));
                            c.finish(&key, t, ok.then_some(value), now);
                            if ok {
                                done.insert(key, (value, now));
                            }
                        }
                    }
                }
            }
        }

        /// With a small limit: never more keys than the limit, and a running key is never
        /// run a second time.
        #[test]
        fn the_limit_holds_and_runs_never_overlap(ops in ops(), max in 1usize..4) {
            let mut now = Instant::now();
            let mut c = Cache::new(WINDOW, max);
            let mut running: BTreeMap<String, u64> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Advance(s) => now += Duration::from_secs(u64::from(s)),
                    Op::Lookup(k) => {
                        let key = k.to_string();
                        if let Lookup::Run(t) = c.lookup(&key, now) {
                            prop_assert!(running.insert(key, t).is_none());
                        }
                    }
                    Op::Succeed(k) | Op::Fail(k) => {
                        let key = k.to_string();
                        if let Some(t) = running.remove(&key) {
                            c.finish(&key, t, matches!(op, Op::Succeed(_)).then_some(1), now);
                        }
                    }
                }
                prop_assert!(c.len() <= max);
            }
        }
    }
}

//! Sends this process decided whose record a batch's store read may not
//! show, so that the frequency cap counts them (the next batch of the same
//! channel, claimed while this one sends, or another channel's batch).
//!
//! A send stays here after its record is committed, until every batch read
//! that began before that commit has been decided: such a read's snapshot
//! may predate the record, and if the send left at once, a decision from
//! that read would see it neither in the store nor here (seen in the
//! dispatch bench: one customer in about 4,000 batch boundaries got three
//! messages under a cap of two). Commits and reads are ordered by an epoch
//! bumped after each recorded group: a read that began at epoch `r` counts a
//! send recorded at epoch `e` when `e > r`. A read that began between the
//! commit and the bump counts it twice, which errs on the side of not
//! sending.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::context::RecentSend;
use crate::model::Outcome;

#[derive(Default)]
pub(super) struct Unrecorded(Mutex<Inner>);

#[derive(Default)]
pub(super) struct Inner {
    by_customer: HashMap<String, Vec<Entry>>,
    /// Bumped after each group of results is recorded in the store.
    epoch: u64,
    /// The epochs at which the batch reads still being decided began, and
    /// how many began at each.
    reads: BTreeMap<u64, usize>,
}

struct Entry {
    batch: u64,
    row: i64,
    send: RecentSend,
    /// The epoch its record was committed in; none while under way.
    recorded: Option<u64>,
}

/// A batch read under way: recorded sends its snapshot may miss are kept
/// until it is dropped (after the batch is decided).
pub(super) struct Read {
    unrecorded: Arc<Unrecorded>,
    pub epoch: u64,
}

impl Drop for Read {
    fn drop(&mut self) {
        let mut inner = self.unrecorded.lock();
        if let Some(n) = inner.reads.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                inner.reads.remove(&self.epoch);
            }
        }
        inner.prune();
    }
}

impl Unrecorded {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// To be taken right before a batch's customers are read from the
    /// store (the read that shows its recent sends), on the same thread.
    pub fn begin_read(self: &Arc<Self>) -> Read {
        let mut inner = self.lock();
        let epoch = inner.epoch;
        *inner.reads.entry(epoch).or_default() += 1;
        Read {
            unrecorded: self.clone(),
            epoch,
        }
    }

    /// Results just committed to the store, by claimed row and outcome: a
    /// send is kept for the reads that began before; anything else goes.
    /// Called on the thread that committed them, right after the commit:
    /// a read that begins in between counts a send twice (the record and
    /// this), so the moment is kept short.
    pub fn recorded<'r>(&self, results: impl IntoIterator<Item = (&'r str, i64, Outcome)>) {
        let mut inner = self.lock();
        inner.epoch += 1;
        let epoch = inner.epoch;
        for (customer, row, outcome) in results {
            let Some(sends) = inner.by_customer.get_mut(customer) else {
                continue;
            };
            if outcome == Outcome::Sent {
                for e in sends.iter_mut().filter(|e| e.row == row) {
                    e.recorded = Some(epoch);
                }
            } else {
                sends.retain(|e| e.row != row);
                if sends.is_empty() {
                    inner.by_customer.remove(customer);
                }
            }
        }
        inner.prune();
    }

    /// Sends of a batch that will not be made.
    pub fn forget_batch(&self, batch: u64) {
        self.lock().by_customer.retain(|_, sends| {
            sends.retain(|e| e.batch != batch);
            !sends.is_empty()
        });
    }

    /// A send decided but handed back unsent.
    pub fn forget_unsent(&self, customer: &str, row: i64) {
        let mut inner = self.lock();
        if let Some(sends) = inner.by_customer.get_mut(customer) {
            sends.retain(|e| e.row != row);
            if sends.is_empty() {
                inner.by_customer.remove(customer);
            }
        }
    }
}

impl Inner {
    /// The customer's sends that a read begun at `read_epoch` may not show,
    /// other than those of `batch` itself (its decisions count those).
    pub fn elsewhere<'a>(
        &'a self,
        customer: &str,
        batch: u64,
        read_epoch: u64,
    ) -> impl Iterator<Item = &'a RecentSend> + 'a {
        self.by_customer
            .get(customer)
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .filter(move |e| e.batch != batch && e.recorded.is_none_or(|at| at > read_epoch))
            .map(|e| &e.send)
    }

    /// Whether the claimed row is one of the customer's sends kept here.
    pub fn holds(&self, customer: &str, row: i64) -> bool {
        self.by_customer
            .get(customer)
            .is_some_and(|sends| sends.iter().any(|e| e.row == row))
    }

    pub fn add(&mut self, customer: &str, batch: u64, row: i64, send: RecentSend) {
        self.by_customer
            .entry(customer.to_string())
            .or_default()
            .push(Entry {
                batch,
                row,
                send,
                recorded: None,
            });
    }

    /// Drops recorded sends that no read under way can miss.
    fn prune(&mut self) {
        let oldest = self.reads.keys().next().copied().unwrap_or(self.epoch);
        self.by_customer.retain(|_, sends| {
            sends.retain(|e| e.recorded.is_none_or(|at| at > oldest));
            !sends.is_empty()
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_customer.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Category, ChannelKind};

    fn send() -> RecentSend {
        RecentSend {
            at: chrono::Utc::now(),
            journey: "j".into(),
            channel: ChannelKind::Push,
            category: Category::Service,
        }
    }

    fn counted(u: &Unrecorded, batch: u64, read: &Read) -> usize {
        u.lock().elsewhere("c1", batch, read.epoch).count()
    }

    /// The race the epoch closes: batch 2's customers are read, then batch
    /// 1's send is recorded (after the read's snapshot), then batch 2 is
    /// decided. The send must still count for batch 2.
    #[test]
    fn a_send_recorded_after_a_read_began_counts_for_that_read() {
        let u = Arc::new(Unrecorded::default());
        u.lock().add("c1", 1, 10, send());
        let read = u.begin_read();
        u.recorded([("c1", 10, Outcome::Sent)]);
        assert_eq!(counted(&u, 2, &read), 1, "missed by the read's snapshot");
        drop(read);
        assert_eq!(u.lock().len(), 0, "no read can miss it any more");
    }

    #[test]
    fn a_read_begun_after_the_record_does_not_count_it_twice() {
        let u = Arc::new(Unrecorded::default());
        u.lock().add("c1", 1, 10, send());
        let early = u.begin_read();
        u.recorded([("c1", 10, Outcome::Sent)]);
        let late = u.begin_read();
        assert_eq!(counted(&u, 2, &late), 0, "its snapshot shows the record");
        assert_eq!(counted(&u, 2, &early), 1);
        drop(early);
        assert_eq!(u.lock().len(), 0);
        drop(late);
    }

    #[test]
    fn sends_under_way_count_for_other_batches_only_until_they_fail() {
        let u = Arc::new(Unrecorded::default());
        u.lock().add("c1", 1, 10, send());
        let read = u.begin_read();
        assert_eq!(counted(&u, 1, &read), 0, "its own batch counts it itself");
        assert_eq!(counted(&u, 2, &read), 1);
        u.recorded([("c1", 10, Outcome::Retrying)]);
        assert_eq!(counted(&u, 2, &read), 0, "not a send: forgotten at once");
        u.lock().add("c1", 3, 11, send());
        u.forget_batch(3);
        u.lock().add("c1", 4, 12, send());
        u.forget_unsent("c1", 12);
        assert_eq!(u.lock().len(), 0);
    }
}

//! A queue that keeps its first element inline.
//!
//! A per-user budget holds at most one live reservation most of the time (a user checks
//! again after the last reservation lapsed or was recorded). In a `VecDeque`, that one
//! reservation is behind a pointer, and reading it is a cache miss of its own after the
//! miss on the counter; kept beside the counter, it comes with it.

use std::collections::VecDeque;

/// A FIFO queue whose first element lives inline; the rest are in [`Chunks`].
#[derive(Debug, Clone)]
pub(crate) struct HeadQueue<T> {
    /// `None` only when the queue is empty (`rest` is then empty too).
    head: Option<T>,
    rest: Chunks<T>,
}

impl<T> Default for HeadQueue<T> {
    fn default() -> Self {
        HeadQueue {
            head: None,
            rest: Chunks::default(),
        }
    }
}

impl<T: Copy> HeadQueue<T> {
    pub(crate) fn len(&self) -> usize {
        usize::from(self.head.is_some()) + self.rest.len
    }

    pub(crate) fn front(&self) -> Option<&T> {
        self.head.as_ref()
    }

    pub(crate) fn back(&self) -> Option<&T> {
        self.rest.back().or(self.head.as_ref())
    }

    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        match i {
            0 => self.head.as_ref(),
            _ => self.rest.get(i - 1),
        }
    }

    pub(crate) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        match i {
            0 => self.head.as_mut(),
            _ => self.rest.get_mut(i - 1),
        }
    }

    pub(crate) fn push_back(&mut self, value: T) {
        if self.head.is_none() {
            self.head = Some(value);
        } else {
            self.rest.push_back(value);
        }
    }

    pub(crate) fn pop_front(&mut self) -> Option<T> {
        let front = self.head.take();
        self.head = self.rest.pop_front();
        front
    }

    /// The elements from the `start`-th on, front to back.
    pub(crate) fn iter_from(&self, start: usize) -> impl DoubleEndedIterator<Item = &T> {
        let head = self.head.as_ref().filter(|_| start == 0);
        head.into_iter()
            .chain(self.rest.iter_from(start.saturating_sub(1)))
    }

    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = &T> {
        self.iter_from(0)
    }

    /// The index of the first element for which `pred` is false, the queue being
    /// partitioned by it (as `VecDeque::partition_point`).
    pub(crate) fn partition_point(&self, mut pred: impl FnMut(&T) -> bool) -> usize {
        match &self.head {
            Some(head) if pred(head) => 1 + self.rest.partition_point(pred),
            _ => 0,
        }
    }
}

/// Elements in a chunk past the first (small in tests, so that they cross chunks).
const CHUNK: usize = if cfg!(test) { 4 } else { 64 };

/// A FIFO queue in chunks of [`CHUNK`] elements: a counter that every check reserves
/// against (a team's velocity over a reservation TTL of unrecorded checks) holds
/// hundreds of thousands of reservations, and a `VecDeque` of them doubled by copying
/// them all, tens of megabytes under the shard's lock, and never gave the room back.
/// Here a push past a full chunk starts a new one and a chunk leaves as soon as it is
/// read out; the first chunk grows as a `Vec` does, so a short queue stays small.
#[derive(Debug, Clone)]
struct Chunks<T> {
    /// Every chunk but the last is full; the first one's elements before `start` were
    /// popped.
    chunks: VecDeque<Vec<T>>,
    start: usize,
    len: usize,
}

impl<T> Default for Chunks<T> {
    fn default() -> Self {
        Chunks {
            chunks: VecDeque::new(),
            start: 0,
            len: 0,
        }
    }
}

impl<T: Copy> Chunks<T> {
    fn push_back(&mut self, value: T) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < CHUNK => last.push(value),
            _ => {
                let mut chunk = Vec::with_capacity(if self.chunks.is_empty() { 1 } else { CHUNK });
                chunk.push(value);
                self.chunks.push_back(chunk);
            }
        }
        self.len += 1;
    }

    fn pop_front(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        let first = &mut self.chunks[0];
        let value = first[self.start];
        self.start += 1;
        self.len -= 1;
        if self.len == 0 {
            // Emptied: keep one chunk's room for the next push.
            self.chunks.truncate(1);
            self.chunks[0].clear();
            self.start = 0;
        } else if self.start == first.len() {
            self.chunks.pop_front();
            self.start = 0;
        }
        Some(value)
    }

    /// The place of the `i`-th element.
    fn place(&self, i: usize) -> Option<(usize, usize)> {
        (i < self.len).then(|| {
            let at = self.start + i;
            (at / CHUNK, at % CHUNK)
        })
    }

    fn get(&self, i: usize) -> Option<&T> {
        self.place(i).map(|(c, j)| &self.chunks[c][j])
    }

    fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.place(i).map(|(c, j)| &mut self.chunks[c][j])
    }

    fn back(&self) -> Option<&T> {
        self.len.checked_sub(1).and_then(|i| self.get(i))
    }

    fn iter_from(&self, start: usize) -> impl DoubleEndedIterator<Item = &T> {
        (start.min(self.len)..self.len).map(|i| self.get(i).expect("in range"))
    }

    fn partition_point(&self, mut pred: impl FnMut(&T) -> bool) -> usize {
        let (mut low, mut high) = (0, self.len);
        while low < high {
            let mid = low + (high - low) / 2;
            if pred(self.get(mid).expect("in range")) {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        low
    }
}

#[cfg(test)]
mod tests {
    use super::HeadQueue;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[derive(Debug, Clone)]
    enum Step {
        Push(u8),
        Pop,
        Bump(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => any::<u8>().prop_map(Step::Push),
            2 => Just(Step::Pop),
            1 => (0usize..8).prop_map(Step::Bump),
        ]
    }

    proptest! {
        /// Every operation answers as a `VecDeque`'s does, through any sequence of
        /// pushes, pops and changes in place.
        #[test]
        fn answers_as_a_vec_deque(steps in prop::collection::vec(step(), 0..200)) {
            let mut queue = HeadQueue::default();
            let mut reference = VecDeque::new();
            for s in steps {
                match s {
                    Step::Push(v) => {
                        queue.push_back(v);
                        reference.push_back(v);
                    }
                    Step::Pop => prop_assert_eq!(queue.pop_front(), reference.pop_front()),
                    Step::Bump(i) => {
                        if let Some(v) = queue.get_mut(i) {
                            *v = v.wrapping_add(1);
                        }
                        if let Some(v) = reference.get_mut(i) {
                            *v = v.wrapping_add(1);
                        }
                    }
                }
                prop_assert_eq!(queue.len(), reference.len());
                prop_assert_eq!(queue.front(), reference.front());
                prop_assert_eq!(queue.back(), reference.back());
                for i in 0..=reference.len() + 1 {
                    prop_assert_eq!(queue.get(i), reference.get(i));
                    let from: Vec<_> = queue.iter_from(i).collect();
                    let expected: Vec<_> = reference.iter().skip(i).collect();
                    prop_assert_eq!(from, expected);
                }
                prop_assert_eq!(
                    queue.iter().rev().collect::<Vec<_>>(),
                    reference.iter().rev().collect::<Vec<_>>()
                );
                let mut sorted: Vec<u8> = reference.iter().copied().collect();
                sorted.sort_unstable();
                let sorted_queue = sorted.iter().fold(HeadQueue::default(), |mut q, v| {
                    q.push_back(*v);
                    q
                });
                for cut in [0u8, 1, 64, 128, 255] {
                    prop_assert_eq!(
                        sorted_queue.partition_point(|v| *v < cut),
                        sorted.partition_point(|v| *v < cut)
                    );
                }
            }
        }
    }
}

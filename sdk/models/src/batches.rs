//! Seeded epochs over training examples: every epoch visits each example
//! once, in an order drawn from the seed, the epoch and the example's key
//! (its id), so the order does not depend on arrival order or on the number
//! of workers, and two stages with one seed see their data alike.

use hone_sdk::text::seeded_hash;

/// Batches of example indices, reshuffled every epoch.
#[derive(Debug, Clone)]
pub struct Batches {
    keys: Vec<String>,
    order: Vec<usize>,
    cursor: usize,
    epoch: u64,
    seed: u64,
}

impl Batches {
    /// Epochs over examples keyed by `keys` (their ids), drawn from `seed`.
    pub fn new(keys: Vec<String>, seed: u64) -> Self {
        let mut b = Batches {
            keys,
            order: Vec::new(),
            cursor: 0,
            epoch: 0,
            seed,
        };
        b.shuffle();
        b
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn shuffle(&mut self) {
        let mut order: Vec<usize> = (0..self.keys.len()).collect();
        order.sort_by_key(|&i| {
            (
                seeded_hash(self.seed, &format!("order:{}:{}", self.epoch, self.keys[i])),
                i,
            )
        });
        self.order = order;
    }

    /// The next `size` indices (fewer when there are fewer examples),
    /// crossing into the next epoch, freshly shuffled, as needed.
    pub fn next(&mut self, size: usize) -> Vec<usize> {
        let mut batch = Vec::with_capacity(size);
        while batch.len() < size.min(self.keys.len()) {
            if self.cursor == self.order.len() {
                self.cursor = 0;
                self.epoch += 1;
                self.shuffle();
            }
            batch.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        batch
    }

    /// The rest of the current epoch in batches of `size`, the last one
    /// smaller when `size` does not divide it, then on to the next epoch:
    /// what a learner that makes several passes over one batch of samples
    /// (PPO's epochs) needs, where every pass must visit each sample once.
    /// While `size` divides the examples, the same batches as [`Batches::next`].
    pub fn epoch(&mut self, size: usize) -> Vec<Vec<usize>> {
        let rest = self.order[self.cursor..].to_vec();
        self.cursor = 0;
        self.epoch += 1;
        self.shuffle();
        rest.chunks(size.max(1)).map(<[usize]>::to_vec).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_visits_every_example_once_in_a_seeded_order() {
        let keys: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
        let mut b = Batches::new(keys.clone(), 7);
        let mut first: Vec<usize> = [b.next(2), b.next(2), b.next(1)].concat();
        let second: Vec<usize> = [b.next(3), b.next(2)].concat();
        assert_ne!(first, second, "reshuffled");
        first.sort();
        assert_eq!(first, [0, 1, 2, 3, 4]);
        let mut again = Batches::new(keys, 7);
        assert_eq!(again.next(5).len(), 5);
        assert_eq!(Batches::new(vec!["a".into()], 1).next(4), [0]);
    }

    #[test]
    fn an_epoch_visits_every_example_once_even_when_the_size_does_not_divide() {
        let keys: Vec<String> = (0..12).map(|i| format!("p{i}")).collect();
        let mut b = Batches::new(keys.clone(), 3);
        for _ in 0..3 {
            let batches = b.epoch(8);
            assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), [8, 4]);
            let mut seen: Vec<usize> = batches.concat();
            seen.sort();
            assert_eq!(seen, (0..12).collect::<Vec<_>>());
        }
        // Where the size divides, the same batches as next().
        let (mut a, mut c) = (Batches::new(keys.clone(), 5), Batches::new(keys, 5));
        for _ in 0..2 {
            let chunks = a.epoch(4);
            let nexts: Vec<Vec<usize>> = (0..3).map(|_| c.next(4)).collect();
            assert_eq!(chunks, nexts);
        }
    }
}

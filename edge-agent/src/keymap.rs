//! The edge's map from (limit, key) to [`KeyState`]: looked up on every request, so built for
//! that lookup and for memory per key.
//!
//! A request's key is hashed once (foldhash, seeded per process) from its parts as the request
//! names them, so no key is assembled to look one up. The hash picks one of a power-of-two
//! number of shards, each a mutex over a table; the lock is held only for the caller's short,
//! non-blocking closure. Inside a shard, entries (a 32-byte [`StoredKey`] and an 80-byte
//! [`KeyState`]) sit densely in a `Vec`, and a hashbrown table of `u32` positions finds them.
//! A table of entries in place would leave up to half its slots empty after each doubling and
//! touch them all; positions cost 4 bytes a slot instead. Removing swaps the last entry into
//! the hole and repoints its position.
//!
//! With short keys (up to [`INLINE`](crate::local::INLINE) bytes) that is about 120 bytes per
//! key; `benches/check.rs` measures it over a million keys.

use std::{
    hash::{BuildHasher, Hasher},
    sync::{Mutex, MutexGuard, PoisonError},
};

use hashbrown::HashTable;

use crate::local::{KeyState, SlotKey, StoredKey};

/// (limit, key) → [`KeyState`], sharded.
pub(crate) struct KeyMap {
    shards: Box<[Shard]>,
    hasher: foldhash::fast::RandomState,
}

/// One shard, on a cache line of its own so that threads on different shards do not share
/// the line their locks live on.
#[repr(align(64))]
struct Shard(Mutex<Table>);

#[derive(Default)]
struct Table {
    /// Positions in `entries`, by the hash of their key.
    index: HashTable<u32>,
    entries: Vec<Entry>,
}

struct Entry {
    key: StoredKey,
    state: KeyState,
}

impl KeyMap {
    /// An empty map with four shards per CPU (as dashmap does), at least four.
    pub(crate) fn new() -> KeyMap {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shards = (cpus * 4).next_power_of_two().max(4);
        KeyMap {
            shards: (0..shards)
                .map(|_| Shard(Mutex::new(Table::default())))
                .collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Runs `f` on the state of `key`, creating it with `create` on first use.
    pub(crate) fn with<R>(
        &self,
        key: &SlotKey<'_>,
        create: impl FnOnce() -> KeyState,
        f: impl FnOnce(&mut KeyState) -> R,
    ) -> R {
        let hash = self.hash(key);
        let mut table = self.lock(hash);
        let Table { index, entries } = &mut *table;
        let found = index
            .find(hash, |&at| is(entries, at, key))
            .map(|&at| at as usize);
        let at = match found {
            Some(at) => at,
            None => {
                let at = entries.len();
                entries.push(Entry {
                    key: StoredKey::new(key),
                    state: create(),
                });
                let position = u32::try_from(at)
                    .expect("a shard holds fewer than 2³² keys: that would be 480 GB");
                index.insert_unique(hash, position, |&p| self.rehash(entries, p));
                at
            }
        };
        f(&mut entries[at].state)
    }

    /// Runs `f` on the state of `key` if the map holds it.
    pub(crate) fn get<R>(
        &self,
        key: &SlotKey<'_>,
        f: impl FnOnce(&mut KeyState) -> R,
    ) -> Option<R> {
        let hash = self.hash(key);
        let mut table = self.lock(hash);
        let Table { index, entries } = &mut *table;
        let at = *index.find(hash, |&at| is(entries, at, key))?;
        entries.get_mut(at as usize).map(|e| f(&mut e.state))
    }

    /// Keeps the entries for which `f` returns true, one shard locked at a time. A shard left
    /// at a quarter of its room or less gives the rest back.
    pub(crate) fn retain(&self, mut f: impl FnMut(&StoredKey, &mut KeyState) -> bool) {
        for shard in &self.shards {
            let mut table = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
            let Table { index, entries } = &mut *table;
            let mut at = 0;
            while at < entries.len() {
                let entry = &mut entries[at];
                if f(&entry.key, &mut entry.state) {
                    at += 1;
                    continue;
                }
                // Unlist the entry, move the last one into its place and repoint that one's
                // position; the moved entry is looked at next.
                let hash = self.hash(&entries[at].key.view());
                if let Ok(listed) = index.find_entry(hash, |&p| p as usize == at) {
                    listed.remove();
                }
                let last = entries.len() - 1;
                if at != last {
                    let hash = self.hash(&entries[last].key.view());
                    if let Some(p) = index.find_mut(hash, |&p| p as usize == last) {
                        *p = at as u32;
                    }
                }
                entries.swap_remove(at);
            }
            if entries.capacity() > 64 && entries.len() <= entries.capacity() / 4 {
                entries.shrink_to(entries.len() * 2);
                index.shrink_to(entries.len(), |&p| self.rehash(entries, p));
            }
        }
    }

    /// Keys held, summed over the shards (each locked in turn).
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.0.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entries
                    .len()
            })
            .sum()
    }

    /// The one way a key is hashed, for lookups and stored keys alike.
    fn hash(&self, key: &SlotKey<'_>) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write_u64(key.limit.0);
        h.write_u8(key.kind() as u8);
        h.write(key.value());
        h.finish()
    }

    fn rehash(&self, entries: &[Entry], position: u32) -> u64 {
        entries
            .get(position as usize)
            .map_or(0, |e| self.hash(&e.key.view()))
    }

    /// The shard for `hash`, locked. Its bits 32 and up pick it: hashbrown places by the low
    /// bits and tags by the top seven, so the three stay independent.
    fn lock(&self, hash: u64) -> MutexGuard<'_, Table> {
        let shard = (hash >> 32) as usize & (self.shards.len() - 1);
        self.shards[shard]
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether position `at` holds `key`.
fn is(entries: &[Entry], at: u32, key: &SlotKey<'_>) -> bool {
    entries.get(at as usize).is_some_and(|e| e.key.matches(key))
}

#[cfg(test)]
mod tests {
    use shared::{LimitId, Nanos, rules::Key};

    use super::*;

    fn key(i: usize) -> String {
        format!("user-{i}")
    }

    #[test]
    fn entries_are_found_created_and_removed_with_the_rest_intact() {
        let map = KeyMap::new();
        let n = 5_000;
        for i in 0..n {
            let k = key(i);
            let slot = SlotKey::new(LimitId(1), &Key::UserId(&k));
            map.with(
                &slot,
                || KeyState::new(Nanos::ZERO),
                |s| s.cur.used = i as u64,
            );
        }
        assert_eq!(map.len(), n);
        // Another limit or kind is another entry.
        let k = key(7);
        assert!(
            map.get(&SlotKey::new(LimitId(2), &Key::UserId(&k)), |_| ())
                .is_none()
        );
        assert!(
            map.get(&SlotKey::new(LimitId(1), &Key::Ip(&k)), |_| ())
                .is_none()
        );
        // Drop the odd ones: every even one keeps its own state, found by its key.
        map.retain(|stored, state| {
            assert_eq!(
                stored.view().wire(),
                format!("u:{}", key(state.cur.used as usize))
            );
            state.cur.used % 2 == 0
        });
        assert_eq!(map.len(), n / 2);
        for i in 0..n {
            let k = key(i);
            let slot = SlotKey::new(LimitId(1), &Key::UserId(&k));
            let used = map.get(&slot, |s| s.cur.used);
            assert_eq!(used, (i % 2 == 0).then_some(i as u64), "{k}");
        }
        // Dropping all but a few gives the room back; the few are still found.
        map.retain(|_, state| state.cur.used < 10);
        assert_eq!(map.len(), 5);
        let slot_8 = key(8);
        let slot = SlotKey::new(LimitId(1), &Key::UserId(&slot_8));
        assert_eq!(map.get(&slot, |s| s.cur.used), Some(8));
        let room: usize = map
            .shards
            .iter()
            .map(|s| s.0.lock().unwrap().entries.capacity())
            .sum();
        assert!(room < 1_000, "{room}");
    }

    #[test]
    fn many_threads_create_and_count_each_key_once() {
        let map = KeyMap::new();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..2_000 {
                        let k = key(i);
                        let slot = SlotKey::new(LimitId(1), &Key::UserId(&k));
                        map.with(&slot, || KeyState::new(Nanos::ZERO), |s| s.cur.used += 1);
                    }
                });
            }
        });
        assert_eq!(map.len(), 2_000);
        let mut total = 0;
        map.retain(|_, s| {
            total += s.cur.used;
            s.cur.used == 4
        });
        assert_eq!((total, map.len()), (8_000, 2_000));
    }
}

//! The prefix index of `router/index.py` (`PrefixIndex`): router block hash
//! -> the workers that hold it on a GPU, and per worker the blocks it holds
//! on each cache tier. Workers are small slot numbers here; names are the
//! binding's business (`pyindex.rs`).
//!
//! A block's holders are an interned holder set: the GPU map stores a u32 id
//! per block, never a per-block bitmask, so a thousand engines cost a block
//! no more than two. Blocks held by the same workers share one set (a prefix
//! stored by one engine is one set for all its blocks), and a match walks
//! the prompt comparing ids, looking at a set's members only when the id
//! changes. Sets are refcounted by the blocks that use them and freed (id
//! reused) when the last goes, at the end of the operation that dropped it,
//! so an id never changes meaning inside one operation.
//!
//! Hashes are chained (a hash names its whole prefix), so a worker's cached
//! prefix of a prompt is the number of leading hashes it holds; each worker
//! also keeps its own GPU hashes, so clearing it touches only its blocks.

use crate::mapper::FastMap;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;

use crate::mapper::FastHasher;

pub type FastSet = HashSet<u64, BuildHasherDefault<FastHasher>>;

pub const TIER_GPU: usize = 0;
pub const N_TIERS: usize = 4;

/// Interned holder sets: id -> sorted slots, refcounted by GPU map entries.
#[derive(Default)]
struct HolderSets {
    members: Vec<Box<[u32]>>, // id -> sorted slots; empty while the id is free
    refs: Vec<u32>,
    ids: HashMap<Box<[u32]>, u32>,
    free: Vec<u32>,
    // ids whose refcount reached 0 (or that were made) during the current
    // operation: freed by `collect` if still unused
    dead: Vec<u32>,
}

impl HolderSets {
    fn intern(&mut self, m: Box<[u32]>) -> u32 {
        if let Some(&id) = self.ids.get(&m) {
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.members[id as usize] = m.clone();
                id
            }
            None => {
                self.members.push(m.clone());
                self.refs.push(0);
                u32::try_from(self.members.len() - 1).expect("fewer than 2^32 holder sets")
            }
        };
        self.ids.insert(m, id);
        self.dead.push(id);
        id
    }

    fn has(&self, id: u32, slot: u32) -> bool {
        self.members[id as usize].binary_search(&slot).is_ok()
    }

    /// The id of set `id` plus `slot` (not a member).
    fn with(&mut self, id: u32, slot: u32) -> u32 {
        let old = &self.members[id as usize];
        let mut m = Vec::with_capacity(old.len() + 1);
        let at = old.partition_point(|&s| s < slot);
        m.extend_from_slice(&old[..at]);
        m.push(slot);
        m.extend_from_slice(&old[at..]);
        self.intern(m.into_boxed_slice())
    }

    /// The id of set `id` minus `slot` (a member), None for the empty set.
    fn without(&mut self, id: u32, slot: u32) -> Option<u32> {
        let old = &self.members[id as usize];
        if old.len() == 1 {
            return None;
        }
        let m: Box<[u32]> = old.iter().copied().filter(|&s| s != slot).collect();
        Some(self.intern(m))
    }

    fn inc(&mut self, id: u32) {
        self.refs[id as usize] += 1;
    }

    fn dec(&mut self, id: u32) {
        let r = &mut self.refs[id as usize];
        *r -= 1;
        if *r == 0 {
            self.dead.push(id);
        }
    }

    /// Frees the sets no block uses any more.
    fn collect(&mut self) {
        while let Some(id) = self.dead.pop() {
            let i = id as usize;
            if self.refs[i] == 0 && !self.members[i].is_empty() {
                let m = std::mem::take(&mut self.members[i]);
                self.ids.remove(&m);
                self.free.push(id);
            }
        }
    }

    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// Memo of one operation's holder-set transitions (old id -> new id): a
/// batch of blocks has few distinct holder sets.
#[derive(Default)]
struct Memo(Vec<(u32, Option<u32>)>, FastMap<u32, Option<u32>>);

impl Memo {
    fn get_or(&mut self, old: u32, f: impl FnOnce() -> Option<u32>) -> Option<u32> {
        if self.1.is_empty() {
            if let Some(&(_, new)) = self.0.iter().find(|(o, _)| *o == old) {
                return new;
            }
            let new = f();
            if self.0.len() < 8 {
                self.0.push((old, new));
            } else {
                self.1.extend(self.0.drain(..));
                self.1.insert(old, new);
            }
            return new;
        }
        *self.1.entry(old).or_insert_with(f)
    }
}

#[derive(Default)]
struct Worker {
    gpu: FastSet,
    lower: [FastSet; N_TIERS - 1], // tiers 1.. (host, disk, external)
}

#[derive(Default)]
pub struct Index {
    map: FastMap<u64, u32>, // GPU: block hash -> holder-set id
    sets: HolderSets,
    workers: Vec<Worker>, // slot -> its blocks
    lower_blocks: usize,
}

impl Index {
    /// Makes room for `slot` (slots are handed out by the caller).
    pub fn add_slot(&mut self, slot: u32) {
        let s = slot as usize;
        if self.workers.len() <= s {
            self.workers.resize_with(s + 1, Worker::default);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn lower_blocks(&self) -> usize {
        self.lower_blocks
    }

    pub fn holder_sets(&self) -> usize {
        self.sets.len()
    }

    /// The hashes `slot` holds on `tier` (None for a tier that is no tier).
    pub fn held(&self, slot: u32, tier: usize) -> Option<&FastSet> {
        let w = &self.workers[slot as usize];
        match tier {
            TIER_GPU => Some(&w.gpu),
            t if t < N_TIERS => Some(&w.lower[t - 1]),
            _ => None,
        }
    }

    /// `slot` holds `hashes` on `tier` (a valid tier).
    pub fn store(&mut self, slot: u32, hashes: &[u64], tier: usize) {
        if tier != TIER_GPU {
            let held = &mut self.workers[slot as usize].lower[tier - 1];
            let n0 = held.len();
            held.extend(hashes.iter().copied());
            self.lower_blocks += held.len() - n0;
            return;
        }
        let alone = self.sets.intern(Box::new([slot]));
        let mut memo = Memo::default();
        let sets = &mut self.sets;
        for &h in hashes {
            match self.map.entry(h) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(alone);
                    sets.inc(alone);
                }
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    let old = *e.get();
                    if old == alone || sets.has(old, slot) {
                        continue;
                    }
                    let new = memo.get_or(old, || Some(sets.with(old, slot))).expect("a set with slot");
                    e.insert(new);
                    sets.inc(new);
                    sets.dec(old);
                }
            }
        }
        self.workers[slot as usize].gpu.extend(hashes.iter().copied());
        self.sets.collect();
    }

    /// Drops `hashes` from `slot` on `tier` only; hashes it does not hold
    /// there (and tiers that are no tier) are ignored.
    pub fn remove(&mut self, slot: u32, hashes: &[u64], tier: usize) {
        if tier != TIER_GPU {
            if tier < N_TIERS {
                let held = &mut self.workers[slot as usize].lower[tier - 1];
                let n0 = held.len();
                for h in hashes {
                    held.remove(h);
                }
                self.lower_blocks -= n0 - held.len();
            }
            return;
        }
        let mut memo = Memo::default();
        let held = &mut self.workers[slot as usize].gpu;
        for h in hashes {
            if held.remove(h) {
                Self::unhold(&mut self.map, &mut self.sets, &mut memo, *h, slot);
            }
        }
        self.sets.collect();
    }

    fn unhold(map: &mut FastMap<u64, u32>, sets: &mut HolderSets, memo: &mut Memo, h: u64, slot: u32) {
        let e = map.get_mut(&h).expect("a held block is in the map");
        let old = *e;
        match memo.get_or(old, || sets.without(old, slot)) {
            Some(new) => {
                *e = new;
                sets.inc(new);
            }
            None => {
                map.remove(&h);
            }
        }
        sets.dec(old);
    }

    /// Drops every block of `slot`, every tier. Returns how many.
    pub fn clear(&mut self, slot: u32) -> usize {
        let w = &mut self.workers[slot as usize];
        let lower: usize = w.lower.iter().map(HashSet::len).sum();
        for t in &mut w.lower {
            *t = FastSet::default();
        }
        self.lower_blocks -= lower;
        let gpu = std::mem::take(&mut w.gpu);
        let mut memo = Memo::default();
        for &h in &gpu {
            Self::unhold(&mut self.map, &mut self.sets, &mut memo, h, slot);
        }
        self.sets.collect();
        gpu.len() + lower
    }

    /// For each candidate slot (sorted, distinct), how many leading blocks
    /// of `hashes` it holds on a GPU: `(slot, depth)` pushed to `out` for
    /// every candidate with a depth above 0.
    pub fn match_depths(&self, hashes: &[u64], cand: &[u32], out: &mut Vec<(u32, usize)>) {
        if cand.is_empty() || hashes.is_empty() {
            return;
        }
        let mut active: Vec<u32> = cand.to_vec();
        let mut kept: Vec<u32> = Vec::with_capacity(active.len());
        let mut bits = vec![0u64; self.workers.len().div_ceil(64).max(1)];
        for &s in &active {
            bits[(s / 64) as usize] |= 1 << (s % 64);
        }
        let mut last = u32::MAX;
        for (i, h) in hashes.iter().enumerate() {
            let Some(&sid) = self.map.get(h) else {
                if i > 0 {
                    out.extend(active.iter().map(|&s| (s, i)));
                }
                return;
            };
            if sid == last {
                continue; // active is within this set already
            }
            last = sid;
            let holders = &self.sets.members[sid as usize];
            kept.clear();
            if active.len() <= holders.len() {
                kept.extend(active.iter().copied().filter(|s| holders.binary_search(s).is_ok()));
            } else {
                kept.extend(
                    holders.iter().copied().filter(|&s| bits[(s / 64) as usize] >> (s % 64) & 1 == 1),
                );
            }
            if kept.len() != active.len() {
                let mut k = 0;
                for &s in &active {
                    if k < kept.len() && kept[k] == s {
                        k += 1;
                    } else {
                        bits[(s / 64) as usize] &= !(1 << (s % 64));
                        if i > 0 {
                            out.push((s, i));
                        }
                    }
                }
                std::mem::swap(&mut active, &mut kept);
                if active.is_empty() {
                    return;
                }
            }
        }
        out.extend(active.iter().map(|&s| (s, hashes.len())));
    }

    /// Blocks per tier of `slot`'s prefix of `hashes`: its GPU prefix
    /// (`gpu` blocks, from `match_depths`) then each further block credited
    /// to the fastest tier holding it, until one no tier holds.
    pub fn walk_tiers(&self, hashes: &[u64], gpu: usize, slot: u32) -> [usize; N_TIERS] {
        let mut counts = [gpu, 0, 0, 0];
        let w = &self.workers[slot as usize];
        if self.lower_blocks == 0 || w.lower.iter().all(HashSet::is_empty) {
            return counts;
        }
        'blocks: for h in hashes.iter().skip(gpu) {
            if w.gpu.contains(h) {
                counts[TIER_GPU] += 1;
                continue;
            }
            for (t, held) in w.lower.iter().enumerate() {
                if held.contains(h) {
                    counts[t + 1] += 1;
                    continue 'blocks;
                }
            }
            break;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depths(ix: &Index, hashes: &[u64], cand: &[u32]) -> Vec<(u32, usize)> {
        let mut out = Vec::new();
        ix.match_depths(hashes, cand, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn shared_prefix_and_sets_freed() {
        let mut ix = Index::default();
        for s in 0..3 {
            ix.add_slot(s);
        }
        ix.store(0, &[1, 2, 3, 4], TIER_GPU);
        ix.store(1, &[1, 2, 5], TIER_GPU);
        ix.store(2, &[1, 2, 3], TIER_GPU);
        assert_eq!(depths(&ix, &[1, 2, 3, 4], &[0, 1, 2]), vec![(0, 4), (1, 2), (2, 3)]);
        assert_eq!(depths(&ix, &[9, 1], &[0, 1, 2]), vec![]);
        assert_eq!(ix.len(), 5);
        ix.clear(0);
        ix.clear(1);
        ix.remove(2, &[1, 2, 3, 7], TIER_GPU);
        assert!(ix.is_empty());
        assert_eq!(ix.holder_sets(), 0);
    }

    #[test]
    fn tiers_extend_the_gpu_prefix() {
        let mut ix = Index::default();
        ix.add_slot(0);
        ix.store(0, &[1, 3], TIER_GPU);
        ix.store(0, &[2], 1);
        ix.store(0, &[4], 3);
        let mut out = Vec::new();
        ix.match_depths(&[1, 2, 3, 4, 5], &[0], &mut out);
        assert_eq!(out, vec![(0, 1)]);
        assert_eq!(ix.walk_tiers(&[1, 2, 3, 4, 5], 1, 0), [2, 1, 0, 1]);
        assert_eq!(ix.clear(0), 4);
        assert_eq!(ix.lower_blocks(), 0);
    }
}

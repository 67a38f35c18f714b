//! The prefix index of `router/index.py` (`PrefixIndex`): router block hash
//! -> the workers that hold it on a GPU, and per worker the blocks it holds
//! on each lower cache tier. Workers are small slot numbers here; names are
//! the binding's business (`pyindex.rs`).
//!
//! A block's holders are an interned holder set: the GPU table stores a u32
//! id per block, never a per-block bitmask, so a thousand engines cost a
//! block no more than two. Blocks held by the same workers share one set (a
//! prefix stored by one engine is one set for all its blocks), and a match
//! walks the prompt comparing ids, looking at a set's members only when the
//! id changes. Sets are refcounted by the blocks that use them and freed (id
//! reused) when the last goes, at the end of the operation that dropped it,
//! so an id never changes meaning inside one operation.
//!
//! Memory: the GPU table is one packed 16-byte entry per distinct block
//! (hash, holder-set id, generation) in a `hashbrown::HashTable`, and nothing
//! else per block: a worker keeps only a count of its GPU blocks. Clearing a
//! worker, and listing its GPU hashes, scan the table once (both are rare:
//! an engine restart, an admin query); a store or remove touches only its
//! own blocks, and removing a block a worker does not hold changes nothing.
//!
//! The bound (`max_blocks`, `--max-index-blocks`; 0: none). Distinct GPU
//! blocks count against it, and so, separately, do lower-tier blocks (one per
//! worker, tier and block, as `lower_blocks` counts them): past the bound,
//! an operation that stored blocks ends by dropping the least recently used
//! ones down to a low-water mark (`low_water`), so the cost is amortised over
//! the stores that filled the gap. A GPU block is used when it is stored or
//! when a match walks over it as a hit (any candidate holds it); a lower-tier
//! block when it is stored or `match_tiers` credits it. Dropped blocks leave
//! every holder; hashes are chained, so a match stops there: routing degrades
//! to cold, never wrong.
//!
//! Recency is a generation per entry from a clock advanced once per block an
//! operation uses; within one operation a prompt's first block gets the newest
//! generation, so a chain loses its tail before its head. Ties (one operation
//! crediting one block to several workers) are broken by hash, then slot, then
//! tier, exactly as `PrefixIndex` does, so both drop the same blocks. The clock
//! is u32: when it would run out the generations are renumbered by rank
//! (order kept, so the choice of victims is unchanged). Without a bound no
//! generation is kept up to date.

use crate::mapper::FastMap;
use hashbrown::hash_table::Entry as Slot;
use hashbrown::HashTable;
use std::collections::HashMap;

pub const TIER_GPU: usize = 0;
pub const N_TIERS: usize = 4;

/// One worker's blocks on one lower tier: hash -> generation.
pub type LowerMap = FastMap<u64, u32>;

/// The bound's low-water mark: past `max` blocks, evict down to this.
pub fn low_water(max: usize) -> usize {
    max - max / 10
}

/// Router hashes are xxh3 outputs: a multiply and a fold spread them (and
/// any other key set) over both the bucket bits and hashbrown's tag bits.
#[inline]
fn spread(h: u64) -> u64 {
    let x = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

/// A GPU block: 16 bytes, no padding.
#[derive(Clone, Copy)]
struct Entry {
    hash: u64,
    set: u32, // holder-set id
    gen: u32, // last use (bounded indexes only)
}

/// Interned holder sets: id -> sorted slots, refcounted by GPU entries.
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

    /// How `slot` joining changes set `id`.
    fn step_add(&mut self, id: u32, slot: u32) -> Step {
        if self.has(id, slot) {
            Step::Keep
        } else {
            Step::To(self.with(id, slot))
        }
    }

    /// How `slot` leaving changes set `id`.
    fn step_remove(&mut self, id: u32, slot: u32) -> Step {
        if !self.has(id, slot) {
            Step::Keep
        } else {
            self.without(id, slot).map_or(Step::Drop, Step::To)
        }
    }

    fn inc(&mut self, id: u32) {
        self.refs[id as usize] += 1;
    }

    fn dec_by(&mut self, id: u32, n: u32) {
        let r = &mut self.refs[id as usize];
        *r -= n;
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

/// What one worker joining or leaving does to a holder set.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Keep,    // nothing (already a member / not a member)
    To(u32), // the block moves to this set
    Drop,    // the set would be empty: the block leaves the table
}

/// Memo of one operation's holder-set transitions (old id -> step): a batch
/// of blocks has few distinct holder sets.
#[derive(Default)]
struct Memo(Vec<(u32, Step)>, FastMap<u32, Step>);

impl Memo {
    fn get_or(&mut self, old: u32, f: impl FnOnce() -> Step) -> Step {
        if self.1.is_empty() {
            if let Some(&(_, step)) = self.0.iter().find(|(o, _)| *o == old) {
                return step;
            }
            let step = f();
            if self.0.len() < 8 {
                self.0.push((old, step));
            } else {
                self.1.extend(self.0.drain(..));
                self.1.insert(old, step);
            }
            return step;
        }
        *self.1.entry(old).or_insert_with(f)
    }
}

#[derive(Default)]
struct Worker {
    gpu: usize,                     // GPU blocks it holds
    lower: [LowerMap; N_TIERS - 1], // tiers 1.. (host, disk, external)
}

pub struct Index {
    map: HashTable<Entry>, // GPU: one entry per distinct block
    sets: HolderSets,
    workers: Vec<Worker>, // slot -> its blocks
    lower_blocks: usize,
    max_blocks: usize, // 0: no bound
    clock: u32,        // next generation (bounded indexes only)
    gen_limit: u32,    // the clock never passes it (lowered by tests)
    evicted: u64,      // blocks dropped to keep the bound, every tier
}

impl Default for Index {
    fn default() -> Self {
        Index::new(0)
    }
}

impl Index {
    /// An empty index holding at most `max_blocks` distinct GPU blocks and as
    /// many lower-tier blocks (0: no bound).
    pub fn new(max_blocks: usize) -> Self {
        Index {
            map: HashTable::new(),
            sets: HolderSets::default(),
            workers: Vec::new(),
            lower_blocks: 0,
            max_blocks,
            clock: 0,
            gen_limit: u32::MAX,
            evicted: 0,
        }
    }

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

    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// Blocks dropped so far to keep the bound (GPU blocks and lower-tier
    /// blocks).
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn find(&self, h: u64) -> Option<&Entry> {
        self.map.find(spread(h), |e| e.hash == h)
    }

    /// How many blocks `slot` holds on `tier` (0 for a tier that is no tier).
    pub fn count(&self, slot: u32, tier: usize) -> usize {
        let w = &self.workers[slot as usize];
        match tier {
            TIER_GPU => w.gpu,
            t if t < N_TIERS => w.lower[t - 1].len(),
            _ => 0,
        }
    }

    /// The hashes `slot` holds on `tier` (none for a tier that is no tier).
    /// The GPU's are found by one scan of the table.
    pub fn hashes(&self, slot: u32, tier: usize) -> Vec<u64> {
        let w = &self.workers[slot as usize];
        match tier {
            TIER_GPU if w.gpu == 0 => Vec::new(),
            TIER_GPU => {
                let mut is_holder: Vec<Option<bool>> = vec![None; self.sets.members.len()];
                let mut out = Vec::with_capacity(w.gpu);
                for e in &self.map {
                    let m = &mut is_holder[e.set as usize];
                    if *m.get_or_insert_with(|| self.sets.has(e.set, slot)) {
                        out.push(e.hash);
                    }
                }
                out
            }
            t if t < N_TIERS => w.lower[t - 1].keys().copied().collect(),
            _ => Vec::new(),
        }
    }

    /// The first generation of an operation using `n` blocks (the clock
    /// moves past them), renumbering first if the clock would run out.
    fn advance(&mut self, n: usize) -> u32 {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if self.clock.checked_add(n).is_none_or(|c| c > self.gen_limit) {
            self.renumber();
        }
        let base = self.clock;
        self.clock = self.clock.saturating_add(n);
        base
    }

    /// Every generation replaced by its rank among them (order and ties
    /// kept, so the least recently used blocks stay the same).
    fn renumber(&mut self) {
        let mut gens: Vec<u32> = self.map.iter().map(|e| e.gen).collect();
        for w in &self.workers {
            for t in &w.lower {
                gens.extend(t.values().copied());
            }
        }
        gens.sort_unstable();
        gens.dedup();
        let rank = |g: u32| u32::try_from(gens.partition_point(|&x| x < g)).expect("fewer than 2^32 blocks");
        for e in self.map.iter_mut() {
            e.gen = rank(e.gen);
        }
        for w in &mut self.workers {
            for t in &mut w.lower {
                for g in t.values_mut() {
                    *g = rank(*g);
                }
            }
        }
        self.clock = u32::try_from(gens.len()).expect("fewer than 2^32 blocks");
    }

    /// `slot` holds `hashes` on `tier` (a valid tier). With a bound, the
    /// blocks count as used (the first the most recently) and the least
    /// recently used go if the tier is past it.
    pub fn store(&mut self, slot: u32, hashes: &[u64], tier: usize) {
        let bounded = self.max_blocks > 0 && !hashes.is_empty();
        let base = if bounded { self.advance(hashes.len()) } else { 0 };
        let last = u32::try_from(hashes.len().saturating_sub(1)).unwrap_or(u32::MAX);
        // position i's generation: the first block is the newest
        let gen = |i: usize| if bounded { base.saturating_add(last - i as u32) } else { 0 };
        if tier != TIER_GPU {
            let held = &mut self.workers[slot as usize].lower[tier - 1];
            let n0 = held.len();
            for (i, &h) in hashes.iter().enumerate() {
                let g = held.entry(h).or_insert(0);
                *g = (*g).max(gen(i));
            }
            self.lower_blocks += held.len() - n0;
            if self.max_blocks > 0 && self.lower_blocks > self.max_blocks {
                self.evict_lower();
            }
            return;
        }
        let alone = self.sets.intern(Box::new([slot]));
        let mut memo = Memo::default();
        let sets = &mut self.sets;
        let mut added = 0;
        for (i, &h) in hashes.iter().enumerate() {
            let g = gen(i);
            match self.map.entry(spread(h), |e| e.hash == h, |e| spread(e.hash)) {
                Slot::Vacant(v) => {
                    v.insert(Entry { hash: h, set: alone, gen: g });
                    sets.inc(alone);
                    added += 1;
                }
                Slot::Occupied(mut o) => {
                    let e = o.get_mut();
                    e.gen = e.gen.max(g);
                    let old = e.set;
                    if old == alone {
                        continue;
                    }
                    if let Step::To(new) = memo.get_or(old, || sets.step_add(old, slot)) {
                        e.set = new;
                        sets.inc(new);
                        sets.dec_by(old, 1);
                        added += 1;
                    }
                }
            }
        }
        self.workers[slot as usize].gpu += added;
        self.sets.collect();
        if self.max_blocks > 0 && self.map.len() > self.max_blocks {
            self.evict_gpu();
        }
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
        if self.workers[slot as usize].gpu == 0 {
            return;
        }
        let mut memo = Memo::default();
        let sets = &mut self.sets;
        let mut dropped = 0;
        for &h in hashes {
            let Ok(o) = self.map.find_entry(spread(h), |e| e.hash == h) else {
                continue;
            };
            let old = o.get().set;
            match memo.get_or(old, || sets.step_remove(old, slot)) {
                Step::Keep => continue,
                Step::To(new) => {
                    let mut o = o;
                    o.get_mut().set = new;
                    sets.inc(new);
                }
                Step::Drop => {
                    o.remove();
                }
            }
            sets.dec_by(old, 1);
            dropped += 1;
        }
        self.workers[slot as usize].gpu -= dropped;
        self.sets.collect();
    }

    /// Drops every block of `slot`, every tier (one scan of the GPU table).
    /// Returns how many.
    pub fn clear(&mut self, slot: u32) -> usize {
        let w = &mut self.workers[slot as usize];
        let lower: usize = w.lower.iter().map(LowerMap::len).sum();
        for t in &mut w.lower {
            *t = LowerMap::default();
        }
        self.lower_blocks -= lower;
        let gpu = std::mem::take(&mut w.gpu);
        if gpu > 0 {
            // old id -> step, each set judged once
            let mut steps: Vec<Option<Step>> = vec![None; self.sets.members.len()];
            let sets = &mut self.sets;
            self.map.retain(|e| {
                let old = e.set;
                let step = *steps[old as usize].get_or_insert_with(|| sets.step_remove(old, slot));
                match step {
                    Step::Keep => return true,
                    Step::To(new) => {
                        e.set = new;
                        sets.inc(new);
                    }
                    Step::Drop => {}
                }
                sets.dec_by(old, 1);
                step != Step::Drop
            });
            self.sets.collect();
        }
        gpu + lower
    }

    /// Drops the least recently used GPU blocks down to the low-water mark.
    fn evict_gpu(&mut self) {
        let n = self.map.len();
        let k = n - low_water(self.max_blocks).min(n);
        if k == 0 {
            return;
        }
        // the k-th oldest generation; victims: every older entry, then
        // entries of that generation by hash (ties; PrefixIndex's order)
        let cut = {
            let mut gens: Vec<u32> = self.map.iter().map(|e| e.gen).collect();
            *gens.select_nth_unstable(k - 1).1
        };
        let below = self.map.iter().filter(|e| e.gen < cut).count();
        let mut at: Vec<u64> = self.map.iter().filter(|e| e.gen == cut).map(|e| e.hash).collect();
        at.sort_unstable();
        at.truncate(k - below);
        let mut per_set: FastMap<u32, u32> = FastMap::default();
        self.map.retain(|e| {
            let victim = e.gen < cut || (e.gen == cut && at.binary_search(&e.hash).is_ok());
            if victim {
                *per_set.entry(e.set).or_insert(0) += 1;
            }
            !victim
        });
        for (id, c) in per_set {
            for &s in self.sets.members[id as usize].iter() {
                self.workers[s as usize].gpu -= c as usize;
            }
            self.sets.dec_by(id, c);
        }
        self.sets.collect();
        self.evicted += k as u64;
    }

    /// Drops the least recently used lower-tier blocks down to the low-water
    /// mark, oldest first by (generation, hash, slot, tier).
    fn evict_lower(&mut self) {
        let n = self.lower_blocks;
        let k = n - low_water(self.max_blocks).min(n);
        if k == 0 {
            return;
        }
        let mut all: Vec<(u32, u64, u32, u8)> = Vec::with_capacity(n);
        for (s, w) in self.workers.iter().enumerate() {
            for (t, held) in w.lower.iter().enumerate() {
                all.extend(held.iter().map(|(&h, &g)| (g, h, s as u32, t as u8 + 1)));
            }
        }
        all.select_nth_unstable(k - 1);
        for &(_, h, s, t) in &all[..k] {
            self.workers[s as usize].lower[t as usize - 1].remove(&h);
        }
        self.lower_blocks -= k;
        self.evicted += k as u64;
    }

    /// With a bound: the first `hashes` (a match's hits) count as used, the
    /// first the most recently.
    pub fn touch(&mut self, hashes: &[u64]) {
        if self.max_blocks == 0 || hashes.is_empty() {
            return;
        }
        let base = self.advance(hashes.len());
        let last = hashes.len() - 1;
        for (i, &h) in hashes.iter().enumerate() {
            let g = base.saturating_add((last - i) as u32);
            if let Some(e) = self.map.find_mut(spread(h), |e| e.hash == h) {
                e.gen = e.gen.max(g);
            }
        }
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
        for (i, &h) in hashes.iter().enumerate() {
            let Some(&Entry { set: sid, .. }) = self.find(h) else {
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

    /// The first generation of a `match_tiers` walk over `n` blocks (see
    /// `walk_tiers`); None without a bound or without lower-tier blocks,
    /// when no walk uses anything.
    pub fn begin_walk(&mut self, n: usize) -> Option<u32> {
        if self.max_blocks == 0 || self.lower_blocks == 0 || n == 0 {
            return None;
        }
        Some(self.advance(n))
    }

    /// Blocks per tier of `slot`'s prefix of `hashes`: its GPU prefix
    /// (`gpu` blocks, from `match_depths`) then each further block credited
    /// to the fastest tier holding it, until one no tier holds. With `base`
    /// (from `begin_walk`) each credited block counts as used.
    pub fn walk_tiers(
        &mut self,
        hashes: &[u64],
        gpu: usize,
        slot: u32,
        base: Option<u32>,
    ) -> [usize; N_TIERS] {
        let mut counts = [gpu, 0, 0, 0];
        let s = slot as usize;
        if self.lower_blocks == 0 || self.workers[s].lower.iter().all(LowerMap::is_empty) {
            return counts;
        }
        let last = hashes.len().saturating_sub(1);
        let gen = |i: usize| base.map(|b| b.saturating_add((last - i) as u32));
        'blocks: for (i, &h) in hashes.iter().enumerate().skip(gpu) {
            let sets = &self.sets;
            if let Some(e) = self.map.find_mut(spread(h), |e| e.hash == h) {
                if sets.has(e.set, slot) {
                    if let Some(g) = gen(i) {
                        e.gen = e.gen.max(g);
                    }
                    counts[TIER_GPU] += 1;
                    continue;
                }
            }
            for (t, held) in self.workers[s].lower.iter_mut().enumerate() {
                if let Some(old) = held.get_mut(&h) {
                    if let Some(g) = gen(i) {
                        *old = (*old).max(g);
                    }
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

    fn sorted(mut v: Vec<u64>) -> Vec<u64> {
        v.sort_unstable();
        v
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
        assert_eq!((ix.count(0, TIER_GPU), ix.count(1, TIER_GPU), ix.count(2, TIER_GPU)), (4, 3, 3));
        assert_eq!(sorted(ix.hashes(1, TIER_GPU)), vec![1, 2, 5]);
        ix.clear(0);
        ix.clear(1);
        ix.remove(2, &[1, 2, 3, 7], TIER_GPU);
        assert!(ix.is_empty());
        assert_eq!(ix.holder_sets(), 0);
        assert_eq!(ix.count(2, TIER_GPU), 0);
    }

    #[test]
    fn removing_what_a_worker_does_not_hold_changes_nothing() {
        let mut ix = Index::default();
        for s in 0..2 {
            ix.add_slot(s);
        }
        ix.store(0, &[1, 2, 3], TIER_GPU);
        ix.store(1, &[9], TIER_GPU);
        ix.remove(1, &[1, 2, 3, 3], TIER_GPU);
        assert_eq!((ix.len(), ix.count(0, TIER_GPU), ix.count(1, TIER_GPU)), (4, 3, 1));
        ix.remove(0, &[2, 2], TIER_GPU);
        assert_eq!((ix.len(), ix.count(0, TIER_GPU)), (3, 2));
        assert_eq!(depths(&ix, &[1, 2, 3], &[0, 1]), vec![(0, 1)]);
        assert_eq!(ix.clear(1), 1);
        assert_eq!(ix.clear(1), 0);
        assert_eq!(sorted(ix.hashes(0, TIER_GPU)), vec![1, 3]);
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
        assert_eq!(ix.walk_tiers(&[1, 2, 3, 4, 5], 1, 0, None), [2, 1, 0, 1]);
        assert_eq!(ix.clear(0), 4);
        assert_eq!(ix.lower_blocks(), 0);
    }

    #[test]
    fn the_bound_keeps_the_most_recently_matched_prefix() {
        let mut ix = Index::new(100);
        for s in 0..3 {
            ix.add_slot(s);
        }
        let hot: Vec<u64> = (1..=20).collect();
        ix.store(0, &hot, TIER_GPU);
        ix.store(1, &hot[..10], TIER_GPU);
        for round in 0..50u64 {
            let cold: Vec<u64> = (0..37).map(|i| 1_000_000 + round * 100 + i).collect();
            ix.store(2, &cold, TIER_GPU);
            assert!(ix.len() <= 100);
            let mut out = Vec::new();
            ix.match_depths(&hot, &[0, 1], &mut out);
            let d = out.iter().map(|&(_, d)| d).max().unwrap_or(0);
            assert_eq!(d, 20, "the hot prefix survives");
            ix.touch(&hot[..d]);
        }
        assert!(ix.evicted() > 0);
        let held: usize = (0..3).map(|s| ix.count(s, TIER_GPU)).sum();
        assert_eq!(held, 20 + 10 + ix.len() - 20);
        // evicted blocks are gone from every holder; removing them later is harmless
        ix.remove(2, &[1_000_000, 1_000_001], TIER_GPU);
        ix.clear(2);
        assert_eq!(ix.len(), 20);
        assert_eq!(ix.count(0, TIER_GPU) + ix.count(1, TIER_GPU), 30);
    }

    #[test]
    fn a_chain_loses_its_tail_first() {
        let mut ix = Index::new(10);
        ix.add_slot(0);
        let chain: Vec<u64> = (100..120).collect();
        ix.store(0, &chain, TIER_GPU);
        assert_eq!(ix.len(), 9); // 20 > 10: down to the low-water mark
        assert_eq!(depths(&ix, &chain, &[0]), vec![(0, 9)]);
        assert_eq!(ix.evicted(), 11);
        assert_eq!(ix.count(0, TIER_GPU), 9);
    }

    #[test]
    fn lower_tiers_are_bounded_too() {
        let mut ix = Index::new(20);
        ix.add_slot(0);
        ix.add_slot(1);
        for r in 0..30u64 {
            ix.store((r % 2) as u32, &[r * 10, r * 10 + 1, r * 10 + 2], 1 + (r % 3) as usize);
            assert!(ix.lower_blocks() <= 20);
        }
        let total: usize =
            (0..2).flat_map(|s| (1..N_TIERS).map(move |t| (s, t))).map(|(s, t)| ix.count(s, t)).sum();
        assert_eq!(total, ix.lower_blocks());
        // the newest store survives
        assert_eq!(sorted(ix.hashes(1, 3)), vec![290, 291, 292]);
        assert!(ix.evicted() > 0);
    }

    #[test]
    fn renumbering_keeps_the_order() {
        let mut a = Index::new(50);
        let mut b = Index::new(50);
        b.gen_limit = 256; // renumbers every few operations
        for ix in [&mut a, &mut b] {
            ix.add_slot(0);
            ix.add_slot(1);
        }
        for r in 0..200u64 {
            let hs: Vec<u64> = (0..7).map(|i| (r * 7 + i) % 90).collect();
            for ix in [&mut a, &mut b] {
                ix.store((r % 2) as u32, &hs, TIER_GPU);
                ix.store(0, &hs[..2], 1);
                ix.touch(&hs[..3]);
            }
            assert_eq!(sorted(a.hashes(0, TIER_GPU)), sorted(b.hashes(0, TIER_GPU)));
            assert_eq!(sorted(a.hashes(1, TIER_GPU)), sorted(b.hashes(1, TIER_GPU)));
            assert_eq!(sorted(a.hashes(0, 1)), sorted(b.hashes(0, 1)));
            assert!(b.clock <= 256);
        }
        assert_eq!(a.evicted(), b.evicted());
    }
}

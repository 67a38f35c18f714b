//! Engine block hash -> router block hash for one worker, exactly as
//! `engine_adapters/block_mapper.py` (`BlockMapper.map_batch`) does it: one
//! map per cache tier with refcounted router hashes, repeated announcements
//! counted on tiers other than the GPU, placeholders mapped through known
//! engine hashes, stores of another block size refused, and ops merged
//! the same way (adjacent ops of one kind and tier, CLEAR never).

use crate::events::{
    tenancy, tier_of, Detail, EHash, Event, Removed, Stored, Tokens, SKIP_BLOCK_SIZE_MISMATCH,
    SKIP_NO_TOKEN_IDS, SKIP_UNDECODABLE, SKIP_UNKNOWN_MEDIUM, TIER_GPU,
};
use crate::hashing::{hash_packed, root_seed, HashError};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

pub const OP_STORE: u8 = 0;
pub const OP_REMOVE: u8 = 1;
pub const OP_CLEAR: u8 = 2;

/// A multiply-rotate hasher: engine and router hashes are already spread
/// (as with Python's int hash, a crafted key set can collide; engines are
/// trusted to name their blocks).
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// Engine hash -> router hash. Engines name blocks with ints in
/// `[0, 2^64)`: those sit in a table keyed by `u64` (16-byte entries, a
/// third of an `EHash` key's, so fewer cache lines per lookup); any other
/// engine hash (negative, wider, bytes) in a second table.
#[derive(Default, Clone)]
pub struct EhMap {
    ints: FastMap<u64, u64>,
    other: FastMap<EHash, u64>,
}

fn as_u64(eh: &EHash) -> Option<u64> {
    match eh {
        EHash::Int(v) => u64::try_from(*v).ok(),
        EHash::Bytes(_) => None,
    }
}

impl EhMap {
    pub fn get(&self, eh: &EHash) -> Option<&u64> {
        match as_u64(eh) {
            Some(k) => self.ints.get(&k),
            None => self.other.get(eh),
        }
    }

    pub fn insert(&mut self, eh: EHash, rh: u64) -> Option<u64> {
        match as_u64(&eh) {
            Some(k) => self.ints.insert(k, rh),
            None => self.other.insert(eh, rh),
        }
    }

    /// Binds `eh` to `rh` if it is not bound (None); else its binding,
    /// unchanged. One lookup either way.
    pub fn bind_vacant(&mut self, eh: &EHash, rh: u64) -> Option<u64> {
        use std::collections::hash_map::Entry;
        match as_u64(eh) {
            Some(k) => match self.ints.entry(k) {
                Entry::Vacant(v) => {
                    v.insert(rh);
                    None
                }
                Entry::Occupied(o) => Some(*o.get()),
            },
            None => match self.other.entry(eh.clone()) {
                Entry::Vacant(v) => {
                    v.insert(rh);
                    None
                }
                Entry::Occupied(o) => Some(*o.get()),
            },
        }
    }

    pub fn remove(&mut self, eh: &EHash) -> Option<u64> {
        match as_u64(eh) {
            Some(k) => self.ints.remove(&k),
            None => self.other.remove(eh),
        }
    }

    pub fn len(&self) -> usize {
        self.ints.len() + self.other.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ints.is_empty() && self.other.is_empty()
    }

    /// Every pair (engine hashes made again: ints are cheap, bytes copied).
    pub fn iter(&self) -> impl Iterator<Item = (EHash, u64)> + '_ {
        let ints = self.ints.iter().map(|(k, rh)| (EHash::Int(i128::from(*k)), *rh));
        ints.chain(self.other.iter().map(|(eh, rh)| (eh.clone(), *rh)))
    }
}

/// `tokens` as little-endian u32s (what the block hash reads): the tokens'
/// own memory on a little-endian machine, else packed into `buf`.
fn le_bytes<'a>(tokens: &'a [u32], buf: &'a mut Vec<u8>) -> &'a [u8] {
    if cfg!(target_endian = "little") {
        // SAFETY: any initialised u32 is 4 initialised bytes, u8 needs no
        // alignment, and the slice borrows `tokens` for its whole life.
        unsafe { std::slice::from_raw_parts(tokens.as_ptr().cast::<u8>(), std::mem::size_of_val(tokens)) }
    } else {
        buf.clear();
        buf.reserve(tokens.len() * 4);
        for &x in tokens {
            buf.extend_from_slice(&x.to_le_bytes());
        }
        buf
    }
}

/// One tier's live blocks: engine hash -> router hash, and router hash ->
/// engine blocks naming it.
#[derive(Default, Clone)]
pub struct TierMap {
    pub to_router: EhMap,
    refs: FastMap<u64, u32>,
}

impl TierMap {
    fn unref(&mut self, rh: u64) -> bool {
        match self.refs.get_mut(&rh) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.refs.remove(&rh);
                true
            }
            None => false,
        }
    }

    /// `BlockMap.bind` for a key known not to be bound to `rh`.
    fn bind(&mut self, eh: EHash, rh: u64) {
        if let Some(old) = self.to_router.insert(eh, rh) {
            self.unref(old);
        }
        *self.refs.entry(rh).or_insert(0) += 1;
    }

    /// `BlockMap.unbind`: (router hash or None, that hash no longer live).
    fn unbind(&mut self, eh: &EHash) -> (Option<u64>, bool) {
        match self.to_router.remove(eh) {
            Some(rh) => (Some(rh), self.unref(rh)),
            None => (None, false),
        }
    }

    pub fn live(&self) -> impl Iterator<Item = u64> + '_ {
        self.refs.keys().copied()
    }
}

#[derive(Default, Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    pub stored: u64,
    pub removed: u64,
    pub cleared: u64,
    pub unknown_parent: u64,
    pub unknown_removed: u64,
    pub invalid_tokens: u64,
    pub placeholder_blocks: u64,
    pub skipped_events: u64,
    /// Reason -> count, in first-seen order (a dict in the Python path).
    pub skipped_by_reason: Vec<(&'static str, u64)>,
    pub block_size_mismatch: i128,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub kind: u8,
    pub tier: u8,
    pub hashes: Vec<u64>,
    pub ehashes: Vec<EHash>,
}

/// What the Python path logs while mapping (the caller logs these).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    Skipped { index: usize, reason: &'static str, detail: Detail },
    UnknownParent { blocks: usize },
    InvalidTokens { error: String },
}

/// The ops of one batch, merged as `map_batch`'s `emit` merges them.
struct Ops {
    done: Vec<Op>,
    cur: Option<Op>,
}

impl Ops {
    fn emit(&mut self, kind: u8, tier: u8, hashes: Vec<u64>, ehashes: Vec<EHash>) {
        if let Some(cur) = &mut self.cur {
            if cur.kind == kind && cur.tier == tier && kind != OP_CLEAR {
                cur.hashes.extend(hashes);
                cur.ehashes.extend(ehashes);
                return;
            }
        }
        if let Some(prev) = self.cur.replace(Op { kind, tier, hashes, ehashes }) {
            self.done.push(prev);
        }
    }

    fn finish(mut self) -> Vec<Op> {
        if let Some(cur) = self.cur.take() {
            self.done.push(cur);
        }
        self.done
    }
}

pub struct Mapper {
    pub model: String,
    pub block_size: Option<i128>,
    gpu: TierMap,
    /// Tiers other than the GPU, in the order their maps were made (the
    /// Python path's `BlockMap.lower` dict order, which decides where a
    /// placeholder's engine hash is found first).
    lower: Vec<(u8, TierMap)>,
    repeats: FastMap<(u8, EHash), u64>,
    /// GPU engine hash -> the KV-cache groups holding it (a bit each), for
    /// the blocks held by a group other than 0 (`block_mapper`'s docstring).
    groups: FastMap<EHash, u64>,
    /// The mapping came from a handover (`restore`): its blocks' groups are unknown.
    restored: bool,
    roots: HashMap<(Option<String>, Option<String>), u64>,
    pub stats: Stats,
    packed: Vec<u8>,
}

impl Mapper {
    pub fn new(model: String, block_size: Option<i128>) -> Self {
        Mapper {
            model,
            block_size,
            gpu: TierMap::default(),
            lower: Vec::new(),
            repeats: FastMap::default(),
            groups: FastMap::default(),
            restored: false,
            roots: HashMap::new(),
            stats: Stats::default(),
            packed: Vec::new(),
        }
    }

    fn map_of(&mut self, tier: u8) -> &mut TierMap {
        if tier == TIER_GPU {
            return &mut self.gpu;
        }
        let i = match self.lower.iter().position(|(t, _)| *t == tier) {
            Some(i) => i,
            None => {
                self.lower.push((tier, TierMap::default()));
                self.lower.len() - 1
            }
        };
        &mut self.lower[i].1
    }

    fn existing(&self, tier: u8) -> Option<&TierMap> {
        if tier == TIER_GPU {
            return Some(&self.gpu);
        }
        self.lower.iter().find(|(t, _)| *t == tier).map(|(_, m)| m)
    }

    /// The router hash of an engine block live on any tier (GPU first).
    pub fn router_hash(&self, eh: &EHash) -> Option<u64> {
        self.gpu
            .to_router
            .get(eh)
            .or_else(|| self.lower.iter().find_map(|(_, m)| m.to_router.get(eh)))
            .copied()
    }

    pub fn len(&self) -> usize {
        self.gpu.to_router.len() + self.lower.iter().map(|(_, m)| m.to_router.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tier -> its live router hashes, for every tier with live blocks, GPU first.
    pub fn tiers(&self) -> Vec<(u8, &TierMap)> {
        let mut out: Vec<(u8, &TierMap)> = Vec::new();
        if !self.gpu.to_router.is_empty() {
            out.push((TIER_GPU, &self.gpu));
        }
        let mut lower: Vec<(u8, &TierMap)> =
            self.lower.iter().filter(|(_, m)| !m.to_router.is_empty()).map(|(t, m)| (*t, m)).collect();
        lower.sort_by_key(|(t, _)| *t);
        out.extend(lower);
        out
    }

    pub fn gpu(&self) -> &TierMap {
        &self.gpu
    }

    pub fn clear(&mut self) {
        self.gpu = TierMap::default();
        self.lower.clear();
        self.repeats.clear();
        self.groups.clear();
        self.restored = false;
    }

    /// Replaces the mapping with `pairs` (engine hash, router hash, tier).
    pub fn restore(&mut self, pairs: impl IntoIterator<Item = (EHash, u64, u8)>) {
        self.clear();
        self.restored = true;
        for (eh, rh, t) in pairs {
            let m = self.map_of(t);
            if m.to_router.get(&eh) != Some(&rh) {
                m.bind(eh, rh);
            }
        }
    }

    fn root(&mut self, lora: Option<&str>, salt: Option<&str>) -> u64 {
        let key = (lora.map(str::to_owned), salt.map(str::to_owned));
        if let Some(&seed) = self.roots.get(&key) {
            return seed;
        }
        let seed = root_seed(&self.model, lora, salt);
        self.roots.insert(key, seed);
        seed
    }

    fn skip(&mut self, notes: &mut Vec<Note>, index: usize, reason: &'static str, detail: Detail) {
        let st = &mut self.stats;
        st.skipped_events += 1;
        match st.skipped_by_reason.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => st.skipped_by_reason.push((reason, 1)),
        }
        notes.push(Note::Skipped { index, reason, detail });
    }

    /// `map_batch`: the ops of one batch, and what to log. `payload` holds
    /// the extra keys of events decoded from it.
    pub fn map_events<'e>(
        &mut self,
        events: impl IntoIterator<Item = &'e Event>,
        payload: &[u8],
    ) -> (Vec<Op>, Vec<Note>) {
        let mut ops = Ops { done: Vec::new(), cur: None };
        let mut notes = Vec::new();
        for (i, ev) in events.into_iter().enumerate() {
            match ev {
                Event::Stored(s) => self.on_stored(s, i, payload, &mut ops, &mut notes),
                Event::Removed(rm) => self.on_removed(rm, i, &mut ops, &mut notes),
                Event::Cleared => {
                    self.clear();
                    self.stats.cleared += 1;
                    ops.emit(OP_CLEAR, TIER_GPU, Vec::new(), Vec::new());
                }
                Event::Skipped { index, reason, detail } => {
                    self.skip(&mut notes, *index, reason, detail.clone())
                }
                Event::Ignored => {}
            }
        }
        (ops.finish(), notes)
    }

    fn on_stored(&mut self, s: &Stored, index: usize, payload: &[u8], ops: &mut Ops, notes: &mut Vec<Note>) {
        let Some(t) = tier_of(s.medium.as_deref(), s.locality.as_deref()) else {
            self.skip(notes, index, SKIP_UNKNOWN_MEDIUM, Detail::MapperMedium(s.medium.clone()));
            return;
        };
        if let Some(bad) = bad_group(s.group_idx) {
            self.skip(notes, index, SKIP_UNDECODABLE, Detail::Text(bad));
            return;
        }
        if s.tokens.is_empty() {
            if !s.block_hashes.is_empty() {
                self.placeholder(s, t, index, ops, notes);
            }
        } else if self.block_size.is_some_and(|bs| bs != s.block_size) {
            self.stats.block_size_mismatch = s.block_size;
            let detail = format!(
                "BlockStored of {} blocks of {} tokens; the engine is registered with block_size {}",
                s.block_hashes.len(),
                s.block_size,
                self.block_size.unwrap_or_default()
            );
            self.skip(notes, index, SKIP_BLOCK_SIZE_MISMATCH, Detail::Text(detail));
        } else {
            self.stats.block_size_mismatch = 0;
            self.store(s, t, payload, ops, notes);
        }
    }

    fn on_removed(&mut self, rm: &Removed, index: usize, ops: &mut Ops, notes: &mut Vec<Note>) {
        let Some(t) = tier_of(rm.medium.as_deref(), rm.locality.as_deref()) else {
            self.skip(notes, index, SKIP_UNKNOWN_MEDIUM, Detail::MapperMedium(rm.medium.clone()));
            return;
        };
        if let Some(bad) = bad_group(rm.group_idx) {
            self.skip(notes, index, SKIP_UNDECODABLE, Detail::Text(bad));
            return;
        }
        let (gone, egone) = self.remove(&rm.block_hashes, t, group_bit(rm.group_idx));
        if !egone.is_empty() {
            ops.emit(OP_REMOVE, t, gone, egone);
        }
    }

    /// Router hashes of a store's blocks, or why there are none.
    fn hashes(&mut self, tokens: &Tokens, block_size: i128, parent: u64) -> Result<Vec<u64>, HashError> {
        if block_size < 1 {
            return Err(HashError::BadBlockSize(block_size));
        }
        let n = tokens.len();
        let bs = usize::try_from(block_size).unwrap_or(usize::MAX);
        let mut out = Vec::with_capacity(n / bs.max(1));
        if n / bs == 0 {
            return Ok(out); // the Python path packs (and checks) nothing then
        }
        match tokens {
            Tokens::Narrow(v) => {
                hash_packed(le_bytes(v, &mut self.packed), bs, parent, &mut out);
                Ok(out)
            }
            Tokens::Wide(v) => {
                let bad = v.iter().copied().find(|&x| u32::try_from(x).is_err()).unwrap_or(-1);
                Err(HashError::BadToken(bad))
            }
            Tokens::Opaque(_) => Err(HashError::BadToken(-1)),
        }
    }

    fn store(&mut self, s: &Stored, t: u8, payload: &[u8], ops: &mut Ops, notes: &mut Vec<Note>) {
        self.map_of(t); // made before the parent is looked up, as in the Python path
        let parent = match &s.parent {
            None => {
                let (lora, salt) = tenancy(s, payload);
                Some(self.root(lora, salt))
            }
            Some(p) => {
                self.existing(t).and_then(|m| m.to_router.get(p).copied()).or_else(|| self.router_hash(p))
            }
        };
        let n = s.block_hashes.len();
        let Some(parent) = parent else {
            self.stats.unknown_parent += n as u64;
            notes.push(Note::UnknownParent { blocks: n });
            return;
        };
        let hashes = match self.hashes(&s.tokens, s.block_size, parent) {
            Ok(h) => h,
            Err(e) => {
                self.stats.invalid_tokens += n as u64;
                notes.push(Note::InvalidTokens { error: e.to_string() });
                return;
            }
        };
        self.stats.stored += n as u64;
        let bit = if t == TIER_GPU { group_bit(s.group_idx) } else { 0 };
        self.bind_each(t, s.block_hashes.iter().cloned().zip(hashes), ops, bit);
    }

    /// `_bind_each`: binds each pair on tier `t`, emitting what changed;
    /// `bit`: the storing KV-cache group's (0: none, or not the GPU).
    fn bind_each(&mut self, t: u8, pairs: impl Iterator<Item = (EHash, u64)>, ops: &mut Ops, bit: u64) {
        let (lo, hi) = pairs.size_hint();
        let mut hs: Vec<u64> = Vec::with_capacity(hi.unwrap_or(lo));
        let mut ehs: Vec<EHash> = Vec::with_capacity(hi.unwrap_or(lo));
        self.map_of(t);
        for (eh, rh) in pairs {
            let m = if t == TIER_GPU { &mut self.gpu } else { self.map_of(t) };
            let Some(old) = m.to_router.bind_vacant(&eh, rh) else {
                // the common case, a new block: one lookup
                *m.refs.entry(rh).or_insert(0) += 1;
                if bit > GROUP_0 {
                    self.groups.insert(eh.clone(), bit);
                }
                hs.push(rh);
                ehs.push(eh);
                continue;
            };
            if old == rh {
                if t != TIER_GPU {
                    // announced again: goes with its last removal
                    *self.repeats.entry((t, eh)).or_insert(0) += 1;
                } else if bit > GROUP_0 || (bit != 0 && !self.groups.is_empty()) {
                    // another group holds it too
                    let held = self.groups.get(&eh).copied().unwrap_or(GROUP_0) | bit;
                    if held != GROUP_0 {
                        self.groups.insert(eh, held);
                    }
                }
                continue;
            }
            // same engine hash, other content: the engine reused it
            if !hs.is_empty() {
                ops.emit(OP_STORE, t, std::mem::take(&mut hs), std::mem::take(&mut ehs));
            }
            let (_, dropped) = m.unbind(&eh);
            m.bind(eh.clone(), rh);
            self.repeats.remove(&(t, eh.clone()));
            if t == TIER_GPU {
                self.groups.remove(&eh);
            }
            if bit > GROUP_0 {
                self.groups.insert(eh.clone(), bit);
            }
            ops.emit(OP_REMOVE, t, if dropped { vec![old] } else { Vec::new() }, vec![eh.clone()]);
            hs.push(rh);
            ehs.push(eh);
        }
        if !hs.is_empty() {
            ops.emit(OP_STORE, t, hs, ehs);
        }
    }

    fn placeholder(&mut self, s: &Stored, t: u8, index: usize, ops: &mut Ops, notes: &mut Vec<Note>) {
        let found: Vec<Option<u64>> = s.block_hashes.iter().map(|eh| self.router_hash(eh)).collect();
        let hashes: Vec<u64> = found.iter().flatten().copied().collect();
        let unknown = found.len() - hashes.len();
        if unknown > 0 {
            let medium = s.medium.as_deref().unwrap_or("None");
            let detail = format!(
                "BlockStored of {} blocks on {medium} carries no token ids, and {unknown} of its engine hashes were never stored with them",
                hashes.len()
            );
            self.skip(notes, index, SKIP_NO_TOKEN_IDS, Detail::Text(detail));
            return;
        }
        self.stats.stored += hashes.len() as u64;
        self.stats.placeholder_blocks += hashes.len() as u64;
        self.map_of(t);
        let bit = if t == TIER_GPU { group_bit(s.group_idx) } else { 0 };
        self.bind_each(t, s.block_hashes.iter().cloned().zip(hashes), ops, bit);
    }

    /// `_remove`: (router hashes no longer live on tier `t`, engine hashes
    /// forgotten); `bit`: the removing KV-cache group's (0: none). On the
    /// GPU a block another group holds stays.
    fn remove(&mut self, ehs: &[EHash], t: u8, bit: u64) -> (Vec<u64>, Vec<EHash>) {
        let mut out = Vec::new();
        let mut eout = Vec::new();
        if self.existing(t).is_none() {
            self.stats.unknown_removed += ehs.len() as u64;
            return (out, eout);
        }
        for eh in ehs {
            if t == TIER_GPU && (bit > GROUP_0 || !self.groups.is_empty()) {
                // group 0's alone, or unknown since a handover: this group's
                let unknown = if self.restored { bit } else { GROUP_0 };
                let held = self.groups.remove(eh).unwrap_or(unknown);
                let left = if bit == 0 { 0 } else { held & !bit };
                if left != 0 {
                    // another group still holds it
                    if left != GROUP_0 {
                        self.groups.insert(eh.clone(), left);
                    }
                    continue;
                }
            }
            if t != TIER_GPU && !self.repeats.is_empty() {
                let key = (t, eh.clone());
                if let Some(left) = self.repeats.get_mut(&key) {
                    // still announced by another holder of it on this tier
                    if *left <= 1 {
                        self.repeats.remove(&key);
                    } else {
                        *left -= 1;
                    }
                    continue;
                }
            }
            let Some(m) = (if t == TIER_GPU {
                Some(&mut self.gpu)
            } else {
                self.lower.iter_mut().find(|(x, _)| *x == t).map(|(_, m)| m)
            }) else {
                continue;
            };
            let (rh, dropped) = m.unbind(eh);
            let Some(rh) = rh else {
                self.stats.unknown_removed += 1;
                continue;
            };
            self.stats.removed += 1;
            eout.push(eh.clone());
            if dropped {
                out.push(rh);
            }
        }
        (out, eout)
    }

    /// Every live block: (engine hash, router hash, tier), GPU first, then
    /// the other tiers in tier order.
    pub fn export(&self) -> Vec<(EHash, u64, u8)> {
        let mut out: Vec<(EHash, u64, u8)> =
            self.gpu.to_router.iter().map(|(eh, rh)| (eh, rh, TIER_GPU)).collect();
        let mut lower: Vec<&(u8, TierMap)> = self.lower.iter().collect();
        lower.sort_by_key(|(t, _)| *t);
        for (t, m) in lower {
            out.extend(m.to_router.iter().map(|(eh, rh)| (eh, rh, *t)));
        }
        out
    }
}

/// KV-cache groups 0..=63: a block's groups are a 64-bit set.
const MAX_GROUP: i128 = 63;
/// The set of a GPU block no other group stored (the default).
const GROUP_0: u64 = 1;

/// The bit of an event's `group_idx` (0: none); `bad_group` first.
fn group_bit(g: Option<i128>) -> u64 {
    match g {
        Some(g) if (0..=MAX_GROUP).contains(&g) => 1u64 << g,
        _ => 0,
    }
}

/// `_bad_group`: why `group_idx` cannot be a KV-cache group, or None.
fn bad_group(g: Option<i128>) -> Option<String> {
    match g {
        Some(g) if !(0..=MAX_GROUP).contains(&g) => {
            Some(format!("group_idx {g} is not a KV-cache group (0..{MAX_GROUP})"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{ExtraKeys, Removed};
    use crate::hashing::block_hashes;

    fn stored(ehs: &[i128], parent: Option<i128>, tokens: &[u32], medium: Option<&str>) -> Event {
        Event::Stored(Box::new(Stored {
            block_hashes: ehs.iter().map(|&e| EHash::Int(e)).collect(),
            parent: parent.map(EHash::Int),
            tokens: Tokens::Narrow(tokens.to_vec()),
            block_size: 4,
            lora_id: None,
            medium: medium.map(str::to_owned),
            lora_name: None,
            extra_keys: ExtraKeys::Absent,
            group_idx: None,
            cache_salt: None,
            locality: None,
            ownership: None,
            lookahead: None,
        }))
    }

    fn removed(ehs: &[i128], medium: Option<&str>) -> Event {
        Event::Removed(Removed {
            block_hashes: ehs.iter().map(|&e| EHash::Int(e)).collect(),
            medium: medium.map(str::to_owned),
            group_idx: None,
            locality: None,
            ownership: None,
        })
    }

    #[test]
    fn a_chained_store_maps_to_router_hashes_and_removal_refcounts() {
        let toks: Vec<u32> = (0..8).collect();
        let wide: Vec<i128> = toks.iter().map(|&t| i128::from(t)).collect();
        let want = block_hashes(&wide, 4, root_seed("m", None, None)).unwrap();
        let mut m = Mapper::new("m".into(), Some(4));
        let (ops, _) = m.map_events(
            &[stored(&[1], None, &toks[..4], None), stored(&[2], Some(1), &toks[4..], None)],
            &[],
        );
        assert_eq!(
            ops,
            vec![Op {
                kind: OP_STORE,
                tier: 0,
                hashes: want.clone(),
                ehashes: vec![EHash::Int(1), EHash::Int(2)]
            }]
        );
        // A second engine block of the same content: the router hash goes with the last.
        m.map_events(&[stored(&[3], None, &toks[..4], None)], &[]);
        let (ops, _) = m.map_events(&[removed(&[1], None)], &[]);
        assert_eq!(ops[0].hashes, Vec::<u64>::new());
        let (ops, _) = m.map_events(&[removed(&[3, 99], None)], &[]);
        assert_eq!(ops[0].hashes, vec![want[0]]);
        assert_eq!(m.stats.unknown_removed, 1);
    }

    #[test]
    fn a_lower_tier_block_announced_twice_goes_with_its_second_removal() {
        let toks: Vec<u32> = (0..4).collect();
        let mut m = Mapper::new("m".into(), None);
        let ev = stored(&[1], None, &toks, Some("CPU"));
        m.map_events(&[ev.clone(), ev], &[]);
        assert!(m.map_events(&[removed(&[1], Some("CPU"))], &[]).0.is_empty());
        assert_eq!(m.map_events(&[removed(&[1], Some("CPU"))], &[]).0.len(), 1);
        assert!(m.is_empty());
    }
}

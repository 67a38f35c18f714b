//! The engines' KV-event batches, decoded exactly as
//! `engine_adapters/kv_events.py` (`decode_batch`) decodes them: the same
//! shapes accepted (array or map envelope; tagged-map, positional-array and
//! bigram-page events), the same events skipped for the same reasons, the
//! same envelopes refused. Only the wording of an `undecodable` skip's
//! detail and of an envelope error differs (it imitates msgspec's).

use crate::msgpack::{expected, Error, Kind, Reader, Result, MAX_DEPTH};
use std::hash::{Hash, Hasher};

pub const SKIP_UNDECODABLE: &str = "undecodable";
pub const SKIP_NO_TOKEN_IDS: &str = "no_token_ids";
pub const SKIP_BAD_BLOCK_SIZE: &str = "bad_block_size";
pub const SKIP_TOKEN_COUNT: &str = "token_count_mismatch";
pub const SKIP_BIGRAM_NOT_CHAINED: &str = "bigram_not_chained";
pub const SKIP_UNKNOWN_MEDIUM: &str = "unknown_medium";
pub const SKIP_BLOCK_SIZE_MISMATCH: &str = "block_size_mismatch";

pub const TIER_GPU: u8 = 0;
pub const TIER_HOST: u8 = 1;
pub const TIER_DISK: u8 = 2;
pub const TIER_EXTERNAL: u8 = 3;
pub const N_TIERS: u8 = 4;

/// An engine's opaque block id: an int (unsigned or signed 64-bit on the
/// wire) or bytes, as the engine sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EHash {
    Int(i128),
    Bytes(Box<[u8]>),
}

impl Hash for EHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            EHash::Int(v) => state.write_u64((*v as u64) ^ ((*v >> 64) as u64).rotate_left(17)),
            EHash::Bytes(b) => {
                state.write_u8(1);
                state.write(b);
            }
        }
    }
}

/// Token ids as decoded: u32 while every id fits (the ones the router can
/// hash), else as read; `Opaque` is a caller's list with an id that is not
/// a u32 (its length only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tokens {
    Narrow(Vec<u32>),
    Wide(Vec<i128>),
    Opaque(usize),
}

impl Tokens {
    pub fn len(&self) -> usize {
        match self {
            Tokens::Narrow(v) => v.len(),
            Tokens::Wide(v) => v.len(),
            Tokens::Opaque(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, t: i128) {
        match self {
            Tokens::Narrow(v) => match u32::try_from(t) {
                Ok(x) => v.push(x),
                Err(_) => {
                    let mut w: Vec<i128> = v.iter().map(|&x| i128::from(x)).collect();
                    w.push(t);
                    *self = Tokens::Wide(w);
                }
            },
            Tokens::Wide(v) => v.push(t),
            Tokens::Opaque(n) => *n += 1,
        }
    }
}

/// Where the cache salt of a store's extra keys is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtraKeys {
    Absent,
    /// The raw `extra_keys` array in the payload (start, end).
    Span(usize, usize),
    /// Already read by the caller: the salt in the first block's keys.
    Salt(Option<String>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub block_hashes: Vec<EHash>,
    pub parent: Option<EHash>,
    pub tokens: Tokens,
    pub block_size: i128,
    pub lora_id: Option<i128>,
    pub medium: Option<String>,
    pub lora_name: Option<String>,
    pub extra_keys: ExtraKeys,
    pub group_idx: Option<i128>,
    pub cache_salt: Option<String>,
    pub locality: Option<String>,
    pub ownership: Option<String>,
    pub lookahead: Option<Vec<Vec<i128>>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Removed {
    pub block_hashes: Vec<EHash>,
    pub medium: Option<String>,
    pub group_idx: Option<i128>,
    pub locality: Option<String>,
    pub ownership: Option<String>,
}

/// A skip's detail: text, or the medium to be shown with Python's `repr`
/// (by the caller, which has it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detail {
    Text(String),
    /// "{kind} on medium {medium!r}, not a known cache tier"
    UnknownMedium(&'static str, Option<String>),
    /// "medium {medium!r}" (the block mapper's, for an event it was handed)
    MapperMedium(Option<String>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Stored(Box<Stored>),
    Removed(Removed),
    Cleared,
    Skipped {
        index: usize,
        reason: &'static str,
        detail: Detail,
    },
    /// Not an event (a caller's list may hold anything; it keeps its place).
    Ignored,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub ts: f64,
    pub data_parallel_rank: Option<i128>,
    pub attn_dp_rank: Option<i128>,
    pub events: Vec<Event>,
}

/// Checks of an `extra_keys` value the pure decoder leaves to its caller:
/// ext values and container map keys, whose acceptance is the reference
/// decoder's own business (timestamps, hashability).
pub trait AnyCheck {
    fn check(&self, raw: &[u8]) -> std::result::Result<(), String>;
}

/// Refuses every value it is asked about (for callers without the reference).
pub struct RefuseExotic;

impl AnyCheck for RefuseExotic {
    fn check(&self, _raw: &[u8]) -> std::result::Result<(), String> {
        Err("ext values and container map keys need the reference decoder".into())
    }
}

// --- cache tiers ---------------------------------------------------------------

fn tier_exact(m: &str) -> Option<u8> {
    match m {
        "GPU" => Some(TIER_GPU),
        "CPU" | "CPU_PINNED" => Some(TIER_HOST),
        "STORAGE" | "DISK" => Some(TIER_DISK),
        "EXTERNAL" => Some(TIER_EXTERNAL),
        _ => None,
    }
}

/// `tier_of(medium, locality)` of kv_events.py.
pub fn tier_of(medium: Option<&str>, locality: Option<&str>) -> Option<u8> {
    let tier = match medium {
        None => Some(TIER_GPU),
        Some(m) => tier_exact(m).or_else(|| tier_exact(&m.to_uppercase())),
    };
    match tier {
        Some(_) if locality == Some("REMOTE") => Some(TIER_EXTERNAL),
        t => t,
    }
}

// --- field readers ---------------------------------------------------------------

/// An engine hash, or the kind found instead.
#[inline]
fn ehash_of(r: &mut Reader<'_>) -> std::result::Result<EHash, Kind> {
    match r.int() {
        Ok(v) => Ok(EHash::Int(v)),
        Err(Kind::Bin) => r.bin().map(|b| EHash::Bytes(b.into())),
        Err(k) => Err(k),
    }
}

fn opt_ehash(r: &mut Reader<'_>, path: &str) -> Result<Option<EHash>> {
    if r.nil() {
        return Ok(None);
    }
    ehash_of(r).map(Some).map_err(|k| expected("int | bytes | null", k, path))
}

fn ehashes(r: &mut Reader<'_>, path: &str) -> Result<Vec<EHash>> {
    let n = r.array_len().map_err(|k| expected("array", k, path))?;
    let mut out = Vec::with_capacity(n.min(r.buf.len() - r.pos));
    for i in 0..n {
        // the path is made only for an error: this is the per-block loop
        out.push(ehash_of(r).map_err(|k| expected("int | bytes", k, &format!("{path}[{i}]")))?);
    }
    Ok(out)
}

fn int(r: &mut Reader<'_>, path: &str) -> Result<i128> {
    r.int().map_err(|k| expected("int", k, path))
}

fn opt_int(r: &mut Reader<'_>, path: &str) -> Result<Option<i128>> {
    if r.nil() {
        return Ok(None);
    }
    r.int().map(Some).map_err(|k| expected("int | null", k, path))
}

fn opt_str(r: &mut Reader<'_>, path: &str) -> Result<Option<String>> {
    if r.nil() {
        return Ok(None);
    }
    match r.str_bytes() {
        Ok(b) => std::str::from_utf8(b)
            .map(|s| Some(s.to_owned()))
            .map_err(|_| Error("Invalid UTF-8 encoded string".into())),
        Err(k) => Err(expected("str | null", k, path)),
    }
}

fn tokens(r: &mut Reader<'_>, path: &str) -> Result<Tokens> {
    let n = r.array_len().map_err(|k| expected("array", k, path))?;
    let mut v: Vec<u32> = Vec::with_capacity(n.min(r.buf.len() - r.pos));
    let fast = r.small_uints(n, &mut v);
    for i in fast..n {
        if let Some(t) = r.small_uint() {
            v.push(t);
            continue;
        }
        match r.int() {
            Ok(t) => match u32::try_from(t) {
                Ok(x) => v.push(x),
                Err(_) => {
                    let mut out = Tokens::Narrow(v);
                    out.push(t);
                    for j in i + 1..n {
                        out.push(int(r, &format!("{path}[{j}]"))?);
                    }
                    return Ok(out);
                }
            },
            Err(k) => return Err(expected("int", k, &format!("{path}[{i}]"))),
        }
    }
    Ok(Tokens::Narrow(v))
}

fn int_lists(r: &mut Reader<'_>, path: &str) -> Result<Option<Vec<Vec<i128>>>> {
    if r.nil() {
        return Ok(None);
    }
    let n = r.array_len().map_err(|k| expected("array | null", k, path))?;
    let mut out = Vec::with_capacity(n.min(r.buf.len() - r.pos));
    for i in 0..n {
        let m = r.array_len().map_err(|k| expected("array", k, &format!("{path}[{i}]")))?;
        let mut inner = Vec::with_capacity(m.min(r.buf.len() - r.pos));
        for j in 0..m {
            inner.push(int(r, &format!("{path}[{i}][{j}]"))?);
        }
        out.push(inner);
    }
    Ok(Some(out))
}

/// One field the reference decodes as `Any` and kvmesh does not use: checked
/// as the reference would build it, then dropped.
fn any_field(r: &mut Reader<'_>, check: &dyn AnyCheck) -> Result<()> {
    let start = r.pos;
    if any_value(r, 1)? {
        check.check(&r.buf[start..r.pos]).map_err(Error)?;
    }
    Ok(())
}

/// Checks one `Any` value as the reference decoder would build it; true if
/// it holds something only the reference can judge (see [`AnyCheck`]).
fn any_value(r: &mut Reader<'_>, depth: usize) -> Result<bool> {
    if depth > MAX_DEPTH {
        return Err(Error("nested deeper than the reader allows".into()));
    }
    match r.peek_kind()? {
        Kind::Str => {
            r.str("")?;
            Ok(false)
        }
        Kind::Ext => {
            r.skip()?;
            Ok(true)
        }
        Kind::Array => {
            let n = r.array_len().map_err(|k| expected("array", k, ""))?;
            let mut exotic = false;
            for _ in 0..n {
                exotic |= any_value(r, depth + 1)?;
            }
            Ok(exotic)
        }
        Kind::Map => {
            let n = r.map_len().map_err(|k| expected("object", k, ""))?;
            let mut exotic = false;
            for _ in 0..n {
                match r.peek_kind()? {
                    Kind::Str => {
                        r.str("")?;
                    }
                    Kind::Array | Kind::Map | Kind::Ext => {
                        r.skip_at(depth + 1)?;
                        exotic = true;
                    }
                    _ => r.skip()?,
                }
                exotic |= any_value(r, depth + 1)?;
            }
            Ok(exotic)
        }
        _ => {
            r.skip()?;
            Ok(false)
        }
    }
}

fn extra_keys(r: &mut Reader<'_>, path: &str, check: &dyn AnyCheck) -> Result<ExtraKeys> {
    if r.nil() {
        return Ok(ExtraKeys::Absent);
    }
    let start = r.pos;
    let n = r.array_len().map_err(|k| expected("array | null", k, path))?;
    let mut exotic = false;
    for _ in 0..n {
        exotic |= any_value(r, 1)?;
    }
    if exotic {
        check.check(&r.buf[start..r.pos]).map_err(Error)?;
    }
    Ok(ExtraKeys::Span(start, r.pos))
}

/// A struct map's key, as bytes (a key that is not UTF-8 is merely unknown).
fn key<'a>(r: &mut Reader<'a>) -> Result<&'a [u8]> {
    r.str_bytes().map_err(|k| Error(format!("Expected `str`, got `{}` - at `key` in `$`", k.name())))
}

fn missing(field: &str) -> Error {
    Error(format!("Object missing required field `{field}`"))
}

fn invalid_tag(tag: &[u8], path: &str) -> Error {
    Error(format!("Invalid value '{}' - at `{path}`", String::from_utf8_lossy(tag)))
}

// --- events ----------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tag {
    Stored,
    Removed,
    Cleared,
}

fn tag_of(b: &[u8]) -> Option<Tag> {
    match b {
        b"BlockStored" => Some(Tag::Stored),
        b"BlockRemoved" => Some(Tag::Removed),
        b"AllBlocksCleared" => Some(Tag::Cleared),
        _ => None,
    }
}

fn tag_value<'a>(r: &mut Reader<'a>, path: &str) -> Result<&'a [u8]> {
    match r.str_bytes() {
        Ok(b) => {
            std::str::from_utf8(b).map_err(|_| Error("Invalid UTF-8 encoded string".into()))?;
            Ok(b)
        }
        Err(k) => Err(expected("str", k, path)),
    }
}

fn empty_stored() -> Stored {
    Stored {
        block_hashes: Vec::new(),
        parent: None,
        tokens: Tokens::Narrow(Vec::new()),
        block_size: 0,
        lora_id: None,
        medium: None,
        lora_name: None,
        extra_keys: ExtraKeys::Absent,
        group_idx: None,
        cache_salt: None,
        locality: None,
        ownership: None,
        lookahead: None,
    }
}

/// The fields of a tagged-map event whose tag is known, `n` pairs from
/// `r`; a repeated `type` key must repeat the tag.
fn map_fields(r: &mut Reader<'_>, kind: Tag, tag: &[u8], n: usize, check: &dyn AnyCheck) -> Result<Event> {
    let check_tag = |r: &mut Reader<'_>| -> Result<()> {
        let v = tag_value(r, "$.type")?;
        if v != tag {
            return Err(invalid_tag(v, "$.type"));
        }
        Ok(())
    };
    match kind {
        Tag::Cleared => {
            for _ in 0..n {
                if key(r)? == b"type" {
                    check_tag(r)?;
                } else {
                    r.skip()?;
                }
            }
            Ok(Event::Cleared)
        }
        Tag::Removed => {
            let mut ev = Removed {
                block_hashes: Vec::new(),
                medium: None,
                group_idx: None,
                locality: None,
                ownership: None,
            };
            let mut have_hashes = false;
            for _ in 0..n {
                match key(r)? {
                    b"type" => check_tag(r)?,
                    b"block_hashes" => {
                        ev.block_hashes = ehashes(r, "$.block_hashes")?;
                        have_hashes = true;
                    }
                    b"medium" => ev.medium = opt_str(r, "$.medium")?,
                    b"group_idx" => ev.group_idx = opt_int(r, "$.group_idx")?,
                    b"locality" => ev.locality = opt_str(r, "$.locality")?,
                    b"ownership" => ev.ownership = opt_str(r, "$.ownership")?,
                    _ => r.skip()?,
                }
            }
            if !have_hashes {
                return Err(missing("block_hashes"));
            }
            Ok(Event::Removed(ev))
        }
        Tag::Stored => {
            let mut ev = empty_stored();
            let mut have = [false; 4];
            for _ in 0..n {
                match key(r)? {
                    b"type" => check_tag(r)?,
                    b"block_hashes" => {
                        ev.block_hashes = ehashes(r, "$.block_hashes")?;
                        have[0] = true;
                    }
                    b"parent_block_hash" => {
                        ev.parent = opt_ehash(r, "$.parent_block_hash")?;
                        have[1] = true;
                    }
                    b"token_ids" => {
                        ev.tokens = tokens(r, "$.token_ids")?;
                        have[2] = true;
                    }
                    b"block_size" => {
                        ev.block_size = int(r, "$.block_size")?;
                        have[3] = true;
                    }
                    b"lora_id" => ev.lora_id = opt_int(r, "$.lora_id")?,
                    b"medium" => ev.medium = opt_str(r, "$.medium")?,
                    b"lora_name" => ev.lora_name = opt_str(r, "$.lora_name")?,
                    b"extra_keys" => ev.extra_keys = extra_keys(r, "$.extra_keys", check)?,
                    b"group_idx" => ev.group_idx = opt_int(r, "$.group_idx")?,
                    b"cache_salt" => ev.cache_salt = opt_str(r, "$.cache_salt")?,
                    b"locality" => ev.locality = opt_str(r, "$.locality")?,
                    b"ownership" => ev.ownership = opt_str(r, "$.ownership")?,
                    b"lookahead_token_ids" => ev.lookahead = int_lists(r, "$.lookahead_token_ids")?,
                    _ => r.skip()?,
                }
            }
            for (i, f) in ["block_hashes", "parent_block_hash", "token_ids", "block_size"].iter().enumerate()
            {
                if !have[i] {
                    return Err(missing(f));
                }
            }
            Ok(Event::Stored(Box::new(ev)))
        }
    }
}

/// A tagged-map event (vLLM >= 0.24, SGLang): `{"type": ..., fields}`,
/// read in one pass when the tag comes first (as every engine writes it).
fn tagged_map(r: &mut Reader<'_>, check: &dyn AnyCheck) -> Result<Event> {
    let n = r.map_len().map_err(|k| expected("object", k, "$"))?;
    let mut first = r.clone();
    if n > 0 && key(&mut first)? == b"type" {
        let tag = tag_value(&mut first, "$.type")?;
        let kind = tag_of(tag).ok_or_else(|| invalid_tag(tag, "$.type"))?;
        *r = first;
        return map_fields(r, kind, tag, n - 1, check);
    }
    // The tag elsewhere: find it first, then read the fields.
    let mut scan = r.clone();
    let mut tag: Option<&[u8]> = None;
    for _ in 0..n {
        if key(&mut scan)? == b"type" {
            let v = tag_value(&mut scan, "$.type")?;
            match tag {
                Some(t) if t != v => return Err(invalid_tag(v, "$.type")),
                _ => tag = Some(v),
            }
        } else {
            scan.skip()?;
        }
    }
    let tag = tag.ok_or_else(|| missing("type"))?;
    let kind = tag_of(tag).ok_or_else(|| invalid_tag(tag, "$.type"))?;
    map_fields(r, kind, tag, n, check)
}

/// A store whose token ids are pairs (SGLang's EAGLE bigram pages), as
/// kv_events.py's `_PairBlockStored` reads it: fields it does not declare
/// (extra keys, locality, ...) are ignored.
fn pair_map(r: &mut Reader<'_>, index: usize) -> Result<Event> {
    let n = r.map_len().map_err(|k| expected("object", k, "$"))?;
    let mut ev = empty_stored();
    let mut pairs: Vec<(i128, i128)> = Vec::new();
    let mut have = [false; 4];
    for _ in 0..n {
        match key(r)? {
            b"type" => {
                let v = tag_value(r, "$.type")?;
                if v != b"BlockStored" {
                    return Err(invalid_tag(v, "$.type"));
                }
            }
            b"block_hashes" => {
                ev.block_hashes = ehashes(r, "$.block_hashes")?;
                have[0] = true;
            }
            b"parent_block_hash" => {
                ev.parent = opt_ehash(r, "$.parent_block_hash")?;
                have[1] = true;
            }
            b"token_ids" => {
                let m = r.array_len().map_err(|k| expected("array", k, "$.token_ids"))?;
                pairs.clear();
                for i in 0..m {
                    let path = format!("$.token_ids[{i}]");
                    match r.array_len() {
                        Ok(2) => {}
                        Ok(l) => {
                            return Err(Error(format!("Expected `array` of length 2, got {l} - at `{path}`")))
                        }
                        Err(k) => return Err(expected("array", k, &path)),
                    }
                    let a = int(r, &format!("{path}[0]"))?;
                    let b = int(r, &format!("{path}[1]"))?;
                    pairs.push((a, b));
                }
                have[2] = true;
            }
            b"block_size" => {
                ev.block_size = int(r, "$.block_size")?;
                have[3] = true;
            }
            b"lora_id" => ev.lora_id = opt_int(r, "$.lora_id")?,
            b"medium" => ev.medium = opt_str(r, "$.medium")?,
            b"lora_name" => ev.lora_name = opt_str(r, "$.lora_name")?,
            b"cache_salt" => ev.cache_salt = opt_str(r, "$.cache_salt")?,
            _ => r.skip()?,
        }
    }
    for (i, f) in ["block_hashes", "parent_block_hash", "token_ids", "block_size"].iter().enumerate() {
        if !have[i] {
            return Err(missing(f));
        }
    }
    // _from_bigrams: the pairs must chain, each page keeps its last next token.
    for k in 0..pairs.len().saturating_sub(1) {
        if pairs[k].1 != pairs[k + 1].0 {
            let detail = format!(
                "token pair {k} ends with {}, pair {} starts with {}",
                pairs[k].1,
                k + 1,
                pairs[k + 1].0
            );
            return Ok(Event::Skipped {
                index,
                reason: SKIP_BIGRAM_NOT_CHAINED,
                detail: Detail::Text(detail),
            });
        }
    }
    let bs = ev.block_size;
    if bs > 0 {
        let step = usize::try_from(bs).unwrap_or(usize::MAX);
        let mut look = Vec::new();
        let mut end = step;
        while end <= pairs.len() {
            look.push(vec![pairs[end - 1].1]);
            end = match end.checked_add(step) {
                Some(e) => e,
                None => break,
            };
        }
        ev.lookahead = Some(look);
    }
    let mut toks = Tokens::Narrow(Vec::with_capacity(pairs.len()));
    for &(a, _) in &pairs {
        toks.push(a);
    }
    ev.tokens = toks;
    Ok(Event::Stored(Box::new(ev)))
}

/// A positional event (vLLM <= 0.23, and builds that kept the shape while
/// adding fields): `[tag, fields...]` in vLLM's field order.
fn tagged_array(r: &mut Reader<'_>, check: &dyn AnyCheck) -> Result<Event> {
    let n = r.array_len().map_err(|k| expected("array", k, "$"))?;
    if n == 0 {
        return Err(Error("Expected `array` of at least length 1, got 0".into()));
    }
    let tag = tag_value(r, "$[0]")?;
    let kind = tag_of(tag).ok_or_else(|| invalid_tag(tag, "$[0]"))?;
    let at_least = |need: usize| {
        if n < need {
            Err(Error(format!("Expected `array` of at least length {need}, got {n}")))
        } else {
            Ok(())
        }
    };
    match kind {
        Tag::Cleared => {
            skip_n(r, n - 1)?;
            Ok(Event::Cleared)
        }
        Tag::Removed => {
            at_least(2)?;
            let block_hashes = ehashes(r, "$[1]")?;
            let medium = if n > 2 { opt_str(r, "$[2]")? } else { None };
            let group_idx = if n > 3 { opt_int(r, "$[3]")? } else { None };
            let locality = if n > 4 { opt_str(r, "$[4]")? } else { None };
            let ownership = if n > 5 { opt_str(r, "$[5]")? } else { None };
            skip_n(r, n.saturating_sub(6))?;
            Ok(Event::Removed(Removed { block_hashes, medium, group_idx, locality, ownership }))
        }
        Tag::Stored => {
            at_least(5)?;
            let mut ev = empty_stored();
            ev.block_hashes = ehashes(r, "$[1]")?;
            ev.parent = opt_ehash(r, "$[2]")?;
            ev.tokens = tokens(r, "$[3]")?;
            ev.block_size = int(r, "$[4]")?;
            if n > 5 {
                ev.lora_id = opt_int(r, "$[5]")?;
            }
            if n > 6 {
                ev.medium = opt_str(r, "$[6]")?;
            }
            if n > 7 {
                ev.lora_name = opt_str(r, "$[7]")?;
            }
            if n > 8 {
                ev.extra_keys = extra_keys(r, "$[8]", check)?;
            }
            if n > 9 {
                ev.group_idx = opt_int(r, "$[9]")?;
            }
            // kv_cache_spec_kind and its sliding window: not used (every
            // group's blocks are indexed, see the mapper), read as `Any`.
            for _ in 10..n.min(12) {
                any_field(r, check)?;
            }
            if n > 12 {
                ev.locality = opt_str(r, "$[12]")?;
            }
            if n > 13 {
                ev.ownership = opt_str(r, "$[13]")?;
            }
            if n > 14 {
                any_field(r, check)?; // session_id: not used
            }
            if n > 15 {
                ev.lookahead = int_lists(r, "$[15]")?;
            }
            skip_n(r, n.saturating_sub(16))?;
            Ok(Event::Stored(Box::new(ev)))
        }
    }
}

fn skip_n(r: &mut Reader<'_>, n: usize) -> Result<()> {
    for _ in 0..n {
        r.skip()?;
    }
    Ok(())
}

/// One event by its own shape, `r` left at its end; an event that cannot
/// be read is a skip, and only a malformed value (the envelope's fault:
/// the reference decoder cannot even cut it out) an `Err`.
fn decode_event(r: &mut Reader<'_>, index: usize, check: &dyn AnyCheck) -> Result<Event> {
    let start = r.clone();
    let result = match r.peek_kind()? {
        Kind::Map => tagged_map(r, check).or_else(|e| {
            *r = start.clone();
            pair_map(r, index).map_err(|_| e)
        }),
        Kind::Array => tagged_array(r, check),
        _ => Err(Error("neither a tagged map nor a tagged array".into())),
    };
    match result {
        Ok(ev) => Ok(ev),
        Err(e) => {
            *r = start;
            r.skip()?;
            Ok(Event::Skipped { index, reason: SKIP_UNDECODABLE, detail: Detail::Text(e.0) })
        }
    }
}

/// `_store_problem` / `_medium_problem` of kv_events.py.
fn problem(ev: &Event, index: usize) -> Option<Event> {
    let skip = |reason, detail| Some(Event::Skipped { index, reason, detail });
    let medium_problem = |kind: &'static str, medium: &Option<String>| {
        if tier_of(medium.as_deref(), None).is_some() {
            None
        } else {
            skip(SKIP_UNKNOWN_MEDIUM, Detail::UnknownMedium(kind, medium.clone()))
        }
    };
    match ev {
        Event::Stored(s) => {
            let n_tokens = s.tokens.len() as i128;
            let n_blocks = s.block_hashes.len() as i128;
            let bs = s.block_size;
            if (bs > 0 && n_blocks.checked_mul(bs) == Some(n_tokens)) || n_tokens == 0 {
                medium_problem("BlockStored", &s.medium)
            } else if bs <= 0 {
                skip(SKIP_BAD_BLOCK_SIZE, Detail::Text(format!("BlockStored with block_size {bs}")))
            } else {
                skip(
                    SKIP_TOKEN_COUNT,
                    Detail::Text(format!(
                        "BlockStored carries {n_tokens} token ids for {n_blocks} blocks of {bs}"
                    )),
                )
            }
        }
        Event::Removed(rm) => medium_problem("BlockRemoved", &rm.medium),
        _ => None,
    }
}

fn ts(r: &mut Reader<'_>, path: &str) -> Result<f64> {
    r.float().map_err(|k| expected("float", k, path))
}

fn read_events(r: &mut Reader<'_>, path: &str, check: &dyn AnyCheck) -> Result<Vec<Event>> {
    let n = r.array_len().map_err(|k| expected("array", k, path))?;
    let mut out = Vec::with_capacity(n.min(r.buf.len() - r.pos));
    for i in 0..n {
        let ev = decode_event(r, i, check)?;
        out.push(problem(&ev, i).unwrap_or(ev));
    }
    Ok(out)
}

/// `decode_batch` of kv_events.py; an `Err` is its `EventDecodeError`.
pub fn decode_frame(payload: &[u8], check: &dyn AnyCheck) -> Result<Frame> {
    if payload.is_empty() {
        return Err(Error("empty payload".into()));
    }
    let malformed = |e: Error| Error(format!("malformed KV event batch: {e}"));
    let mut r = Reader::new(payload);
    let kind = r.peek_kind().map_err(malformed)?;
    let (ts, events, dp, attn) = match kind {
        Kind::Array => {
            let n = r.array_len().map_err(|k| malformed(expected("array", k, "")))?;
            if n < 2 {
                return Err(malformed(Error(format!("Expected `array` of at least length 2, got {n}"))));
            }
            let ts = ts(&mut r, "$[0]").map_err(malformed)?;
            let events = read_events(&mut r, "$[1]", check).map_err(malformed)?;
            let dp = if n > 2 { opt_int(&mut r, "$[2]").map_err(malformed)? } else { None };
            skip_n(&mut r, n.saturating_sub(3)).map_err(malformed)?;
            (ts, events, dp, None)
        }
        Kind::Map => {
            let n = r.map_len().map_err(|k| malformed(expected("object", k, "")))?;
            let (mut t, mut events, mut dp, mut attn) = (None, None, None, None);
            for _ in 0..n {
                match key(&mut r).map_err(malformed)? {
                    b"ts" => t = Some(ts(&mut r, "$.ts").map_err(malformed)?),
                    b"events" => events = Some(read_events(&mut r, "$.events", check).map_err(malformed)?),
                    b"data_parallel_rank" => {
                        dp = opt_int(&mut r, "$.data_parallel_rank").map_err(malformed)?
                    }
                    b"attn_dp_rank" => attn = opt_int(&mut r, "$.attn_dp_rank").map_err(malformed)?,
                    _ => r.skip().map_err(malformed)?,
                }
            }
            let t = t.ok_or_else(|| malformed(missing("ts")))?;
            let events = events.ok_or_else(|| malformed(missing("events")))?;
            (t, events, dp, attn)
        }
        _ => return Err(Error("payload is neither a msgpack array nor a map".into())),
    };
    // One value, nothing after it (msgspec reads the payload whole).
    if !r.at_end() {
        return Err(malformed(crate::msgpack::malformed("trailing characters", r.pos)));
    }
    Ok(Frame { ts, data_parallel_rank: dp, attn_dp_rank: attn, events })
}

/// `tenancy(event)` of block_mapper.py: the (LoRA name, cache salt) the
/// store's blocks were made under; `payload` holds its extra keys' span.
pub fn tenancy<'s>(s: &'s Stored, payload: &'s [u8]) -> (Option<&'s str>, Option<&'s str>) {
    let lora = s.lora_name.as_deref().filter(|l| !l.is_empty());
    if let Some(salt) = s.cache_salt.as_deref() {
        return (lora, Some(salt).filter(|v| !v.is_empty()));
    }
    let salt = match &s.extra_keys {
        ExtraKeys::Absent => None,
        ExtraKeys::Salt(v) => v.as_deref(),
        ExtraKeys::Span(a, b) => payload.get(*a..*b).and_then(|raw| salt_in_keys(raw, lora)),
    };
    (lora, salt)
}

/// The salt in the first block's entry of a raw `extra_keys` array
/// (`_salt_in(keys[0], lora)`), or None.
fn salt_in_keys<'a>(raw: &'a [u8], lora: Option<&str>) -> Option<&'a str> {
    let mut r = Reader::new(raw);
    let n = r.array_len().ok()?;
    if n == 0 {
        return None;
    }
    let m = r.array_len().ok()?; // an entry that is not a list holds no salt
    let mut lora_seen = lora.is_none();
    for _ in 0..m {
        match r.peek_kind().ok()? {
            Kind::Str => {
                let s = r.str("").ok()?;
                if !lora_seen && Some(s) == lora {
                    lora_seen = true; // untagged: the LoRA name comes first
                    continue;
                }
                return Some(s).filter(|v| !v.is_empty());
            }
            Kind::Array => {
                // tagged ("cache_salt", salt)
                let l = r.array_len().ok()?;
                let mut items = Vec::with_capacity(2);
                for _ in 0..l {
                    let save = r.clone();
                    items.push(match r.str("") {
                        Ok(s) => Some(s),
                        Err(_) => {
                            r = save;
                            r.skip().ok()?;
                            None
                        }
                    });
                }
                if l == 2 && items[0] == Some("cache_salt") {
                    if let Some(salt) = items[1] {
                        return Some(salt).filter(|v| !v.is_empty());
                    }
                }
            }
            Kind::Map => {
                // {"type": "cache_salt", "salt": ...}: the last of repeated keys counts
                let l = r.map_len().ok()?;
                let mut is_salt = false;
                let mut salt: Option<&str> = None;
                for _ in 0..l {
                    let k = if r.peek_kind().ok()? == Kind::Str { r.str("").ok() } else { None };
                    if k.is_none() {
                        r.skip().ok()?;
                    }
                    let v = if r.peek_kind().ok()? == Kind::Str {
                        r.str("").ok()
                    } else {
                        r.skip().ok()?;
                        None
                    };
                    match k {
                        Some("type") => is_salt = v == Some("cache_salt"),
                        Some("salt") => salt = v,
                        _ => {}
                    }
                }
                if is_salt {
                    return salt.filter(|v| !v.is_empty());
                }
            }
            _ => r.skip().ok()?,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: &str) -> Vec<u8> {
        let mut v = vec![0xa0 + t.len() as u8];
        v.extend_from_slice(t.as_bytes());
        v
    }

    fn batch(events: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![0x93, 0x01, 0x90 + events.len() as u8];
        for e in events {
            p.extend_from_slice(e);
        }
        p.push(0x00);
        p
    }

    fn stored_map(tokens: &[u8], bs: u8) -> Vec<u8> {
        let mut e = vec![0x85];
        e.extend(s("type"));
        e.extend(s("BlockStored"));
        e.extend(s("block_hashes"));
        e.extend([0x91, 0x07]);
        e.extend(s("parent_block_hash"));
        e.push(0xc0);
        e.extend(s("token_ids"));
        e.push(0x90 + tokens.len() as u8);
        e.extend_from_slice(tokens);
        e.extend(s("block_size"));
        e.push(bs);
        e
    }

    #[test]
    fn a_map_event_decodes_and_a_bad_one_is_skipped_alone() {
        let p = batch(&[stored_map(&[1, 2], 2), stored_map(&[1, 2, 3], 2), vec![0x07]]);
        let f = decode_frame(&p, &RefuseExotic).unwrap();
        assert_eq!(f.ts, 1.0);
        assert_eq!(f.data_parallel_rank, Some(0));
        match &f.events[0] {
            Event::Stored(st) => {
                assert_eq!(st.block_hashes, vec![EHash::Int(7)]);
                assert_eq!(st.tokens, Tokens::Narrow(vec![1, 2]));
            }
            e => panic!("{e:?}"),
        }
        assert!(matches!(f.events[1], Event::Skipped { index: 1, reason: SKIP_TOKEN_COUNT, .. }));
        assert!(matches!(f.events[2], Event::Skipped { index: 2, reason: SKIP_UNDECODABLE, .. }));
    }

    #[test]
    fn unreadable_envelopes_are_errors() {
        for p in [&b""[..], b"\xc3", b"\x91\x01", b"\x92\xa1x\x90", b"\x93\x01\x90\x00\x00", b"\x93\x01\x90"]
        {
            assert!(decode_frame(p, &RefuseExotic).is_err(), "{p:?}");
        }
    }

    #[test]
    fn tiers_follow_the_engines_names() {
        assert_eq!(tier_of(None, None), Some(TIER_GPU));
        assert_eq!(tier_of(Some("cpu_pinned"), None), Some(TIER_HOST));
        assert_eq!(tier_of(Some("GPU"), Some("REMOTE")), Some(TIER_EXTERNAL));
        assert_eq!(tier_of(Some("NVRAM"), Some("REMOTE")), None);
    }
}

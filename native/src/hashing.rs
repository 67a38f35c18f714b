//! Router block hashes, exactly as `blocks/hashing.py` computes them: block
//! `i` is `xxh3_64(tokens of block i as little-endian u32, seed = hash of
//! block i-1)`, block 0 seeded by `root_seed(model, lora_name, cache_salt)`.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// `_ROOT_TAG` of blocks/hashing.py: changing the scheme changes every hash.
const ROOT_TAG: &[u8] = b"kvmesh.block.v1";

fn field(out: &mut Vec<u8>, value: Option<&str>) {
    // None and "" must differ, and field boundaries must be unambiguous.
    match value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v.as_bytes());
        }
    }
}

/// The parent hash of a prompt's first block.
pub fn root_seed(model: &str, lora_name: Option<&str>, cache_salt: Option<&str>) -> u64 {
    let mut buf = Vec::with_capacity(ROOT_TAG.len() + 15 + model.len());
    buf.extend_from_slice(ROOT_TAG);
    field(&mut buf, Some(model));
    field(&mut buf, lora_name);
    field(&mut buf, cache_salt);
    xxh3_64(&buf)
}

/// Why token ids cannot be hashed (the Python path's ValueError).
#[derive(Debug, PartialEq, Eq)]
pub enum HashError {
    BadBlockSize(i128),
    BadToken(i128),
}

impl std::fmt::Display for HashError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HashError::BadBlockSize(b) => write!(f, "block_size must be a positive int, got {b}"),
            HashError::BadToken(t) => write!(f, "token ids must be ints in [0, 2**32): {t}"),
        }
    }
}

/// Token ids packed as little-endian u32, every one checked (the partial
/// tail too, as the Python path packs it).
pub fn pack(tokens: &[i128], out: &mut Vec<u8>) -> Result<(), HashError> {
    out.clear();
    out.reserve(tokens.len() * 4);
    for &t in tokens {
        let v = u32::try_from(t).map_err(|_| HashError::BadToken(t))?;
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(())
}

/// Chained hashes of the full blocks of already packed tokens.
pub fn hash_packed(packed: &[u8], block_size: usize, seed: u64, out: &mut Vec<u64>) {
    let step = block_size * 4;
    let mut h = seed;
    for block in packed.chunks_exact(step) {
        h = xxh3_64_with_seed(block, h);
        out.push(h);
    }
}

/// Chained hashes of every full block of `tokens` (the partial tail is skipped).
pub fn block_hashes(tokens: &[i128], block_size: i128, seed: u64) -> Result<Vec<u64>, HashError> {
    if block_size < 1 {
        return Err(HashError::BadBlockSize(block_size));
    }
    let mut packed = Vec::new();
    pack(tokens, &mut packed)?;
    let mut out = Vec::new();
    // A block size past the tokens' length yields no full block.
    match usize::try_from(block_size) {
        Ok(bs) if bs <= tokens.len() => hash_packed(&packed, bs, seed, &mut out),
        _ => {}
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chained_blocks_skip_the_tail_and_check_every_token() {
        let tokens: Vec<i128> = (0..10).collect();
        let hs = block_hashes(&tokens, 4, 7).unwrap();
        assert_eq!(hs.len(), 2);
        let first: Vec<u8> = (0u32..4).flat_map(|t| t.to_le_bytes()).collect();
        assert_eq!(hs[0], xxh3_64_with_seed(&first, 7));
        let second: Vec<u8> = (4u32..8).flat_map(|t| t.to_le_bytes()).collect();
        assert_eq!(hs[1], xxh3_64_with_seed(&second, hs[0]));
        assert_eq!(block_hashes(&[1, 2, -1], 2, 0), Err(HashError::BadToken(-1)));
        assert_eq!(block_hashes(&[1, 2], 0, 0), Err(HashError::BadBlockSize(0)));
        assert_eq!(block_hashes(&[1, 2], 1 << 70, 0), Ok(vec![]));
    }

    #[test]
    fn root_seeds_tell_none_from_empty() {
        assert_ne!(root_seed("m", None, None), root_seed("m", Some(""), None));
        assert_ne!(root_seed("m", Some("a"), None), root_seed("m", None, Some("a")));
    }
}

//! The file the lab's web servers serve: deterministic pseudo-random bytes, so every node
//! serves the same content and a client can check what it received without a copy.

use sha2::{Digest, Sha256};

/// `size` bytes from a xorshift64* generator seeded with `seed`.
pub fn generate(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(size);
    out
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_deterministic_and_seed_dependent() {
        assert_eq!(generate(1000, 7), generate(1000, 7));
        assert_ne!(generate(1000, 7), generate(1000, 8));
        assert_eq!(generate(1001, 7).len(), 1001);
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

//! The key of the steering MAC (`[cluster] steer_auth`), derived from the cluster hash key so
//! that operators keep one secret.

use std::hash::Hasher as _;

use siphasher::sip::SipHasher24;

/// `NodeConfig::auth_key` for `hash_key`: `(k0, k1)`, each the SipHash-2-4 of a fixed label
/// keyed with the hash key (README "Steering trust"). Knowing the MAC key reveals nothing of
/// the hash key, and the other way round takes the hash key's secrecy.
pub fn steer_auth_key(hash_key: [u64; 2]) -> [u64; 2] {
    let derive = |label: &[u8]| {
        let mut h = SipHasher24::new_with_keys(hash_key[0], hash_key[1]);
        h.write(label);
        h.finish()
    };
    [
        derive(b"cdn-steer steering auth 0"),
        derive(b"cdn-steer steering auth 1"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_differ_and_follow_the_hash_key() {
        let k = steer_auth_key([1, 2]);
        assert_ne!(k[0], k[1]);
        assert_ne!(k, steer_auth_key([1, 3]));
        // SipHash-2-4 of the label keyed with the key bytes 00..0f, from the reference
        // implementation's key layout (k0 = bytes 0..8 little-endian).
        let mut h =
            SipHasher24::new_with_key(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
        h.write(b"cdn-steer steering auth 0");
        assert_eq!(
            steer_auth_key([0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908])[0],
            h.finish()
        );
    }
}

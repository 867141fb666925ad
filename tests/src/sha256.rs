//! SHA-256 of test payloads as hex, to compare what arrived with what was
//! sent (the `sha2` crate does the hashing).

use sha2::{Digest, Sha256};

/// The lowercase hex SHA-256 of `data`.
pub fn hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    /// The FIPS 180-2 test vectors.
    #[test]
    fn known_digests() {
        assert_eq!(super::hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(super::hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}

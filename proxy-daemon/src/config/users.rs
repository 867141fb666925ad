//! `/ip socks users`: the SOCKS5 username/password accounts. Passwords are
//! kept only as salted PBKDF2-HMAC-SHA256 hashes, so the state file and
//! `export` can check a password but never give it back.

use std::fmt;
use std::io::Read;

use sha2::Sha256;

/// PBKDF2 rounds for new hashes (a few milliseconds per check on one core).
const ROUNDS: u32 = 10_000;
const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;

/// One account.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub password: PasswordHash,
    /// At most one connection at a time.
    pub only_one: bool,
    /// Bits per second for each direction of each tunnel, or unlimited.
    pub rate_limit: Option<u64>,
    pub disabled: bool,
    pub comment: Option<String>,
}

/// `pbkdf2-sha256$ROUNDS$SALT_HEX$HASH_HEX`; empty for "no password set".
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PasswordHash(String);

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHash(<hidden>)")
    }
}

impl PasswordHash {
    /// Hashes a new password with a fresh random salt.
    pub fn new(password: &[u8]) -> Self {
        let mut salt = [0u8; SALT_LEN];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut salt))
            .expect("/dev/urandom is readable");
        Self::with_salt(password, &salt, ROUNDS)
    }

    fn with_salt(password: &[u8], salt: &[u8], rounds: u32) -> Self {
        let mut out = [0u8; HASH_LEN];
        pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, rounds, &mut out);
        PasswordHash(format!("pbkdf2-sha256${rounds}${}${}", hex(salt), hex(&out)))
    }

    /// Accepts a stored hash (from a state file or `export`), checking its form.
    pub fn parse(stored: &str) -> Option<Self> {
        let (rounds, salt, hash) = split(stored)?;
        (rounds > 0 && !salt.is_empty() && hash.len() == HASH_LEN).then(|| PasswordHash(stored.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }

    /// Whether `password` is the one this hash was made from (constant time in the hash).
    pub fn verify(&self, password: &[u8]) -> bool {
        let Some((rounds, salt, want)) = split(&self.0) else { return false };
        let mut got = [0u8; HASH_LEN];
        pbkdf2::pbkdf2_hmac::<Sha256>(password, &salt, rounds, &mut got);
        got.iter().zip(&want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

fn split(stored: &str) -> Option<(u32, Vec<u8>, Vec<u8>)> {
    let mut parts = stored.split('$');
    if parts.next()? != "pbkdf2-sha256" {
        return None;
    }
    let rounds = parts.next()?.parse().ok()?;
    let salt = unhex(parts.next()?)?;
    let hash = unhex(parts.next()?)?;
    parts.next().is_none().then_some((rounds, salt, hash))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Parses a RouterOS rate: `8M`, `512k`, `1G`, `64000` (bits per second); `0` is unlimited.
pub fn parse_rate(s: &str) -> Option<Option<u64>> {
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1_000),
        (i, 'M') => (&s[..i], 1_000_000),
        (i, 'G') => (&s[..i], 1_000_000_000),
        _ => (s, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let bps = n.checked_mul(mult)?;
    Some((bps > 0).then_some(bps))
}

/// Prints a rate the short way: `8M`, `512k`, `1500`.
pub fn format_rate(bps: u64) -> String {
    for (unit, m) in [("G", 1_000_000_000), ("M", 1_000_000), ("k", 1_000)] {
        if bps.is_multiple_of(m) {
            return format!("{}{unit}", bps / m);
        }
    }
    bps.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hash checks its own password only, and its text does not contain the password.
    #[test]
    fn hash_and_verify() {
        let h = PasswordHash::new(b"s3cret");
        assert!(h.verify(b"s3cret"));
        assert!(!h.verify(b"s3cres"));
        assert!(!h.as_str().contains("s3cret"));
        assert_eq!(PasswordHash::parse(h.as_str()), Some(h.clone()));
        assert_ne!(PasswordHash::new(b"s3cret"), h, "salts differ");
        assert!(!format!("{h:?}").contains("pbkdf2"));
    }

    /// Malformed stored hashes are refused.
    #[test]
    fn parse_rejects_garbage() {
        for bad in
            ["", "plain", "pbkdf2-sha256$0$00$00", "pbkdf2-sha256$10$zz$00", "md5$1$00$00", "pbkdf2-sha256$10$0011$00"]
        {
            assert_eq!(PasswordHash::parse(bad), None, "{bad}");
        }
    }

    /// Rates parse RouterOS-style and print back.
    #[test]
    fn rates() {
        assert_eq!(parse_rate("8M"), Some(Some(8_000_000)));
        assert_eq!(parse_rate("512k"), Some(Some(512_000)));
        assert_eq!(parse_rate("0"), Some(None));
        assert_eq!(parse_rate("8X"), None);
        assert_eq!(parse_rate("M"), None);
        assert_eq!(format_rate(8_000_000), "8M");
        assert_eq!(format_rate(1500), "1500");
    }
}

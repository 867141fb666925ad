//! `/ip socks users`: the SOCKS5 username/password accounts. Passwords are
//! kept only as salted PBKDF2-HMAC-SHA256 hashes in the PHC string format
//! (the `password-hash` crate's, through `pbkdf2`), so the state file and
//! `export` can check a password but never give it back.

use std::fmt;
use std::io::Read;

use pbkdf2::password_hash::{PasswordHash as Phc, PasswordHasher, PasswordVerifier, SaltString};
use pbkdf2::{Algorithm, Params, Pbkdf2};
use sha2::Sha256;

/// PBKDF2 rounds for new hashes (a few milliseconds per check on one core).
const ROUNDS: u32 = 10_000;
/// Rounds a stored hash may ask for: fewer is a hash cheap to brute-force,
/// more lets anyone who knows a user name make every login attempt cost
/// seconds of a core (one check at 200 million rounds took 26 s here).
pub const ROUNDS_ACCEPTED: std::ops::RangeInclusive<u32> = 1_000..=2_000_000;
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

/// A PHC string, `$pbkdf2-sha256$i=ROUNDS,l=32$SALT$HASH` (B64), or the
/// form proxyd 0.1 wrote, `pbkdf2-sha256$ROUNDS$SALT_HEX$HASH_HEX`, which
/// state files may still hold; empty for "no password set".
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
        let salt = SaltString::encode_b64(salt).expect("16 bytes make a valid salt");
        let params = Params { rounds, output_length: HASH_LEN };
        let phc = Pbkdf2
            .hash_password_customized(password, Some(Algorithm::Pbkdf2Sha256.ident()), None, params, &salt)
            .expect("PBKDF2-SHA256 with these parameters cannot fail");
        PasswordHash(phc.to_string())
    }

    /// Accepts a stored hash (from a state file or `export`), checking its form.
    pub fn parse(stored: &str) -> Option<Self> {
        let valid = match stored.strip_prefix('$') {
            Some(_) => Phc::new(stored).ok().is_some_and(|phc| {
                phc.algorithm == Algorithm::Pbkdf2Sha256.ident()
                    && phc.salt.is_some()
                    && phc.hash.is_some_and(|h| h.len() == HASH_LEN)
                    && Params::try_from(&phc).is_ok_and(|p| ROUNDS_ACCEPTED.contains(&p.rounds))
            }),
            None => legacy(stored).is_some_and(|(rounds, salt, hash)| {
                ROUNDS_ACCEPTED.contains(&rounds) && !salt.is_empty() && hash.len() == HASH_LEN
            }),
        };
        valid.then(|| PasswordHash(stored.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }

    /// Whether `password` is the one this hash was made from (constant time in the hash).
    pub fn verify(&self, password: &[u8]) -> bool {
        if self.0.starts_with('$') {
            return Phc::new(&self.0).is_ok_and(|phc| Pbkdf2.verify_password(password, &phc).is_ok());
        }
        let Some((rounds, salt, want)) = legacy(&self.0) else { return false };
        let mut got = [0u8; HASH_LEN];
        pbkdf2::pbkdf2_hmac::<Sha256>(password, &salt, rounds, &mut got);
        got.iter().zip(&want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// proxyd 0.1's own form (hex, `$`-separated, no leading `$`), still read.
fn legacy(stored: &str) -> Option<(u32, Vec<u8>, Vec<u8>)> {
    let mut parts = stored.split('$');
    if parts.next()? != "pbkdf2-sha256" {
        return None;
    }
    let rounds = parts.next()?.parse().ok()?;
    let salt = unhex(parts.next()?)?;
    let hash = unhex(parts.next()?)?;
    parts.next().is_none().then_some((rounds, salt, hash))
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
        assert!(h.as_str().starts_with("$pbkdf2-sha256$i=10000,l=32$"), "a PHC string: {}", h.as_str());
    }

    /// A hash in proxyd 0.1's own form (state files written before the PHC
    /// format) still parses and checks its password.
    #[test]
    fn legacy_hashes_still_verify() {
        let mut out = [0u8; HASH_LEN];
        let salt = [7u8; SALT_LEN];
        pbkdf2::pbkdf2_hmac::<Sha256>(b"old", &salt, 1000, &mut out);
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let stored = format!("pbkdf2-sha256$1000${}${}", hex(&salt), hex(&out));
        let h = PasswordHash::parse(&stored).expect("legacy form parses");
        assert!(h.verify(b"old") && !h.verify(b"new"));
    }

    /// Malformed stored hashes are refused.
    #[test]
    fn parse_rejects_garbage() {
        for bad in [
            "",
            "plain",
            "pbkdf2-sha256$0$00$00",
            "pbkdf2-sha256$10$zz$00",
            "md5$1$00$00",
            "pbkdf2-sha256$10$0011$00",
            "$pbkdf2-sha256$i=0,l=32$c2FsdHNhbHQ$AAAA",
            "$argon2id$v=19$m=65536,t=2,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "$pbkdf2-sha256$i=1000,l=32$c2FsdHNhbHQ$AAAA",
        ] {
            assert_eq!(PasswordHash::parse(bad), None, "{bad}");
        }
        // Rounds outside ROUNDS_ACCEPTED, in both forms.
        let good = PasswordHash::new(b"pw");
        let rounds = |r: u32| good.as_str().replace("i=10000", &format!("i={r}"));
        assert!(PasswordHash::parse(&rounds(1_000)).is_some());
        assert!(PasswordHash::parse(&rounds(2_000_000)).is_some());
        for bad in [rounds(999), rounds(2_000_001), rounds(200_000_000)] {
            assert_eq!(PasswordHash::parse(&bad), None, "{bad}");
        }
        for bad in [
            format!("pbkdf2-sha256$1${}${}", "00".repeat(16), "00".repeat(32)),
            format!("pbkdf2-sha256$4000000000${}${}", "00".repeat(16), "00".repeat(32)),
        ] {
            assert_eq!(PasswordHash::parse(&bad), None, "{bad}");
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

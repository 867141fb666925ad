//! Where a field of a kernel struct sits, from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`): the verdict reads `struct tcp_sock`'s
//! `copied_seq` at that offset (see `proxy-ebpf`'s docs on bytes already delivered).
//! A minimal reader of the BTF type section (sans-io: [`member_offset`]
//! takes the bytes), enough to walk struct members by name.
//!
//! The kernel's BTF is about 5 MB. It is read into an anonymous mapping that
//! is unmapped afterwards, and walked in place: read onto the heap and
//! indexed, it left the daemon 11 MiB larger for good (glibc keeps freed heap).

use std::io;

/// The running kernel's BTF.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// `BTF_MAGIC`, as stored on a little- or big-endian machine.
const MAGIC: u16 = 0xeb9f;

/// `offsetof(struct tcp_sock, copied_seq)` in the running kernel.
pub(super) fn tcp_copied_seq_offset() -> io::Result<u32> {
    let btf = crate::sys::OffHeapFile::read(VMLINUX_BTF)
        .map_err(|e| io::Error::new(e.kind(), format!("{VMLINUX_BTF}: {e}")))?;
    member_offset(btf.bytes(), "tcp_sock", "copied_seq")
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{VMLINUX_BTF}: {e}")))
}

/// Byte offset of member `member` of `struct name` in the BTF blob `btf`
/// (native byte order; members of anonymous structs and unions are looked
/// through).
pub fn member_offset(btf: &[u8], name: &str, member: &str) -> Result<u32, String> {
    let types = Types::new(btf)?;
    let mut found = None;
    types.walk(|_, at| {
        let hit = types.kind_at(at) == STRUCT && types.name(types.u32_at(at)) == Some(name);
        if hit {
            found = Some(at);
        }
        !hit
    })?;
    let at = found.ok_or(format!("no struct {name}"))?;
    types.offset_in(at, member, 0, 0).ok_or(format!("struct {name} has no member {member}"))
}

/// `BTF_KIND_STRUCT` and `BTF_KIND_UNION`.
const STRUCT: u32 = 4;
const UNION: u32 = 5;

/// A BTF blob, walked in place (the kernel's holds about 100,000 types).
struct Types<'a> {
    btf: &'a [u8],
    strings: &'a [u8],
    /// Where the type records start and end in `btf`.
    records: std::ops::Range<usize>,
}

impl<'a> Types<'a> {
    fn new(btf: &'a [u8]) -> Result<Self, String> {
        let word = |at: usize| -> Result<u32, String> {
            btf.get(at..at + 4).map(|b| u32::from_ne_bytes(b.try_into().unwrap())).ok_or("truncated BTF".into())
        };
        if btf.len() < 24 || u16::from_ne_bytes([btf[0], btf[1]]) != MAGIC {
            return Err("not BTF in this machine's byte order".into());
        }
        let hdr_len = word(4)? as usize;
        let (type_off, type_len) = (word(8)? as usize, word(12)? as usize);
        let (str_off, str_len) = (word(16)? as usize, word(20)? as usize);
        let strings = btf.get(hdr_len + str_off..hdr_len + str_off + str_len).ok_or("truncated BTF strings")?;
        let records = hdr_len + type_off..hdr_len + type_off + type_len;
        if btf.len() < records.end {
            return Err("truncated BTF types".into());
        }
        Ok(Types { btf, strings, records })
    }

    /// Calls `visit(id, offset)` for each type record in order until it
    /// returns false.
    fn walk(&self, mut visit: impl FnMut(usize, usize) -> bool) -> Result<(), String> {
        let mut at = self.records.start;
        // Type ids start at 1 (0 is void).
        for id in 1.. {
            if at >= self.records.end || !visit(id, at) {
                break;
            }
            if at + 12 > self.records.end {
                return Err("truncated BTF types".into());
            }
            let info = self.u32_at(at + 4);
            let vlen = (info & 0xffff) as usize;
            at += 12
                + match (info >> 24) & 0x1f {
                    // INT, VAR, DECL_TAG
                    1 | 14 | 17 => 4,
                    // ARRAY
                    3 => 12,
                    // STRUCT, UNION, DATASEC, ENUM64
                    4 | 5 | 15 | 19 => vlen * 12,
                    // ENUM, FUNC_PROTO
                    6 | 13 => vlen * 8,
                    // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                    2 | 7..=12 | 16 | 18 => 0,
                    other => return Err(format!("unknown BTF kind {other}")),
                };
        }
        Ok(())
    }

    /// The record of type `id`.
    fn record(&self, id: usize) -> Option<usize> {
        let mut found = None;
        self.walk(|i, at| {
            if i == id {
                found = Some(at);
            }
            i < id
        })
        .ok()?;
        found
    }

    fn u32_at(&self, at: usize) -> u32 {
        self.btf.get(at..at + 4).map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap()))
    }

    fn kind_at(&self, at: usize) -> u32 {
        (self.u32_at(at + 4) >> 24) & 0x1f
    }

    fn name(&self, offset: u32) -> Option<&str> {
        let rest = self.strings.get(offset as usize..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&rest[..end]).ok()
    }

    /// Byte offset of `member` in the composite type recorded at `at` (plus
    /// `base` bits), looking through anonymous composite members (`depth`
    /// bounds the walk).
    fn offset_in(&self, at: usize, member: &str, base: u32, depth: u32) -> Option<u32> {
        let info = self.u32_at(at + 4);
        let bitfields = info >> 31 == 1;
        for i in 0..(info & 0xffff) as usize {
            let m = at + 12 + i * 12;
            let (name, ty, offset) = (self.u32_at(m), self.u32_at(m + 4) as usize, self.u32_at(m + 8));
            let bits = base + if bitfields { offset & 0x00ff_ffff } else { offset };
            if self.name(name) == Some(member) {
                return Some(bits / 8);
            }
            let anonymous = self.name(name).is_none_or(str::is_empty);
            if anonymous && depth < 8 {
                let inner = self.record(ty).filter(|&r| matches!(self.kind_at(r), STRUCT | UNION));
                if let Some(found) = inner.and_then(|r| self.offset_in(r, member, bits, depth + 1)) {
                    return Some(found);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `struct outer { int a; union { int b; int seq; }; int c; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0seq\0c\0";
        let s = |name: &str| {
            let needle = [b"\0", name.as_bytes(), b"\0"].concat();
            strings.windows(needle.len()).position(|w| w == needle.as_slice()).unwrap() as u32 + 1
        };
        let mut types = Vec::new();
        let mut put = |words: &[u32]| words.iter().for_each(|w| types.extend_from_slice(&w.to_ne_bytes()));
        // [1] int: INT, size 4, encoding
        put(&[s("int"), 1 << 24, 4, 32]);
        // [2] anonymous union { b at 0, seq at 0 }
        put(&[0, (5 << 24) | 2, 4, s("b"), 1, 0, s("seq"), 1, 0]);
        // [3] struct outer { a at 0, (union) at 32 bits, c at 64 bits }
        put(&[s("outer"), (4 << 24) | 3, 12, s("a"), 1, 0, 0, 2, 32, s("c"), 1, 64]);
        let mut btf = Vec::new();
        btf.extend_from_slice(&MAGIC.to_ne_bytes());
        btf.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            btf.extend_from_slice(&w.to_ne_bytes());
        }
        btf.extend_from_slice(&types);
        btf.extend_from_slice(strings);
        btf
    }

    #[test]
    fn finds_members_directly_and_through_anonymous_unions() {
        let btf = blob();
        assert_eq!(member_offset(&btf, "outer", "a"), Ok(0));
        assert_eq!(member_offset(&btf, "outer", "seq"), Ok(4));
        assert_eq!(member_offset(&btf, "outer", "c"), Ok(8));
        assert!(member_offset(&btf, "outer", "nope").unwrap_err().contains("no member nope"));
        assert!(member_offset(&btf, "inner", "a").unwrap_err().contains("no struct inner"));
        assert!(member_offset(&btf[..10], "outer", "a").is_err());
    }

    /// On this machine's own kernel (where it exposes BTF), `copied_seq`
    /// lies inside `struct tcp_sock`, past the `inet_connection_sock` it begins with.
    #[test]
    fn finds_copied_seq_in_the_running_kernel() {
        let Ok(btf) = std::fs::read(VMLINUX_BTF) else {
            eprintln!("skipped: no {VMLINUX_BTF}");
            return;
        };
        let copied = member_offset(&btf, "tcp_sock", "copied_seq").unwrap();
        let inet_conn = member_offset(&btf, "tcp_sock", "inet_conn").unwrap();
        assert_eq!(inet_conn, 0);
        assert!(copied > 512 && copied < 4096, "copied_seq at {copied}");
    }
}

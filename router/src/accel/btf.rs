//! Where the running kernel keeps one field of `struct sock`, read from its BTF.
//!
//! sk_msg bounds a shortcut by what the far socket holds unread (its `sk_rmem_alloc`, see
//! [`super::shortcut`]). No sk_msg context field carries it, so the program reads it from the
//! socket itself, at an offset that depends on the kernel's configuration; the router finds
//! the offset in `/sys/kernel/btf/vmlinux` and hands it to the program at load time.
//!
//! Only the little of the BTF format this needs is read: the type section, walked once, and
//! struct members by name. See the kernel's `Documentation/bpf/btf.rst`.

use std::fmt;

/// The kernel's own type information.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const TYPE_LEN: usize = 12;

// Kinds (`BTF_KIND_*`) this reader looks into or through; every other kind is only skipped.
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// A pointer's size: BTF records none for pointers.
const WORD: u32 = size_of::<usize>() as u32;

/// Why an offset could not be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn error(what: impl Into<String>) -> Error {
    Error(what.into())
}

/// The offsets the programs need, from one reading of the kernel's BTF.
#[derive(Clone, Debug)]
pub struct Offsets {
    /// Byte offset of `sk_rmem_alloc` (`sk_backlog.rmem_alloc`, a 4-byte `atomic_t`) in
    /// `struct sock`: what a socket holds unread.
    pub sk_rmem_alloc: Result<u32, Error>,
    /// Where `struct tcp_sock` keeps the sequence numbers that tell a drained TCP path.
    pub tcp_seq: Result<TcpSeqOffsets, Error>,
    /// Where a socket's protocol keeps its memory count and limits.
    pub proto_mem: Result<ProtoMemOffsets, Error>,
}

impl Offsets {
    /// Reads and walks `/sys/kernel/btf/vmlinux` once (some MB; slow in a debug build).
    ///
    /// # Errors
    /// When the kernel has no BTF, or it cannot be parsed.
    pub fn read() -> Result<Self, Error> {
        let data = std::fs::read(VMLINUX).map_err(|e| error(format!("{VMLINUX}: {e}")))?;
        let btf = Btf::parse(&data)?;
        let field = |name| btf.offset_of("tcp_sock", &[name], 4);
        let tcp_seq = (|| {
            Ok(TcpSeqOffsets {
                snd_una: field("snd_una")?,
                write_seq: field("write_seq")?,
                copied_seq: field("copied_seq")?,
                rcv_nxt: field("rcv_nxt")?,
            })
        })();
        let proto_mem = (|| {
            Ok(ProtoMemOffsets {
                sk_prot: btf.offset_of("sock", &["__sk_common", "skc_prot"], WORD)?,
                memory_allocated: btf.offset_of("proto", &["memory_allocated"], WORD)?,
                sysctl_mem: btf.offset_of("proto", &["sysctl_mem"], WORD)?,
            })
        })();
        Ok(Self {
            sk_rmem_alloc: btf.offset_of("sock", &["sk_backlog", "rmem_alloc"], 4),
            tcp_seq,
            proto_mem,
        })
    }
}

/// Where the running kernel keeps the sequence numbers of `struct tcp_sock` that tell whether
/// a socket's TCP path is drained: all a sender wrote is acknowledged when `snd_una` equals
/// `write_seq`; all a receiver got is read when `copied_seq` equals `rcv_nxt`. Byte offsets
/// from the start of the socket (a `tcp_sock` starts with its `sock`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSeqOffsets {
    pub snd_una: u32,
    pub write_seq: u32,
    pub copied_seq: u32,
    pub rcv_nxt: u32,
}

/// Where the running kernel keeps the pointers from a socket to its protocol's memory count
/// (`sk_prot`, a `struct proto *` in `struct sock`; `memory_allocated`, an `atomic_long_t *`
/// in `struct proto`) and to its limits (`sysctl_mem`, a `long *`: `tcp_mem` for TCP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtoMemOffsets {
    pub sk_prot: u32,
    pub memory_allocated: u32,
    pub sysctl_mem: u32,
}

/// A parsed type section: where each type starts, by id (id 0 is `void` and has no entry).
struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    starts: Vec<usize>,
}

/// One type's header.
#[derive(Clone, Copy)]
struct Type {
    name: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// `size` or `type`, by kind.
    size_or_type: u32,
    /// Where the kind's trailing data starts in the type section.
    data: usize,
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Result<Self, Error> {
        let truncated = || error("BTF: truncated");
        if data.len() < HEADER_LEN || u16_at(data, 0) != Some(MAGIC) {
            return Err(error("BTF: bad magic (or another byte order)"));
        }
        let header = |at| u32_at(data, at).map(|v| v as usize).ok_or_else(truncated);
        let (hdr_len, type_off, type_len, str_off, str_len) = (
            header(4)?,
            header(8)?,
            header(12)?,
            header(16)?,
            header(20)?,
        );
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or_else(truncated)
        };
        let mut btf = Self {
            types: section(type_off, type_len)?,
            strings: section(str_off, str_len)?,
            starts: Vec::new(),
        };
        let mut at = 0;
        while at < btf.types.len() {
            btf.starts.push(at);
            let ty = btf.type_at(at).ok_or_else(truncated)?;
            at = ty.data + trailing_len(ty.kind, ty.vlen);
        }
        Ok(btf)
    }

    fn type_at(&self, at: usize) -> Option<Type> {
        let info = u32_at(self.types, at + 4)?;
        Some(Type {
            name: u32_at(self.types, at)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: u32_at(self.types, at + 8)?,
            data: at + TYPE_LEN,
        })
    }

    fn get(&self, id: u32) -> Option<Type> {
        let at = *self.starts.get((id as usize).checked_sub(1)?)?;
        self.type_at(at)
    }

    fn name(&self, offset: u32) -> &str {
        let tail = self.strings.get(offset as usize..).unwrap_or_default();
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end]).unwrap_or_default()
    }

    /// The type `id` names once typedefs and qualifiers are looked through.
    fn resolve(&self, mut id: u32) -> Option<Type> {
        for _ in 0..32 {
            let ty = self.get(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type;
                }
                _ => return Some(ty),
            }
        }
        None
    }

    /// Byte offset of the member reached by `path` from the struct named `root`; the member
    /// must be `size` bytes.
    fn offset_of(&self, root: &str, path: &[&str], size: u32) -> Result<u32, Error> {
        let mut ty = (1..=self.starts.len() as u32)
            .filter_map(|id| self.get(id))
            .find(|ty| ty.kind == KIND_STRUCT && self.name(ty.name) == root)
            .ok_or_else(|| error(format!("BTF: no struct {root}")))?;
        let mut bits = 0;
        for name in path {
            let (at, member) = self
                .member(ty, name)
                .ok_or_else(|| error(format!("BTF: struct {root} has no {}", path.join("."))))?;
            bits += at;
            ty = member;
        }
        let found = match ty.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION => ty.size_or_type,
            KIND_PTR => WORD,
            _ => 0,
        };
        if bits % 8 != 0 || found != size {
            return Err(error(format!(
                "BTF: {root}.{} is not a {size}-byte field",
                path.join(".")
            )));
        }
        u32::try_from(bits / 8).map_err(|_| error("BTF: offset out of range"))
    }

    /// The member `name` of struct or union `ty` (looking into anonymous members), as its bit
    /// offset from the start of `ty` and its resolved type.
    fn member(&self, ty: Type, name: &str) -> Option<(u64, Type)> {
        if !matches!(ty.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        (0..ty.vlen).find_map(|i| {
            let at = ty.data + i * 12;
            let member_name = self.name(u32_at(self.types, at)?);
            let member_type = self.resolve(u32_at(self.types, at + 4)?)?;
            let offset = u32_at(self.types, at + 8)?;
            // With kind_flag, the top byte is a bitfield's size (0: not a bitfield).
            let (bits, bitfield) = if ty.kind_flag {
                (u64::from(offset & 0xff_ffff), offset >> 24 != 0)
            } else {
                (u64::from(offset), false)
            };
            if member_name == name {
                // A bitfield shares its bytes with its neighbours: nothing to read whole.
                (!bitfield).then_some((bits, member_type))
            } else if member_name.is_empty() {
                self.member(member_type, name)
                    .map(|(inner, found)| (bits + inner, found))
            } else {
                None
            }
        })
    }
}

/// Bytes of kind-specific data after a type's header.
const fn trailing_len(kind: u32, vlen: usize) -> usize {
    match kind {
        // INT, VAR and DECL_TAG: one u32; ARRAY: three.
        1 | 14 | 17 => 4,
        3 => 12,
        // STRUCT, UNION, DATASEC, ENUM64: 12 bytes per entry; ENUM, FUNC_PROTO: 8.
        4 | 5 | 15 | 19 => 12 * vlen,
        6 | 13 => 8 * vlen,
        _ => 0,
    }
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a BTF blob type by type; ids count from 1 in the order types are added.
    #[derive(Default)]
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        fn string(&mut self, s: &str) -> u32 {
            if self.strings.is_empty() {
                self.strings.push(0);
            }
            if s.is_empty() {
                return 0;
            }
            let at = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            at
        }

        fn words(&mut self, words: &[u32]) {
            for word in words {
                self.types.extend_from_slice(&word.to_ne_bytes());
            }
        }

        fn int(&mut self, name: &str, size: u32) {
            let name = self.string(name);
            self.words(&[name, KIND_INT << 24, size, size * 8]);
        }

        fn typedef(&mut self, name: &str, to: u32) {
            let name = self.string(name);
            self.words(&[name, KIND_TYPEDEF << 24, to]);
        }

        /// A struct or union with `(name, type, offset)` members; `kind_flag` marks offsets
        /// that carry a bitfield size in their top byte.
        fn compound(&mut self, kind: u32, name: &str, size: u32, members: &[(&str, u32, u32)]) {
            let kind_flag = u32::from(members.iter().any(|m| m.2 >> 24 != 0));
            let name = self.string(name);
            self.words(&[
                name,
                kind_flag << 31 | kind << 24 | members.len() as u32,
                size,
            ]);
            for &(member, ty, offset) in members {
                let member = self.string(member);
                self.words(&[member, ty, offset]);
            }
        }

        fn finish(mut self) -> Vec<u8> {
            self.string("");
            let mut out = MAGIC.to_ne_bytes().to_vec();
            out.extend_from_slice(&[1, 0]);
            let (types, strings) = (self.types.len() as u32, self.strings.len() as u32);
            for word in [HEADER_LEN as u32, 0, types, types, strings] {
                out.extend_from_slice(&word.to_ne_bytes());
            }
            out.extend(self.types);
            out.extend(self.strings);
            out
        }
    }

    /// A `struct sock` shaped like the kernel's where it matters: the field behind a typedef,
    /// inside an anonymous struct member, after an anonymous union and a bitfield (whose
    /// struct's member offsets carry bitfield sizes in their top byte).
    fn sock_like() -> Vec<u8> {
        let mut b = Builder::default();
        b.int("int", 4); // 1
        b.compound(KIND_STRUCT, "atomic_t", 4, &[("counter", 1, 0)]); // 2
        b.typedef("a_t", 2); // 3
        b.compound(KIND_STRUCT, "", 8, &[("rmem_alloc", 3, 0), ("len", 1, 32)]); // 4
        b.compound(KIND_UNION, "", 4, &[("skc_hash", 1, 0)]); // 5
        b.compound(
            KIND_STRUCT,
            "sock",
            16,
            &[
                ("", 5, 0),
                ("flags", 1, 8 << 24 | 32),
                ("sk_backlog", 4, 64),
            ],
        ); // 6
        b.finish()
    }

    #[test]
    fn finds_a_member_through_anonymous_members_and_typedefs() {
        let data = sock_like();
        let btf = Btf::parse(&data).expect("parses");
        assert_eq!(
            btf.offset_of("sock", &["sk_backlog", "rmem_alloc"], 4),
            Ok(8)
        );
        assert_eq!(btf.offset_of("sock", &["sk_backlog", "len"], 4), Ok(12));
        assert_eq!(btf.offset_of("sock", &["skc_hash"], 4), Ok(0));
    }

    #[test]
    fn refuses_what_is_not_there_or_not_the_size_asked() {
        let data = sock_like();
        let btf = Btf::parse(&data).expect("parses");
        assert!(btf.offset_of("sock", &["sk_backlog", "tail"], 4).is_err());
        assert!(btf.offset_of("sock", &["flags"], 4).is_err(), "a bitfield");
        assert!(btf.offset_of("inode", &["i_size"], 8).is_err());
        let wrong = btf.offset_of("sock", &["sk_backlog", "rmem_alloc"], 8);
        assert_eq!(
            wrong
                .expect_err("an 8-byte read of a 4-byte field")
                .to_string(),
            "BTF: sock.sk_backlog.rmem_alloc is not a 8-byte field"
        );
        assert!(Btf::parse(&data[..10]).is_err(), "short header");
        assert!(Btf::parse(&data[..40]).is_err(), "sections past the end");
    }

    #[test]
    fn finds_sk_rmem_alloc_in_this_kernel() {
        if !std::path::Path::new(VMLINUX).exists() {
            eprintln!("skipped: {VMLINUX} is missing");
            return;
        }
        let offsets = Offsets::read().expect("this kernel's BTF");
        let offset = offsets.sk_rmem_alloc.expect("this kernel's struct sock");
        // Past sock_common (addresses, ports, family: at least 56 bytes), within a page.
        assert!((56..4096).contains(&offset), "offset {offset}");
        // tcp_sock starts with inet_connection_sock, which starts with the sock: past it.
        let tcp = offsets.tcp_seq.expect("this kernel's struct tcp_sock");
        for at in [tcp.snd_una, tcp.write_seq, tcp.copied_seq, tcp.rcv_nxt] {
            assert!((offset..8192).contains(&at), "{tcp:?}");
        }
        assert_eq!(
            [tcp.snd_una, tcp.write_seq, tcp.copied_seq, tcp.rcv_nxt]
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            4,
            "four distinct fields: {tcp:?}"
        );
        // sk_prot is in sock_common; struct proto's two pointers are distinct words.
        let mem = offsets.proto_mem.expect("this kernel's struct proto");
        assert!(mem.sk_prot < 56 && mem.sk_prot.is_multiple_of(8), "{mem:?}");
        assert_ne!(mem.memory_allocated, mem.sysctl_mem, "{mem:?}");
        assert!(
            mem.memory_allocated.is_multiple_of(8) && mem.sysctl_mem.is_multiple_of(8),
            "{mem:?}"
        );
    }
}

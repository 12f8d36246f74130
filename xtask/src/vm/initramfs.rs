//! A writer for the initramfs format the kernel unpacks: an uncompressed cpio archive in the
//! "newc" layout (`Documentation/driver-api/early-userspace/buffer-format.rst`).

/// An archive being built, in memory (a few MB: busybox and a dozen modules).
#[derive(Debug, Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    /// Adds a directory (mode 0755).
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), data);
    }

    /// Adds a character device node (mode 0600), e.g. `dev/console` so that init has a
    /// console before devtmpfs is mounted.
    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    /// The archive, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }

    fn entry(&mut self, name: &str, mode: u32, (rmajor, rminor): (u32, u32), data: &[u8]) {
        self.ino += 1;
        let size = u32::try_from(data.len()).expect("initramfs members are far below 4 GiB");
        let name_size = u32::try_from(name.len() + 1).expect("initramfs member names are short");
        let fields = [
            self.ino, mode, 0, 0, 1, 0, size, 0, 0, rmajor, rminor, name_size, 0,
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    /// Pads to the 4-byte boundary the format requires after each name and each body.
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_has_aligned_headers_and_ends_with_the_trailer() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let out = cpio.finish();
        assert!(out.starts_with(b"070701"));
        // Header (110) + "init\0" (5) padded to 116, body (10) padded to 128.
        assert_eq!(&out[128..134], b"070701");
        assert_eq!(&out[6..14], b"00000001");
        assert_eq!(&out[14..22], b"000081ed");
        let trailer = b"TRAILER!!!\0";
        assert!(out.windows(trailer.len()).any(|w| w == trailer));
        assert!(out.len().is_multiple_of(4));
    }
}

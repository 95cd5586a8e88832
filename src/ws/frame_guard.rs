//! Decides "message too big" (close 1009) from a WebSocket frame's header, before its payload is
//! buffered.
//!
//! actix-http's codec only rejects an oversized frame once all of it has arrived, so a header
//! announcing 100 MB followed by a trickle would be buffered whole (docs/architecture.md). This reads the
//! client's byte stream as it passes, frame header by frame header (RFC 6455 section 5.2), and
//! reports the first frame whose announced length is over the limit. Pure: bytes in, verdict out.

/// Follows frame boundaries in a client-to-server byte stream.
#[derive(Debug)]
pub struct FrameGuard {
    max_payload: u64,
    /// Bytes of the current header collected so far (at most 14).
    header: [u8; 14],
    header_len: usize,
    /// Payload bytes of the current frame still to pass; 0 while reading a header.
    remaining: u64,
    /// Frames that have passed whole (header and payload).
    completed: u64,
}

/// A frame announced a payload over the limit.
#[derive(Debug, PartialEq, Eq)]
pub struct Oversized {
    pub announced: u64,
}

impl FrameGuard {
    pub fn new(max_payload: usize) -> FrameGuard {
        FrameGuard {
            max_payload: max_payload as u64,
            header: [0; 14],
            header_len: 0,
            remaining: 0,
            completed: 0,
        }
    }

    /// Inspects the next chunk of the stream.
    pub fn inspect(&mut self, mut bytes: &[u8]) -> Result<(), Oversized> {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let skip = self.remaining.min(bytes.len() as u64);
                self.remaining -= skip;
                bytes = &bytes[skip as usize..];
                if self.remaining == 0 {
                    self.completed += 1;
                }
                continue;
            }
            self.header[self.header_len] = bytes[0];
            self.header_len += 1;
            bytes = &bytes[1..];
            if let Some(payload) = self.complete_header()? {
                self.header_len = 0;
                self.remaining = payload;
                if payload == 0 {
                    self.completed += 1;
                }
            }
        }
        Ok(())
    }

    /// Changes the limit for the frames whose headers are still to come.
    pub fn set_limit(&mut self, max_payload: usize) {
        self.max_payload = max_payload as u64;
    }

    /// Frames that have passed whole: each is one message (or fragment) for the decoder.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// The payload length once the header is complete; `None` while more header bytes are due.
    fn complete_header(&self) -> Result<Option<u64>, Oversized> {
        let h = &self.header[..self.header_len];
        if h.len() < 2 {
            return Ok(None);
        }
        let masked = h[1] & 0x80 != 0;
        let (length_bytes, short) = match h[1] & 0x7f {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(u64::from(n))),
        };
        let needed = 2 + length_bytes + if masked { 4 } else { 0 };
        if h.len() < 2 + length_bytes {
            return Ok(None);
        }
        let length = short
            .unwrap_or_else(|| h[2..2 + length_bytes].iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)));
        // Judged as soon as the length is known, before the mask key or any payload.
        if length > self.max_payload {
            return Err(Oversized { announced: length });
        }
        Ok((h.len() == needed).then_some(length))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame header (+ mask key) announcing `len` bytes.
    fn header(len: u64) -> Vec<u8> {
        let mut h = vec![0x81];
        match len {
            0..=125 => h.push(0x80 | len as u8),
            126..=65535 => {
                h.push(0x80 | 126);
                h.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                h.push(0x80 | 127);
                h.extend_from_slice(&len.to_be_bytes());
            }
        }
        h.extend_from_slice(&[1, 2, 3, 4]);
        h
    }

    #[test]
    fn passes_frames_within_the_limit_split_anywhere() {
        let mut stream = Vec::new();
        for len in [0u64, 5, 125, 126, 1000, 4096] {
            stream.extend(header(len));
            stream.extend(std::iter::repeat_n(b'x', len as usize));
        }
        for split in [1, 2, 3, 7, 100, stream.len()] {
            let mut guard = FrameGuard::new(4096);
            for chunk in stream.chunks(split) {
                assert_eq!(guard.inspect(chunk), Ok(()), "split {split}");
            }
            assert_eq!((guard.header_len, guard.remaining, guard.completed), (0, 0, 6));
        }
    }

    #[test]
    fn refuses_from_the_header_alone() {
        let mut guard = FrameGuard::new(65536);
        // Only the first 10 bytes of a frame announcing 100 MB: refused before any payload.
        assert_eq!(guard.inspect(&header(100_000_000)[..10]), Err(Oversized { announced: 100_000_000 }));
        let mut guard = FrameGuard::new(1000);
        guard.inspect(&header(10)).unwrap();
        guard.inspect(b"0123456789").unwrap();
        assert_eq!(guard.inspect(&header(1001)[..4]), Err(Oversized { announced: 1001 }));
    }
}

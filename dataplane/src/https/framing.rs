//! Where an HTTP/1.1 message body ends (RFC 9112 6): none, a Content-Length, chunked, or the
//! end of the connection. The chunked decoder only finds the end — the bytes are passed on
//! unchanged — so a proxy can keep the connection for the next request. Sans-io and fuzzed.

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Size {
        digits: u8,
        in_ext: bool,
        len: usize,
    },
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    Trailer {
        line: usize,
        total: usize,
    },
    TrailerLf {
        line: usize,
        total: usize,
    },
    Done,
}

/// Finds the end of a chunked body.
#[derive(Clone, Debug)]
pub struct Chunked {
    state: State,
    size: u64,
    max_trailer: usize,
}

/// Longest chunk-size line (hex digits and extensions).
const MAX_SIZE_LINE: usize = 1024;

impl Chunked {
    /// A decoder whose trailer section may be at most `max_trailer` bytes.
    pub fn new(max_trailer: usize) -> Self {
        Self {
            state: State::Size {
                digits: 0,
                in_ext: false,
                len: 0,
            },
            size: 0,
            max_trailer,
        }
    }

    /// Whether the last chunk and the trailer have been seen.
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes body bytes from `data`; returns how many belong to the body (all of them unless
    /// the body ends inside `data`). Errors on malformed framing.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, String> {
        self.feed_with(data, &mut |_| {})
    }

    /// [`Chunked::feed`] that also appends the chunks' data (without the framing) to `out`:
    /// for a receiver that takes the body apart, like an HTTP/2 stream.
    pub fn decode(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<usize, String> {
        self.feed_with(data, &mut |d| out.extend_from_slice(d))
    }

    fn feed_with(&mut self, data: &[u8], sink: &mut dyn FnMut(&[u8])) -> Result<usize, String> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            self.state = match self.state {
                State::Done => return Ok(i),
                State::Size {
                    digits,
                    in_ext,
                    len,
                } => {
                    if len >= MAX_SIZE_LINE {
                        return Err("chunk size line too long".into());
                    }
                    match b {
                        b'\r' if digits > 0 => State::SizeLf,
                        b';' | b' ' | b'\t' if digits > 0 => State::Size {
                            digits,
                            in_ext: true,
                            len: len + 1,
                        },
                        _ if in_ext => State::Size {
                            digits,
                            in_ext,
                            len: len + 1,
                        },
                        _ => {
                            let d = (b as char)
                                .to_digit(16)
                                .ok_or_else(|| format!("bad chunk size byte {b:#04x}"))?;
                            if digits >= 16 {
                                return Err("chunk size too large".into());
                            }
                            self.size = (self.size << 4) | u64::from(d);
                            State::Size {
                                digits: digits + 1,
                                in_ext,
                                len: len + 1,
                            }
                        }
                    }
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err("chunk size line not ended by CRLF".into());
                    }
                    let size = std::mem::take(&mut self.size);
                    if size == 0 {
                        State::Trailer { line: 0, total: 0 }
                    } else {
                        State::Data(size)
                    }
                }
                State::Data(left) => {
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(data.len() - i);
                    sink(&data[i..i + take]);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                    continue;
                }
                State::DataCr if b == b'\r' => State::DataLf,
                State::DataLf if b == b'\n' => State::Size {
                    digits: 0,
                    in_ext: false,
                    len: 0,
                },
                State::DataCr | State::DataLf => {
                    return Err("chunk data not followed by CRLF".into());
                }
                State::Trailer { line, total } => {
                    if total >= self.max_trailer {
                        return Err("trailer section too large".into());
                    }
                    if b == b'\r' {
                        State::TrailerLf {
                            line,
                            total: total + 1,
                        }
                    } else {
                        State::Trailer {
                            line: line + 1,
                            total: total + 1,
                        }
                    }
                }
                State::TrailerLf { line, total } => {
                    if b != b'\n' {
                        return Err("trailer line not ended by CRLF".into());
                    }
                    if line == 0 {
                        State::Done
                    } else {
                        State::Trailer {
                            line: 0,
                            total: total + 1,
                        }
                    }
                }
            };
            i += 1;
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(body: &[u8]) -> Result<Option<usize>, String> {
        let mut c = Chunked::new(1024);
        let n = c.feed(body)?;
        Ok(c.done().then_some(n))
    }

    #[test]
    fn decodes_the_data() {
        let mut c = Chunked::new(1024);
        let mut out = Vec::new();
        let body = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        // Fed in pieces of every size, the data and the end come out the same.
        for step in 1..body.len() {
            let (mut c2, mut out2, mut used) = (Chunked::new(1024), Vec::new(), 0);
            for piece in body.chunks(step) {
                if c2.done() {
                    break;
                }
                used += c2.decode(piece, &mut out2).unwrap();
            }
            assert_eq!(
                (out2.as_slice(), used),
                (&b"hello, world"[..], body.len() - 4)
            );
        }
        let n = c.decode(body, &mut out).unwrap();
        assert!(c.done());
        assert_eq!((out.as_slice(), n), (&b"hello, world"[..], body.len() - 4));
    }

    #[test]
    fn finds_the_end() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\nNEXT";
        assert_eq!(end(body), Ok(Some(body.len() - 4)));
        let trailer = b"0\r\nX-Sum: 1\r\n\r\n";
        assert_eq!(end(trailer), Ok(Some(trailer.len())));
        assert_eq!(end(b"5\r\nhel"), Ok(None));
        // Byte by byte gives the same answer.
        let mut c = Chunked::new(1024);
        for (i, b) in body.iter().enumerate() {
            let n = c.feed(std::slice::from_ref(b)).expect("ok");
            if c.done() {
                assert_eq!(i + 1, body.len() - 4);
                assert_eq!(n, 1);
                break;
            }
        }
        assert!(c.done());
    }

    #[test]
    fn rejects_bad_framing() {
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"5\nhello",
            b"\r\n",
            b"11111111111111111\r\n",
        ] {
            assert!(end(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut c = Chunked::new(8);
        assert!(c.feed(b"0\r\nX-Long-Trailer: yes\r\n\r\n").is_err());
    }
}

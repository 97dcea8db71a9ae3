//! The stored form of a [`Record`]: a MessagePack map with one- or two-letter keys.
//!
//! MessagePack rather than JSON because Redis' Lua has `cmsgpack` (the scripts read and
//! update records in place) and it is about 70 bytes smaller per session, which keeps
//! the value in jemalloc's 256-byte class and a session under the 600-byte target. Only
//! the subset the record needs is implemented; the decoder also accepts the older raw
//! string types and float-encoded integers that Lua's `cmsgpack.pack` may write.

use std::collections::BTreeMap;

use super::{Record, StoreError};

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = b.len();
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else if let Ok(n) = u8::try_from(n) {
        out.extend_from_slice(&[0xd9, n]);
    } else if let Ok(n) = u16::try_from(n) {
        out.push(0xda);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
    }
    out.extend_from_slice(b);
}

fn put_int(out: &mut Vec<u8>, v: i64) {
    match u64::try_from(v) {
        Ok(u) if u < 0x80 => out.push(u as u8),
        Ok(u) if u <= u64::from(u8::MAX) => out.extend_from_slice(&[0xcc, u as u8]),
        Ok(u) if u <= u64::from(u16::MAX) => {
            out.push(0xcd);
            out.extend_from_slice(&(u as u16).to_be_bytes());
        }
        Ok(u) if u <= u64::from(u32::MAX) => {
            out.push(0xce);
            out.extend_from_slice(&(u as u32).to_be_bytes());
        }
        Ok(u) => {
            out.push(0xcf);
            out.extend_from_slice(&u.to_be_bytes());
        }
        Err(_) => {
            out.push(0xd3);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

fn put_map_header(out: &mut Vec<u8>, n: usize) {
    if n < 16 {
        out.push(0x80 | n as u8);
    } else {
        out.push(0xde);
        out.extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes());
    }
}

pub fn encode(r: &Record) -> Vec<u8> {
    let mut fields: Vec<(&str, Field<'_>)> = vec![
        ("u", Field::Str(&r.user)),
        ("c", Field::Str(&r.client)),
        ("at", Field::Int(r.auth_time)),
        ("cr", Field::Int(r.created)),
        ("l", Field::Int(r.last_seen)),
        ("e", Field::Int(r.expires)),
        ("x", Field::Int(r.absolute)),
        ("i", Field::Int(r.idle_ms)),
        ("b", Field::Int(i64::from(r.binding))),
    ];
    for (k, v) in [
        ("m", &r.amr),
        ("r", &r.acr),
        ("ip", &r.ip),
        ("ua", &r.user_agent),
    ] {
        if !v.is_empty() {
            fields.push((k, Field::Str(v)));
        }
    }
    if !r.attributes.is_empty() {
        fields.push(("a", Field::Map(&r.attributes)));
    }
    let mut out = Vec::with_capacity(256);
    put_map_header(&mut out, fields.len());
    for (k, v) in fields {
        put_str(&mut out, k);
        match v {
            Field::Str(s) => put_str(&mut out, s),
            Field::Int(i) => put_int(&mut out, i),
            Field::Map(m) => {
                put_map_header(&mut out, m.len());
                for (k, v) in m {
                    put_str(&mut out, k);
                    put_str(&mut out, v);
                }
            }
        }
    }
    out
}

enum Field<'a> {
    Str(&'a str),
    Int(i64),
    Map(&'a BTreeMap<String, String>),
}

struct Reader<'a> {
    b: &'a [u8],
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("bad session record: {what}"))
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let (h, t) = self
            .b
            .split_at_checked(n)
            .ok_or_else(|| corrupt("truncated"))?;
        self.b = t;
        Ok(h)
    }

    fn byte(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn be(&mut self, n: usize) -> Result<u64, StoreError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0_u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn len_of(&mut self, tag: u8) -> Result<Option<usize>, StoreError> {
        let n = match tag {
            0xa0..=0xbf => u64::from(tag & 0x1f),
            0xd9 | 0xc4 => self.be(1)?,
            0xda | 0xc5 => self.be(2)?,
            0xdb | 0xc6 => self.be(4)?,
            _ => return Ok(None),
        };
        Ok(Some(usize::try_from(n).map_err(|_| corrupt("length"))?))
    }

    fn str(&mut self) -> Result<String, StoreError> {
        let tag = self.byte()?;
        let n = self
            .len_of(tag)?
            .ok_or_else(|| corrupt("expected a string"))?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| corrupt("string not UTF-8"))
    }

    fn int(&mut self) -> Result<i64, StoreError> {
        let tag = self.byte()?;
        let v: i64 = match tag {
            0x00..=0x7f => i64::from(tag),
            0xe0..=0xff => i64::from(tag as i8),
            0xcc => self.be(1)? as i64,
            0xcd => self.be(2)? as i64,
            0xce => self.be(4)? as i64,
            0xcf => i64::try_from(self.be(8)?).map_err(|_| corrupt("integer"))?,
            0xd0 => i64::from(self.be(1)? as u8 as i8),
            0xd1 => i64::from(self.be(2)? as u16 as i16),
            0xd2 => i64::from(self.be(4)? as u32 as i32),
            0xd3 => self.be(8)? as i64,
            0xca => {
                let f = f32::from_bits(self.be(4)? as u32);
                f64::from(f) as i64
            }
            0xcb => f64::from_bits(self.be(8)?) as i64,
            _ => return Err(corrupt("expected an integer")),
        };
        Ok(v)
    }

    fn map_len(&mut self) -> Result<usize, StoreError> {
        let tag = self.byte()?;
        let n = match tag {
            0x80..=0x8f => u64::from(tag & 0x0f),
            // Lua's cmsgpack packs an empty table as an empty array.
            0x90 => 0,
            0xde => self.be(2)?,
            0xdf => self.be(4)?,
            _ => return Err(corrupt("expected a map")),
        };
        usize::try_from(n).map_err(|_| corrupt("length"))
    }
}

pub fn decode(bytes: &[u8]) -> Result<Record, StoreError> {
    let mut rd = Reader { b: bytes };
    let n = rd.map_len()?;
    if n > 64 {
        return Err(corrupt("too many fields"));
    }
    let mut r = Record::default();
    for _ in 0..n {
        let key = rd.str()?;
        match key.as_str() {
            "u" => r.user = rd.str()?,
            "c" => r.client = rd.str()?,
            "m" => r.amr = rd.str()?,
            "r" => r.acr = rd.str()?,
            "ip" => r.ip = rd.str()?,
            "ua" => r.user_agent = rd.str()?,
            "at" => r.auth_time = rd.int()?,
            "cr" => r.created = rd.int()?,
            "l" => r.last_seen = rd.int()?,
            "e" => r.expires = rd.int()?,
            "x" => r.absolute = rd.int()?,
            "i" => r.idle_ms = rd.int()?,
            "b" => r.binding = u8::try_from(rd.int()?).map_err(|_| corrupt("binding"))?,
            "a" => {
                let m = rd.map_len()?;
                if m > 64 {
                    return Err(corrupt("too many attributes"));
                }
                for _ in 0..m {
                    let k = rd.str()?;
                    let v = rd.str()?;
                    r.attributes.insert(k, v);
                }
            }
            _ => return Err(corrupt("unknown field")),
        }
    }
    if !rd.b.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    if r.user.is_empty() {
        return Err(corrupt("no user"));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let mut r = crate::store::contract::record(
            "alice@example.com",
            1_767_225_600_123,
            1_800_000,
            43_200_000,
        );
        r.user_agent = "U".repeat(300);
        r.attributes.insert("long".into(), "v".repeat(1024));
        assert_eq!(decode(&encode(&r)).unwrap(), r);
        let minimal = Record {
            user: "u".into(),
            ..Record::default()
        };
        assert_eq!(decode(&encode(&minimal)).unwrap(), minimal);
        let enc = encode(&r);
        assert!(decode(&enc[..enc.len() - 1]).is_err());
        assert!(decode(b"{\"u\":1}").is_err());
        assert!(decode(&[]).is_err());
        let mut extra = enc.clone();
        extra.push(0);
        assert!(decode(&extra).is_err());
    }

    #[test]
    fn lua_style_encodings_decode() {
        // What Lua's cmsgpack may write: raw16 strings, float64 integers, empty array.
        let mut b = vec![0x83];
        put_str(&mut b, "u");
        b.extend_from_slice(&[0xda, 0, 1, b'x']);
        put_str(&mut b, "e");
        b.push(0xcb);
        b.extend_from_slice(&1_767_225_600_123_f64.to_bits().to_be_bytes());
        put_str(&mut b, "a");
        b.push(0x90);
        let r = decode(&b).unwrap();
        assert_eq!((r.user.as_str(), r.expires), ("x", 1_767_225_600_123));
        assert!(r.attributes.is_empty());
    }
}

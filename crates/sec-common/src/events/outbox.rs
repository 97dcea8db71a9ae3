//! The durable outbox of one process: every event `publish` accepts is appended here
//! before `publish` returns, and stays until the bus settles it (stored by the broker,
//! or dead-lettered). After a crash (`kill -9`, OOM) the next start replays what was
//! never settled, so the spool no longer dies with the process.
//!
//! Layout: a directory (created 0700) holding `LOCK` and segments
//! `seg-<20-digit number>.log` (0600), numbered in the order they were started. A
//! segment is a sequence of records `u32 LE payload length | u32 LE crc32 of the payload
//! | payload`, the payload a protobuf [`Record`]: the encoded `SecurityEvent`, its subject
//! and its trace headers. Appends go to the one *active* segment, which is rolled past
//! [`SEGMENT_BYTES`]; a segment that is not active and whose records are all settled is
//! deleted. An active segment that is fully settled is closed once it holds
//! [`ROLL_SETTLED_BYTES`], so it can be deleted too and the replay after a restart stays
//! short.
//!
//! Durability: one `write_all` of the whole record on an open file, under a mutex, inside
//! `publish`. When it returns the record is in the kernel's page cache: it survives the
//! death of the process, not of the machine. `events.outbox_fsync = true` adds a
//! `sync_data` per append (and a directory sync per new segment) for power-loss
//! durability, at the price of a disk flush on every publish (milliseconds on most disks:
//! far over the 50 µs publish budget).
//!
//! Torn writes: a process killed in the middle of a `write` can leave a short record at
//! the end of a segment (and a disk that lost power, garbage). Reading a segment stops at
//! the first short or corrupt record (length 0, length past the end, or a wrong crc32),
//! logs it once per segment (without any payload) and truncates the segment there. A
//! failed append (disk full, EIO) cuts its own partial record off again and closes the
//! segment, so a torn record is always the last one of its segment and never hides the
//! records after it.
//!
//! What "settled" means is counted, not stored: the outbox keeps, per segment, how many
//! records it holds and how many were settled. Settlements are not written down, so a
//! restart replays every record of each segment that still exists, including records of
//! it that were already delivered; the broker's `Nats-Msg-Id` de-duplication and
//! audit-svc's idempotent inserts make that redelivery harmless. The window is bounded by
//! a segment (4 MiB).
//!
//! One process per directory: `open` takes an exclusive lock on `LOCK` and fails, naming
//! the directory, when another process (or another bus in this process) holds it; two
//! buses on one outbox would replay each other's events. The kernel drops the lock when
//! the process dies, however it dies.
//!
//! Bound: the segments on disk hold at most `max_bytes` (`events.outbox_max_bytes`);
//! beyond it [`Outbox::append`] refuses, and so does `publish`.
//!
//! Deviation from the design brief: `append` returns [`AppendError`] rather than a bare
//! `io::Error`, so the bus can tell "the outbox is full" (its own bound, a back-pressure
//! signal) from "the disk failed" without guessing from an `ErrorKind`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use prometheus_client::metrics::gauge::Gauge;
use prost::Message as _;

use super::{Outgoing, SecurityEvent};

/// A segment is rolled once the next record would take it past this size.
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// An active segment whose records are all settled is closed (and deleted) once it holds
/// at least this much, so a long-lived process does not keep a big, fully delivered
/// segment that a restart would replay.
pub const ROLL_SETTLED_BYTES: u64 = 1024 * 1024;
/// Length and crc32 before each payload.
const HEADER_BYTES: usize = 8;
/// Longest payload a reader believes: events are capped far below (1 MiB at most, see
/// `events.max_event_bytes`); a larger length is a corrupt header.
const MAX_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;
const LOCK_FILE: &str = "LOCK";
const SEGMENT_PREFIX: &str = "seg-";
const SEGMENT_SUFFIX: &str = ".log";

/// The payload of one record.
#[derive(Clone, PartialEq, prost::Message)]
struct Record {
    /// The `SecurityEvent`, protobuf-encoded.
    #[prost(bytes = "vec", tag = "1")]
    event: Vec<u8>,
    /// The NATS subject it is published to.
    #[prost(string, tag = "2")]
    subject: String,
    /// Names of the W3C trace headers it travels with, in order.
    #[prost(string, repeated, tag = "3")]
    header_names: Vec<String>,
    /// Their values, one per name.
    #[prost(string, repeated, tag = "4")]
    header_values: Vec<String>,
}

/// Why an append was refused. Either way the event is not in the outbox.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The outbox holds `max_bytes` of events the broker has not taken yet.
    #[error(
        "event outbox is full ({max_bytes} bytes waiting for the broker, \
         events.outbox_max_bytes)"
    )]
    Full { max_bytes: u64 },
    /// Writing failed (disk full, I/O error): the event could not be made safe.
    #[error("cannot write to the event outbox {}: {source}", dir.display())]
    Io { dir: PathBuf, source: io::Error },
}

/// An unsettled record found by [`Outbox::open`], oldest first.
#[derive(Debug, Clone)]
pub struct Replayed {
    /// The segment to [`Outbox::settle`] when the event leaves the spool.
    pub segment: u64,
    pub out: Outgoing,
}

#[derive(Debug, Default)]
struct Segment {
    bytes: u64,
    appended: u64,
    settled: u64,
}

#[derive(Debug)]
struct Active {
    id: u64,
    file: File,
    len: u64,
}

#[derive(Debug)]
struct State {
    /// Where appends go; `None` until the first append, and after a roll that found no
    /// need for a new file yet.
    active: Option<Active>,
    segments: BTreeMap<u64, Segment>,
    total_bytes: u64,
    next_id: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    max_bytes: u64,
    fsync: bool,
    state: Mutex<State>,
    /// Bytes of the segments on disk.
    bytes: Gauge,
    /// Holds the exclusive lock on `LOCK` for as long as the outbox lives.
    _lock: File,
}

impl Outbox {
    /// Opens (creating it 0700 if needed) and locks the outbox in `dir`, and returns every
    /// record of its segments, oldest first, for the bus to deliver again.
    pub fn open(dir: &Path, max_bytes: u64, fsync: bool) -> io::Result<(Self, Vec<Replayed>)> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create the event outbox {}: {e}", dir.display()),
            )
        })?;
        let lock = lock_dir(dir)?;
        let mut segments = BTreeMap::new();
        let mut replayed = Vec::new();
        let mut total_bytes = 0_u64;
        let mut next_id = 0_u64;
        for id in segment_ids(dir)? {
            next_id = next_id.max(id.saturating_add(1));
            let path = dir.join(segment_name(id));
            let (records, bytes) = read_segment(&path, id)?;
            if records.is_empty() {
                remove_segment(&path);
                continue;
            }
            segments.insert(
                id,
                Segment {
                    bytes,
                    appended: records.len() as u64,
                    settled: 0,
                },
            );
            total_bytes = total_bytes.saturating_add(bytes);
            replayed.extend(records.into_iter().map(|out| Replayed { segment: id, out }));
        }
        let bytes = Gauge::default();
        bytes.set(i64::try_from(total_bytes).unwrap_or(i64::MAX));
        let outbox = Self {
            dir: dir.to_owned(),
            max_bytes,
            fsync,
            state: Mutex::new(State {
                active: None,
                segments,
                total_bytes,
                next_id,
            }),
            bytes,
            _lock: lock,
        };
        Ok((outbox, replayed))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The gauge of bytes on disk (`sec_events_outbox_bytes`).
    pub fn bytes_gauge(&self) -> Gauge {
        self.bytes.clone()
    }

    /// Bytes of the segments on disk.
    pub fn bytes(&self) -> u64 {
        self.lock().total_bytes
    }

    /// Appends the event; on `Ok` it is in the kernel (and on disk with `fsync`) and the
    /// returned segment must be [`settle`](Self::settle)d once the event left the spool.
    pub fn append(&self, out: &Outgoing) -> Result<u64, AppendError> {
        let record = encode_record(out);
        let len = record.len() as u64;
        let mut st = self.lock();
        if st.total_bytes.saturating_add(len) > self.max_bytes
            && let Some(active) = &st.active
            && st
                .segments
                .get(&active.id)
                .is_some_and(|s| s.settled >= s.appended)
        {
            // A small, fully delivered active segment must not hold the bound: drop it.
            let id = active.id;
            st.active = None;
            self.retire_if_settled(&mut st, id);
        }
        if st.total_bytes.saturating_add(len) > self.max_bytes {
            return Err(AppendError::Full {
                max_bytes: self.max_bytes,
            });
        }
        let roll = match &st.active {
            None => true,
            Some(a) => a.len > 0 && a.len.saturating_add(len) > SEGMENT_BYTES,
        };
        if roll {
            self.roll(&mut st).map_err(|e| self.io_error(e))?;
        }
        let Some(active) = st.active.as_mut() else {
            return Err(self.io_error(io::Error::other("no active segment")));
        };
        let written = active.file.write_all(&record).and_then(|()| {
            if self.fsync {
                active.file.sync_data()
            } else {
                Ok(())
            }
        });
        let id = active.id;
        if let Err(e) = written {
            // Cut the partial record off (if that fails too, it stays as the torn tail of
            // a closed segment, which a replay truncates) and start the next append in a
            // new segment, so nothing is ever written after a torn record.
            let _ = active.file.set_len(active.len);
            st.active = None;
            self.retire_if_settled(&mut st, id);
            return Err(self.io_error(e));
        }
        active.len = active.len.saturating_add(len);
        let seg = st.segments.entry(id).or_default();
        seg.appended += 1;
        seg.bytes = seg.bytes.saturating_add(len);
        st.total_bytes = st.total_bytes.saturating_add(len);
        self.publish_bytes(&st);
        Ok(id)
    }

    /// Credits `n` records of `segment` as gone from the spool (stored by the broker, or
    /// dead-lettered). A closed segment whose records are all settled is deleted.
    pub fn settle(&self, segment: u64, n: u64) {
        if n == 0 {
            return;
        }
        let mut st = self.lock();
        let Some(seg) = st.segments.get_mut(&segment) else {
            return;
        };
        seg.settled = seg.settled.saturating_add(n).min(seg.appended);
        if seg.settled < seg.appended {
            return;
        }
        if let Some(active) = &st.active
            && active.id == segment
        {
            if active.len < ROLL_SETTLED_BYTES {
                return;
            }
            // Fully delivered and big enough: close it so it can go now.
            st.active = None;
        }
        self.retire_if_settled(&mut st, segment);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn io_error(&self, source: io::Error) -> AppendError {
        AppendError::Io {
            dir: self.dir.clone(),
            source,
        }
    }

    fn publish_bytes(&self, st: &State) {
        self.bytes
            .set(i64::try_from(st.total_bytes).unwrap_or(i64::MAX));
    }

    /// Starts a new active segment; the previous one is closed (and deleted if settled).
    fn roll(&self, st: &mut State) -> io::Result<()> {
        let id = st.next_id;
        let path = self.dir.join(segment_name(id));
        let mut options = OpenOptions::new();
        options.create_new(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path)?;
        if self.fsync {
            // The new name must survive a power loss too, or its records are lost with it.
            File::open(&self.dir)?.sync_all()?;
        }
        st.next_id = id.saturating_add(1);
        st.segments.insert(id, Segment::default());
        if let Some(old) = st.active.replace(Active { id, file, len: 0 }) {
            self.retire_if_settled(st, old.id);
        }
        Ok(())
    }

    /// Deletes `segment` if it is closed and every record of it is settled.
    fn retire_if_settled(&self, st: &mut State, segment: u64) {
        if st.active.as_ref().is_some_and(|a| a.id == segment) {
            return;
        }
        let Some(seg) = st.segments.get(&segment) else {
            return;
        };
        if seg.settled < seg.appended {
            return;
        }
        let bytes = seg.bytes;
        st.segments.remove(&segment);
        st.total_bytes = st.total_bytes.saturating_sub(bytes);
        remove_segment(&self.dir.join(segment_name(segment)));
        self.publish_bytes(st);
    }
}

impl Drop for Outbox {
    /// A clean stop leaves only what is still owed: the active segment goes too when all
    /// its records were settled, so the next start does not deliver them again.
    fn drop(&mut self) {
        let mut st = self.lock();
        if let Some(active) = st.active.take() {
            self.retire_if_settled(&mut st, active.id);
        }
    }
}

/// Takes the exclusive lock on `dir/LOCK`, or says who is in the way.
fn lock_dir(dir: &Path) -> io::Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot open the event outbox lock {}: {e}", path.display()),
        )
    })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "the event outbox {} is in use by another process (it holds {}); each \
                 process needs its own events.outbox_dir, or they would replay each \
                 other's events",
                dir.display(),
                path.display()
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(io::Error::new(
            e.kind(),
            format!("cannot lock the event outbox {}: {e}", path.display()),
        )),
    }
}

fn segment_name(id: u64) -> String {
    format!("{SEGMENT_PREFIX}{id:020}{SEGMENT_SUFFIX}")
}

/// The ids of the segments in `dir`, ascending. Other files are left alone.
fn segment_ids(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(digits) = name
            .strip_prefix(SEGMENT_PREFIX)
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            && digits.len() == 20
            && digits.bytes().all(|b| b.is_ascii_digit())
            && let Ok(id) = digits.parse::<u64>()
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn remove_segment(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        // Not fatal: its records are delivered again after a restart (harmless, see the
        // module docs).
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete a settled outbox segment")
        }
    }
}

fn encode_record(out: &Outgoing) -> Vec<u8> {
    let (header_names, header_values) = out.trace_headers.iter().cloned().unzip();
    let payload = Record {
        event: out.event.encode_to_vec(),
        subject: out.subject.clone(),
        header_names,
        header_values,
    }
    .encode_to_vec();
    let mut buf = Vec::with_capacity(HEADER_BYTES + payload.len());
    buf.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    buf.extend_from_slice(&payload);
    buf
}

/// What a segment's bytes hold: the payloads of its complete records, and where the first
/// short or corrupt record starts (`None`: the segment ends cleanly).
fn split_records(data: &[u8]) -> (Vec<&[u8]>, Option<(usize, &'static str)>) {
    let mut payloads = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let Some(header) = data.get(at..at + HEADER_BYTES) else {
            return (payloads, Some((at, "short header")));
        };
        let (len, crc) = header.split_at(4);
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if len == 0 || len > MAX_PAYLOAD_BYTES {
            return (payloads, Some((at, "bad length")));
        }
        let start = at + HEADER_BYTES;
        let Some(payload) = data.get(start..start + len) else {
            return (payloads, Some((at, "short payload")));
        };
        if crc32fast::hash(payload) != crc {
            return (payloads, Some((at, "checksum mismatch")));
        }
        payloads.push(payload);
        at = start + len;
    }
    (payloads, None)
}

fn decode_record(payload: &[u8]) -> Result<Outgoing, String> {
    let r = Record::decode(payload).map_err(|e| e.to_string())?;
    if r.header_names.len() != r.header_values.len() {
        return Err("header names and values differ in number".into());
    }
    let event = SecurityEvent::decode(r.event.as_slice()).map_err(|e| e.to_string())?;
    if event.id.is_empty() {
        return Err("event without an id".into());
    }
    Ok(Outgoing {
        subject: r.subject,
        event,
        trace_headers: r.header_names.into_iter().zip(r.header_values).collect(),
    })
}

/// The events of one segment and the bytes they take, truncating a torn tail.
fn read_segment(path: &Path, id: u64) -> io::Result<(Vec<Outgoing>, u64)> {
    let data = std::fs::read(path)?;
    let (payloads, torn) = split_records(&data);
    let mut records = Vec::with_capacity(payloads.len());
    for payload in payloads {
        match decode_record(payload) {
            Ok(out) => records.push(out),
            // The checksum matched, so this is not a torn write: a record this version
            // cannot read. It is dropped loudly; the records after it are still good.
            Err(e) => tracing::error!(
                segment = id,
                error = %e,
                "undecodable record in the event outbox, dropped"
            ),
        }
    }
    let valid = match torn {
        None => data.len(),
        Some((at, why)) => {
            tracing::warn!(
                segment = id,
                offset = at,
                dropped_bytes = data.len() - at,
                reason = why,
                "torn record at the end of an event outbox segment (a write cut short by a \
                 crash); truncating it there"
            );
            OpenOptions::new()
                .write(true)
                .open(path)?
                .set_len(at as u64)?;
            at
        }
    };
    Ok((records, valid as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::events::new_event;

    fn out(i: usize) -> Outgoing {
        let mut event = new_event(&SystemClock, "audit", "sec.audit.test.happened");
        event.details.insert("i".into(), i.to_string());
        Outgoing {
            subject: "sec.events.audit.test.happened".into(),
            event,
            trace_headers: vec![(
                "traceparent".into(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            )],
        }
    }

    fn ids(v: &[Replayed]) -> Vec<String> {
        v.iter().map(|r| r.out.event.id.clone()).collect()
    }

    fn segment_files(dir: &Path) -> Vec<u64> {
        segment_ids(dir).unwrap()
    }

    #[test]
    fn appended_records_are_replayed_in_order_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, replayed) = Outbox::open(dir.path(), 1 << 20, false).unwrap();
        assert!(replayed.is_empty());
        let sent: Vec<Outgoing> = (0..10).map(out).collect();
        for o in &sent {
            ob.append(o).unwrap();
        }
        assert!(ob.bytes() > 0);
        drop(ob);
        let (_ob, replayed) = Outbox::open(dir.path(), 1 << 20, true).unwrap();
        assert_eq!(replayed.len(), 10);
        for (r, o) in replayed.iter().zip(&sent) {
            assert_eq!(r.out.event, o.event);
            assert_eq!(r.out.subject, o.subject);
            assert_eq!(r.out.trace_headers, o.trace_headers);
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            let nested = dir.path().join("a").join("outbox");
            let (_o, _) = Outbox::open(&nested, 1 << 20, false).unwrap();
            assert_eq!(mode(&nested), 0o700);
            let seg = dir.path().join(segment_name(replayed[0].segment));
            assert_eq!(mode(&seg), 0o600);
        }
    }

    #[test]
    fn a_torn_tail_replays_the_complete_records_only() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _) = Outbox::open(dir.path(), 1 << 20, false).unwrap();
        let sent: Vec<Outgoing> = (0..5).map(out).collect();
        let seg = sent.iter().map(|o| ob.append(o).unwrap()).last().unwrap();
        drop(ob);
        let path = dir.path().join(segment_name(seg));
        let full = std::fs::metadata(&path).unwrap().len();
        // Cut the last record in its middle, as a kill -9 during its write would.
        let cut = full - 20;
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let (ob, replayed) = Outbox::open(dir.path(), 1 << 20, false).unwrap();
        assert_eq!(
            ids(&replayed),
            sent[..4]
                .iter()
                .map(|o| o.event.id.clone())
                .collect::<Vec<_>>()
        );
        let kept = std::fs::metadata(&path).unwrap().len();
        assert!(kept < cut, "the torn record is truncated away");
        assert_eq!(ob.bytes(), kept);
        // New records go after the good ones (in a new segment) and replay too.
        let more = out(99);
        ob.append(&more).unwrap();
        drop(ob);
        let (_ob, replayed) = Outbox::open(dir.path(), 1 << 20, false).unwrap();
        assert_eq!(replayed.len(), 5);
        assert_eq!(replayed[4].out.event.id, more.event.id);
    }

    #[test]
    fn a_corrupt_record_stops_the_segment_there() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _) = Outbox::open(dir.path(), 1 << 20, false).unwrap();
        let seg = (0..3).map(|i| ob.append(&out(i)).unwrap()).last().unwrap();
        drop(ob);
        let path = dir.path().join(segment_name(seg));
        let mut data = std::fs::read(&path).unwrap();
        let first = HEADER_BYTES + u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
        // A flipped byte in the second record's payload.
        data[first + HEADER_BYTES + 3] ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        let (_ob, replayed) = Outbox::open(dir.path(), 1 << 20, false).unwrap();
        assert_eq!(replayed.len(), 1);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), first as u64);

        // Zeros (a file extended but never written, after a power loss) are not records.
        let (records, torn) = split_records(&[0_u8; 64]);
        assert!(records.is_empty());
        assert_eq!(torn, Some((0, "bad length")));
    }

    #[test]
    fn a_segment_is_deleted_once_all_its_records_settle() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _) = Outbox::open(dir.path(), 64 << 20, false).unwrap();
        // A record of ~500 KiB fills a segment in 8 appends: the 9th rolls.
        let mut big = out(0);
        big.event
            .details
            .insert("blob".into(), "x".repeat(500 * 1024));
        let segs: Vec<u64> = (0..11).map(|_| ob.append(&big).unwrap()).collect();
        let (first, second) = (segs[0], segs[8]);
        assert!(segs[..8].iter().all(|s| *s == first), "{segs:?}");
        assert!(segs[8..].iter().all(|s| *s == second), "{segs:?}");
        assert_ne!(first, second, "rolled past SEGMENT_BYTES");
        assert_eq!(segment_files(dir.path()), [first, second]);
        ob.settle(first, 7);
        assert_eq!(
            segment_files(dir.path()),
            [first, second],
            "one record of it is still in the spool"
        );
        ob.settle(first, 1);
        assert_eq!(segment_files(dir.path()), [second]);
        assert!(ob.bytes() < SEGMENT_BYTES);
        // The active one, fully settled and past ROLL_SETTLED_BYTES, is closed and goes.
        ob.settle(second, 2);
        assert_eq!(segment_files(dir.path()), [second], "one record still out");
        ob.settle(second, 1);
        assert!(segment_files(dir.path()).is_empty());
        assert_eq!(ob.bytes(), 0);
        // A small, fully settled active segment stays active (no churn of files)...
        let s = ob.append(&out(1)).unwrap();
        ob.settle(s, 1);
        assert_eq!(segment_files(dir.path()), [s]);
        assert_eq!(ob.append(&out(2)).unwrap(), s);
        // ...and a clean stop deletes it once settled, so a restart replays nothing.
        ob.settle(s, 1);
        drop(ob);
        assert!(segment_files(dir.path()).is_empty());
        let (ob, replayed) = Outbox::open(dir.path(), 64 << 20, false).unwrap();
        assert!(replayed.is_empty());
        // Not stored, though: a segment still owed something replays whole.
        let s = ob.append(&out(3)).unwrap();
        ob.append(&out(4)).unwrap();
        ob.settle(s, 1);
        drop(ob);
        let (_ob, replayed) = Outbox::open(dir.path(), 64 << 20, false).unwrap();
        assert_eq!(replayed.len(), 2, "settlements are counted, not stored");
    }

    #[test]
    fn replayed_segments_settle_like_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _) = Outbox::open(dir.path(), 1 << 20, false).unwrap();
        for i in 0..3 {
            ob.append(&out(i)).unwrap();
        }
        drop(ob);
        let (ob, replayed) = Outbox::open(dir.path(), 1 << 20, false).unwrap();
        let seg = replayed[0].segment;
        let fresh = ob.append(&out(3)).unwrap();
        assert_ne!(fresh, seg, "new records never go into a replayed segment");
        ob.settle(seg, 3);
        assert_eq!(segment_files(dir.path()), [fresh]);
    }

    #[test]
    fn past_the_bound_append_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let one = encode_record(&out(0)).len() as u64;
        let (ob, _) = Outbox::open(dir.path(), 3 * one + one / 2, false).unwrap();
        let seg = (0..3).map(|i| ob.append(&out(i)).unwrap()).last().unwrap();
        let err = ob.append(&out(3)).unwrap_err();
        assert!(matches!(err, AppendError::Full { .. }), "{err}");
        assert!(err.to_string().contains("events.outbox_max_bytes"), "{err}");
        drop(ob);
        let (ob, replayed) = Outbox::open(dir.path(), 3 * one + one / 2, false).unwrap();
        assert_eq!(replayed.len(), 3, "the refused record is not on disk");
        assert!(matches!(ob.append(&out(4)), Err(AppendError::Full { .. })));
        ob.settle(seg, 3);
        ob.append(&out(5)).unwrap();
    }

    #[test]
    fn a_second_open_of_the_same_dir_fails_while_the_first_lives() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = Outbox::open(dir.path(), 1 << 20, false).unwrap();
        let err = Outbox::open(dir.path(), 1 << 20, false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&dir.path().display().to_string()) && msg.contains("in use"),
            "{msg}"
        );
        drop(first);
        Outbox::open(dir.path(), 1 << 20, false).unwrap();
    }

    // Through the bus.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;

    use crate::config::EventsConfig;
    use crate::events::{Delivery, EventBus, EventTransport, PublishError, TransportError, memory};

    /// A broker that is down until told otherwise, and keeps what it stores.
    #[derive(Default)]
    struct Broker {
        up: AtomicBool,
        stored: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait]
    impl EventTransport for Broker {
        fn kind(&self) -> &'static str {
            "test"
        }
        async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), TransportError>> {
            batch
                .iter()
                .map(|o| {
                    if self.up.load(Ordering::SeqCst) {
                        self.stored.lock().unwrap().push(o.event.id.clone());
                        Ok(())
                    } else {
                        Err(TransportError::Unavailable("down".into()))
                    }
                })
                .collect()
        }
        async fn fetch(&self, _: usize, _: Duration) -> Result<Vec<Delivery>, TransportError> {
            Ok(vec![])
        }
        async fn ready(&self) -> Result<(), String> {
            Ok(())
        }
    }

    fn bus_cfg(dir: &Path, capacity: usize) -> EventsConfig {
        EventsConfig {
            spool_capacity: capacity,
            max_type_share_percent: 100,
            outbox_dir: Some(dir.to_owned()),
            ..EventsConfig::default()
        }
    }

    fn event() -> SecurityEvent {
        new_event(&SystemClock, "audit", "sec.audit.test.happened")
    }

    fn metrics(bus: &EventBus) -> String {
        let mut reg = prometheus_client::registry::Registry::default();
        bus.register_metrics(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        text
    }

    #[tokio::test]
    async fn an_event_refused_for_a_full_spool_is_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = bus_cfg(dir.path(), 4);
        let down = Arc::new(Broker::default());
        let bus = EventBus::with_outbox(down, &cfg, Arc::new(SystemClock)).unwrap();
        let (mut accepted, mut refused) = (Vec::new(), 0);
        for _ in 0..20 {
            let e = event();
            let id = e.id.clone();
            match bus.publish(e) {
                Ok(()) => accepted.push(id),
                Err(PublishError::SpoolFull(4)) => refused += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(refused > 0 && !accepted.is_empty());
        // The process dies with the broker down; the next one finds the broker up.
        drop(bus);
        let up = Arc::new(Broker::default());
        up.up.store(true, Ordering::SeqCst);
        let bus = EventBus::with_outbox(up.clone(), &cfg, Arc::new(SystemClock)).unwrap();
        assert_eq!(bus.pending(), accepted.len(), "replayed events are pending");
        assert_eq!(bus.flush(Duration::from_secs(10)).await, 0);
        assert_eq!(
            *up.stored.lock().unwrap(),
            accepted,
            "exactly the accepted events, in order; never a refused one"
        );
        let text = metrics(&bus);
        assert!(
            text.contains(&format!(
                "sec_events_outbox_replayed_total {}",
                accepted.len()
            )),
            "{text}"
        );
        assert!(text.contains("sec_events_spool_depth 0"), "{text}");
        // Stored by the broker: settled, and nothing is left for a third start.
        drop(bus);
        let (_ob, replayed) = Outbox::open(dir.path(), 1 << 20, false).unwrap();
        assert!(replayed.is_empty(), "{} replayed", replayed.len());
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_loudly_and_takes_events_again_once_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let one = encode_record(&Outgoing {
            subject: "sec.events.audit.test.happened".into(),
            event: event(),
            trace_headers: vec![],
        })
        .len() as u64;
        let cfg = EventsConfig {
            outbox_max_bytes: 3 * one + one / 2,
            ..bus_cfg(dir.path(), 100)
        };
        let broker = Arc::new(Broker::default());
        let bus = EventBus::with_outbox(broker.clone(), &cfg, Arc::new(SystemClock)).unwrap();
        for _ in 0..3 {
            bus.publish(event()).unwrap();
        }
        let err = bus.publish(event()).unwrap_err();
        assert!(matches!(err, PublishError::OutboxFull { .. }), "{err}");
        assert!(err.to_string().contains("events.outbox_max_bytes"), "{err}");
        let text = metrics(&bus);
        assert!(
            text.contains(r#"sec_events_rejected_total{reason="outbox"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(&format!("sec_events_outbox_bytes {}", 3 * one)),
            "{text}"
        );
        assert_eq!(bus.pending(), 3, "the refused event is not in the spool");
        broker.up.store(true, Ordering::SeqCst);
        assert_eq!(bus.flush(Duration::from_secs(10)).await, 0);
        bus.publish(event()).unwrap();
        assert_eq!(bus.flush(Duration::from_secs(10)).await, 0);
        assert_eq!(broker.stored.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn a_second_bus_on_the_same_outbox_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = bus_cfg(dir.path(), 10);
        let _first =
            EventBus::with_outbox(Arc::new(Broker::default()), &cfg, Arc::new(SystemClock))
                .unwrap();
        let err = EventBus::with_outbox(Arc::new(Broker::default()), &cfg, Arc::new(SystemClock))
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("events.outbox_dir") && msg.contains(&dir.path().display().to_string()),
            "{msg}"
        );
    }

    /// The in-process broker is not durable: an event it stored but no consumer acked is
    /// still owed after a crash, and is settled only by the ack.
    #[tokio::test]
    async fn with_the_in_process_broker_events_are_settled_when_consumed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = bus_cfg(dir.path(), 100);
        let bus = EventBus::with_outbox(
            Arc::new(memory::MemoryTransport::new(100)),
            &cfg,
            Arc::new(SystemClock),
        )
        .unwrap();
        let ids: Vec<String> = (0..5)
            .map(|_| {
                let e = event();
                let id = e.id.clone();
                bus.publish(e).unwrap();
                id
            })
            .collect();
        assert_eq!(bus.flush(Duration::from_secs(5)).await, 0);
        // Stored in memory, not consumed: a crash now must not lose them.
        drop(bus);
        let bus = EventBus::with_outbox(
            Arc::new(memory::MemoryTransport::new(100)),
            &cfg,
            Arc::new(SystemClock),
        )
        .unwrap();
        assert_eq!(bus.flush(Duration::from_secs(5)).await, 0);
        let got = bus.fetch(100, Duration::from_millis(100)).await.unwrap();
        assert_eq!(
            got.iter().map(|d| d.event.id.clone()).collect::<Vec<_>>(),
            ids
        );
        // Consumed once, nacked once: only the acked ones are settled.
        let mut got = got.into_iter();
        got.next().unwrap().nack().await.unwrap();
        for d in got {
            d.ack().await.unwrap();
        }
        // A duplicate of an event already consumed is settled at once (no ack will come).
        let mut dup = event();
        dup.id = ids[1].clone();
        bus.publish(dup).unwrap();
        assert_eq!(bus.flush(Duration::from_secs(5)).await, 0);
        let replayed_segment = dir.path().join(segment_name(0));
        assert!(replayed_segment.exists(), "the nacked event is still owed");
        let again = bus.fetch(100, Duration::from_millis(100)).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].event.id, ids[0]);
        again.into_iter().next().unwrap().ack().await.unwrap();
        assert!(!replayed_segment.exists(), "all five consumed: deleted");
        drop(bus);
        let (_ob, replayed) = Outbox::open(dir.path(), 1 << 20, false).unwrap();
        assert!(replayed.is_empty(), "{} replayed", replayed.len());
    }
}

//! HLS for rooms published over SRT: fMP4 (CMAF) segments and playlists per
//! rendition plus a master playlist, written under `<data-dir>/hls/` and
//! served by the node at `/hls/{room}/master.m3u8` and
//! `/hls/{room}/{rendition}/…` for CDNs to pull.
//!
//! Each room with HLS has one packager thread. Ingest hands it the source's
//! access units and AAC frames, the transcoder hands it the renditions'; a
//! bounded queue (counted drops) keeps ingest from ever waiting on it. The
//! packager survives publisher reconnects: a new publisher starts a new
//! *epoch* — the open segments are closed, the next ones carry
//! `#EXT-X-DISCONTINUITY`, and timestamps continue from where the last
//! publisher stopped. When no publisher returns within `linger` the
//! playlists get `#EXT-X-ENDLIST`; after `expire` the room's files go.
//!
//! Disk use is bounded per room: every rendition keeps the playlist window
//! plus `keep` older segments (for CDNs and slow players still fetching
//! them); older files are deleted as new ones are written, and a segment is
//! cut at the latest at `max_segment` seconds. At the start of the node the
//! whole `hls/` directory is cleared.

pub mod fmp4;
pub mod playlist;
pub(crate) mod routes;
pub mod segmenter;
pub mod sps;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weir_protocol::RoomId;

use self::fmp4::{AudioTrack, VideoTrack};
use self::playlist::{Entry, MediaPlaylist, Variant};
use self::segmenter::{AudioIn, Output, Segmenter, VideoIn};

/// Name of the rendition that is the publisher's own video.
pub const SOURCE: &str = "source";
/// Media messages queued for a packager before new ones are dropped.
const QUEUE: usize = 1024;

/// HLS settings of a node.
#[derive(Debug, Clone)]
pub struct HlsConfig {
    /// Where segments are written (`<data-dir>/hls`).
    pub dir: PathBuf,
    /// Target segment duration, seconds.
    pub segment: f64,
    /// Segments listed in a media playlist.
    pub window: usize,
    /// Segments kept on disk after they leave the playlist.
    pub keep: usize,
    /// A segment is cut without a keyframe past this many seconds.
    pub max_segment: f64,
    /// How long playlists stay live without a publisher before
    /// `#EXT-X-ENDLIST`.
    pub linger: Duration,
    /// How long after the publisher left the room's files are deleted.
    pub expire: Duration,
}

impl HlsConfig {
    /// Defaults: 2 s segments, 6 listed, 4 more kept, cut at 8 s at the
    /// latest, ended after 30 s without a publisher, deleted after 120 s.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            segment: 2.0,
            window: 6,
            keep: 4,
            max_segment: 8.0,
            linger: Duration::from_secs(30),
            expire: Duration::from_secs(120),
        }
    }
}

/// A rendition the packager should expect in a publisher's epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// Its name (`source`, `720p`, …), also its URL path segment.
    pub name: Arc<str>,
    /// Target bit rate, bits/s (0 for the source: measured).
    pub bitrate: u64,
    /// Ordering key in the master playlist (higher first; the source is
    /// listed first).
    pub height: u32,
}

/// What a packager is told.
#[derive(Debug)]
enum Msg {
    Publisher {
        epoch: u32,
        plan: Vec<Planned>,
    },
    Video {
        epoch: u32,
        rendition: Arc<str>,
        frame: VideoIn,
    },
    Audio {
        epoch: u32,
        frame: AudioIn,
    },
    Gone {
        epoch: u32,
        rendition: Arc<str>,
    },
}

/// The node's HLS rooms.
#[derive(Clone)]
pub struct HlsStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: HlsConfig,
    rooms: Mutex<HashMap<RoomId, RoomEntry>>,
}

struct RoomEntry {
    tx: Sender<Msg>,
    queued: Arc<AtomicUsize>,
    view: Arc<Mutex<View>>,
    epoch: u32,
    publishers: usize,
}

/// What HTTP reads of a room.
#[derive(Debug, Default)]
struct View {
    renditions: BTreeMap<String, RenditionView>,
}

#[derive(Debug)]
struct RenditionView {
    playlist: MediaPlaylist,
    dir: PathBuf,
    /// Segments on disk (listed or kept), oldest first.
    kept: VecDeque<(u64, u32)>,
    inits: BTreeMap<u32, (Option<VideoTrack>, Option<AudioTrack>)>,
    planned: Planned,
    active: bool,
    frame_rate: Option<f64>,
}

/// Why a room's HLS could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HlsError {
    /// The directory could not be prepared.
    #[error("cannot prepare HLS directory {path}: {source}")]
    Dir {
        /// Which directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No thread for the packager.
    #[error("cannot start the HLS packager thread: {0}")]
    Thread(std::io::Error),
}

impl HlsStore {
    /// Clears `<dir>` (segments of an earlier run are useless) and creates it.
    pub fn new(config: HlsConfig) -> Result<Self, HlsError> {
        let dir = config.dir.clone();
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|source| HlsError::Dir {
                path: dir.clone(),
                source,
            })?;
        }
        std::fs::create_dir_all(&dir).map_err(|source| HlsError::Dir {
            path: dir.clone(),
            source,
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                rooms: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The settings.
    pub fn config(&self) -> &HlsConfig {
        &self.inner.config
    }

    /// A publisher of `room` starts: a new epoch of the room's packager
    /// (started if the room has none) expecting the renditions of `plan`.
    pub fn open(&self, room: &RoomId, plan: Vec<Planned>) -> Result<HlsFeed, HlsError> {
        let mut rooms = self
            .inner
            .rooms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = match rooms.get_mut(room) {
            Some(e) => {
                e.epoch += 1;
                e.publishers += 1;
                e
            }
            None => {
                let (tx, rx) = channel();
                let queued = Arc::new(AtomicUsize::new(0));
                let view = Arc::new(Mutex::new(View::default()));
                let prefix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
                // One directory per packaging run: a run being removed never
                // touches the files of the next one.
                let dir = self.inner.config.dir.join(room.as_str()).join(&prefix);
                std::fs::create_dir_all(&dir).map_err(|source| HlsError::Dir {
                    path: dir.clone(),
                    source,
                })?;
                let packager = Packager {
                    room: room.clone(),
                    config: self.inner.config.clone(),
                    dir,
                    prefix,
                    view: view.clone(),
                    queued: queued.clone(),
                    store: Arc::downgrade(&self.inner),
                    renditions: HashMap::new(),
                    epoch: 0,
                    shifts: VecDeque::new(),
                    end90: 0,
                    gone_since: None,
                    ended: false,
                    write_errors: 0,
                    last_tick: Instant::now(),
                };
                std::thread::Builder::new()
                    .name(format!("weir-hls-{room}"))
                    .spawn(move || packager.run(rx))
                    .map_err(HlsError::Thread)?;
                metrics::gauge!("weir_hls_rooms").increment(1.0);
                rooms.entry(room.clone()).or_insert(RoomEntry {
                    tx,
                    queued,
                    view,
                    epoch: 0,
                    publishers: 1,
                })
            }
        };
        let epoch = entry.epoch;
        let _ = entry.tx.send(Msg::Publisher { epoch, plan });
        Ok(HlsFeed {
            tx: entry.tx.clone(),
            queued: entry.queued.clone(),
            epoch,
            room: room.clone(),
            store: self.clone(),
            skipping: HashMap::new(),
        })
    }

    fn view(&self, room: &str) -> Option<Arc<Mutex<View>>> {
        let room = RoomId::parse(room).ok()?;
        let rooms = self.inner.rooms.lock().ok()?;
        rooms.get(&room).map(|e| e.view.clone())
    }

    /// The master playlist, once the room has a segment.
    pub fn master(&self, room: &str) -> Option<String> {
        let view = self.view(room)?;
        let view = view.lock().ok()?;
        let mut variants: Vec<(bool, u32, Variant)> = view
            .renditions
            .iter()
            .filter(|(_, r)| r.active && !r.playlist.entries.is_empty())
            .filter_map(|(name, r)| {
                let init = r.playlist.entries.back()?.init;
                let (video, audio) = r.inits.get(&init)?;
                let codecs: Vec<String> = video
                    .iter()
                    .map(|v| v.info.codec_string())
                    .chain(audio.iter().map(AudioTrack::codec_string))
                    .collect();
                let measured = r.playlist.peak_bps();
                Some((
                    name == SOURCE,
                    r.planned.height,
                    Variant {
                        name: name.clone(),
                        bandwidth: measured.max(r.planned.bitrate),
                        average: r.playlist.average_bps(),
                        codecs: codecs.join(","),
                        resolution: video.as_ref().map(|v| (v.info.width, v.info.height)),
                        frame_rate: r.frame_rate,
                    },
                ))
            })
            .collect();
        if variants.is_empty() {
            return None;
        }
        variants.sort_by_key(|v| std::cmp::Reverse((v.0, v.1)));
        let list: Vec<Variant> = variants.into_iter().map(|(_, _, v)| v).collect();
        Some(playlist::master(&list))
    }

    /// A rendition's media playlist, once it has a segment.
    pub fn media_playlist(&self, room: &str, rendition: &str) -> Option<(String, bool)> {
        let view = self.view(room)?;
        let view = view.lock().ok()?;
        let r = view.renditions.get(rendition)?;
        if r.playlist.entries.is_empty() {
            return None;
        }
        Some((r.playlist.render(), r.playlist.ended))
    }

    /// The file behind a segment or init segment name, if it is one the
    /// rendition still keeps. Names are checked against what was written,
    /// never joined to a path as given.
    pub fn file(&self, room: &str, rendition: &str, name: &str) -> Option<(PathBuf, FileKind)> {
        let view = self.view(room)?;
        let view = view.lock().ok()?;
        let r = view.renditions.get(rendition)?;
        let rest = name.strip_prefix(r.playlist.prefix.as_str())?;
        if let Some(seq) = rest
            .strip_prefix('-')
            .and_then(|s| s.strip_suffix(".m4s"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            return r
                .kept
                .iter()
                .any(|(s, _)| *s == seq)
                .then(|| (r.dir.join(r.playlist.segment_name(seq)), FileKind::Segment));
        }
        let id = rest
            .strip_prefix("-init")
            .and_then(|s| s.strip_suffix(".mp4"))
            .and_then(|s| s.parse::<u32>().ok())?;
        r.inits
            .contains_key(&id)
            .then(|| (r.dir.join(r.playlist.init_name(id)), FileKind::Init))
    }
}

/// What kind of file [`HlsStore::file`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// An init segment (`video/mp4`).
    Init,
    /// A media segment (`video/iso.segment`).
    Segment,
}

/// One publisher's feed into its room's packager; ends the epoch's
/// renditions it feeds when dropped.
pub struct HlsFeed {
    tx: Sender<Msg>,
    queued: Arc<AtomicUsize>,
    epoch: u32,
    room: RoomId,
    store: HlsStore,
    /// Renditions whose frames are skipped up to the next keyframe after a
    /// drop.
    skipping: HashMap<Arc<str>, bool>,
}

impl std::fmt::Debug for HlsFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HlsFeed")
            .field("room", &self.room)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl HlsFeed {
    /// A sender for the transcoder's renditions (same epoch).
    pub fn renditions(&self) -> RenditionFeed {
        RenditionFeed {
            tx: self.tx.clone(),
            queued: self.queued.clone(),
            epoch: self.epoch,
            skipping: HashMap::new(),
        }
    }

    fn send(&self, msg: Msg) -> bool {
        if self.queued.load(Ordering::Relaxed) >= QUEUE {
            metrics::counter!("weir_hls_dropped_total").increment(1);
            return false;
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(msg).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Queues a source access unit (never waits). After a drop, the
    /// rendition's frames are dropped up to its next keyframe.
    pub fn video(&mut self, frame: VideoIn) {
        let name: Arc<str> = Arc::from(SOURCE);
        if skip(&mut self.skipping, &name, frame.keyframe) {
            return;
        }
        let epoch = self.epoch;
        let sent = self.send(Msg::Video {
            epoch,
            rendition: name.clone(),
            frame,
        });
        self.skipping.insert(name, !sent);
    }

    /// Queues an AAC frame (never waits).
    pub fn audio(&mut self, frame: AudioIn) {
        let epoch = self.epoch;
        self.send(Msg::Audio { epoch, frame });
    }
}

fn skip(skipping: &mut HashMap<Arc<str>, bool>, name: &Arc<str>, keyframe: bool) -> bool {
    if skipping.get(name).copied().unwrap_or(false) && !keyframe {
        metrics::counter!("weir_hls_dropped_total").increment(1);
        return true;
    }
    false
}

impl Drop for HlsFeed {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Gone {
            epoch: self.epoch,
            rendition: Arc::from(SOURCE),
        });
        if let Ok(mut rooms) = self.store.inner.rooms.lock()
            && let Some(e) = rooms.get_mut(&self.room)
        {
            e.publishers = e.publishers.saturating_sub(1);
        }
    }
}

/// The transcoder's way into the packager: renditions' access units.
pub struct RenditionFeed {
    tx: Sender<Msg>,
    queued: Arc<AtomicUsize>,
    epoch: u32,
    skipping: HashMap<Arc<str>, bool>,
}

impl std::fmt::Debug for RenditionFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenditionFeed")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl RenditionFeed {
    /// Queues an encoded access unit of `rendition` (never waits).
    pub fn video(&mut self, rendition: &Arc<str>, frame: VideoIn) {
        if skip(&mut self.skipping, rendition, frame.keyframe) {
            return;
        }
        let ok = self.queued.load(Ordering::Relaxed) < QUEUE && {
            self.queued.fetch_add(1, Ordering::Relaxed);
            let sent = self
                .tx
                .send(Msg::Video {
                    epoch: self.epoch,
                    rendition: rendition.clone(),
                    frame,
                })
                .is_ok();
            if !sent {
                self.queued.fetch_sub(1, Ordering::Relaxed);
            }
            sent
        };
        if !ok {
            metrics::counter!("weir_hls_dropped_total").increment(1);
        }
        self.skipping.insert(rendition.clone(), !ok);
    }

    /// The rendition ends (its encoder stopped).
    pub fn gone(&self, rendition: &Arc<str>) {
        let _ = self.tx.send(Msg::Gone {
            epoch: self.epoch,
            rendition: rendition.clone(),
        });
    }
}

struct RenditionState {
    segmenter: Segmenter,
    epoch: u32,
    /// A segment was written in this epoch.
    produced: bool,
}

struct Packager {
    room: RoomId,
    config: HlsConfig,
    dir: PathBuf,
    prefix: String,
    view: Arc<Mutex<View>>,
    queued: Arc<AtomicUsize>,
    store: std::sync::Weak<Inner>,
    renditions: HashMap<Arc<str>, RenditionState>,
    epoch: u32,
    /// Per epoch, what is added to its timestamps (90 kHz) so that time
    /// goes on across publishers.
    shifts: VecDeque<(u32, i64)>,
    /// The latest presentation time written (90 kHz, shifted).
    end90: i64,
    gone_since: Option<Instant>,
    ended: bool,
    write_errors: u64,
    last_tick: Instant,
}

impl Packager {
    fn run(mut self, rx: Receiver<Msg>) {
        tracing::info!(room = %self.room, dir = %self.dir.display(), "HLS packager started");
        loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(msg) => {
                    if matches!(msg, Msg::Video { .. } | Msg::Audio { .. }) {
                        self.queued.fetch_sub(1, Ordering::Relaxed);
                    }
                    self.handle(msg);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if self.last_tick.elapsed() >= Duration::from_secs(1) {
                self.last_tick = Instant::now();
                if self.tick() {
                    break;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // The room's directory goes too when no newer run uses it.
        if let Some(room_dir) = self.dir.parent() {
            let _ = std::fs::remove_dir(room_dir);
        }
        metrics::gauge!("weir_hls_rooms").decrement(1.0);
        tracing::info!(room = %self.room, "HLS packager stopped; files removed");
    }

    /// Lifecycle: ends playlists after `linger`, removes the room after
    /// `expire` without a publisher. True when the room is gone.
    fn tick(&mut self) -> bool {
        let Some(store) = self.store.upgrade() else {
            return true;
        };
        let mut rooms = store
            .rooms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(entry) = rooms.get(&self.room) else {
            return true;
        };
        if entry.publishers > 0 {
            self.gone_since = None;
            return false;
        }
        let since = *self.gone_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.config.expire {
            rooms.remove(&self.room);
            return true;
        }
        drop(rooms);
        if since.elapsed() >= self.config.linger && !self.ended {
            self.ended = true;
            for r in self.renditions.values_mut() {
                r.segmenter.flush();
            }
            self.write_all();
            if let Ok(mut view) = self.view.lock() {
                for r in view.renditions.values_mut() {
                    r.playlist.ended = true;
                }
            }
            tracing::info!(room = %self.room, "HLS playlists ended: no publisher");
        }
        false
    }

    fn shift(&mut self, epoch: u32, first90: i64) -> i64 {
        if let Some((_, s)) = self.shifts.iter().find(|(e, _)| *e == epoch) {
            return *s;
        }
        let s = if self.shifts.is_empty() {
            0
        } else {
            self.end90 + 3_000 - first90
        };
        self.shifts.push_back((epoch, s));
        if self.shifts.len() > 4 {
            self.shifts.pop_front();
        }
        s
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Publisher { epoch, plan } => {
                self.epoch = epoch;
                self.ended = false;
                self.gone_since = None;
                // Open segments of the last publisher are closed; what
                // follows is discontinuous with them.
                for r in self.renditions.values_mut() {
                    r.segmenter.flush();
                }
                // Written before the epoch changes: those segments belong
                // to the last publisher.
                self.write_all();
                for r in self.renditions.values_mut() {
                    r.segmenter.mark_discontinuity();
                    r.epoch = epoch;
                    r.produced = false;
                }
                let (segment, max) = (self.config.segment, self.config.max_segment);
                for p in &plan {
                    self.renditions
                        .entry(p.name.clone())
                        .or_insert_with(|| RenditionState {
                            segmenter: {
                                let mut s = Segmenter::new(segment, max, 0, 0);
                                s.audio_only = *p.name == *SOURCE;
                                s
                            },
                            epoch,
                            produced: false,
                        });
                }
                let mut view = self
                    .view
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for r in view.renditions.values_mut() {
                    r.active = plan.iter().any(|p| *p.name == *r.planned.name);
                    r.playlist.ended = false;
                }
                for p in plan {
                    let r = view
                        .renditions
                        .entry(p.name.to_string())
                        .or_insert_with(|| RenditionView {
                            playlist: MediaPlaylist::new(
                                self.prefix.clone(),
                                self.config.window,
                                self.config.segment,
                            ),
                            dir: self.dir.join(&*p.name),
                            kept: VecDeque::new(),
                            inits: BTreeMap::new(),
                            planned: p.clone(),
                            active: true,
                            frame_rate: None,
                        });
                    r.planned = p;
                    r.active = true;
                }
            }
            Msg::Video {
                epoch,
                rendition,
                mut frame,
            } => {
                if epoch != self.epoch {
                    return;
                }
                let shift = self.shift(epoch, frame.dts);
                frame.pts += shift;
                frame.dts += shift;
                self.end90 = self.end90.max(frame.pts);
                let segment = self.config.segment;
                let max = self.config.max_segment;
                let r =
                    self.renditions
                        .entry(rendition.clone())
                        .or_insert_with(|| RenditionState {
                            segmenter: Segmenter::new(segment, max, 0, 0),
                            epoch,
                            produced: false,
                        });
                r.segmenter.push_video(frame);
                self.write(&rendition);
            }
            Msg::Audio { epoch, mut frame } => {
                if epoch != self.epoch {
                    return;
                }
                let rate = i64::from(frame.track.rate.max(1));
                let shift = self.shift(epoch, frame.time * 90_000 / rate);
                frame.time += shift * rate / 90_000;
                self.end90 = self.end90.max(frame.time * 90_000 / rate);
                let names: Vec<Arc<str>> = self.renditions.keys().cloned().collect();
                for name in names {
                    if let Some(r) = self.renditions.get_mut(&name)
                        && r.epoch == epoch
                    {
                        r.segmenter.push_audio(frame.clone());
                        self.write(&name);
                    }
                }
            }
            Msg::Gone { epoch, rendition } => {
                if epoch != self.epoch {
                    return;
                }
                if let Some(r) = self.renditions.get_mut(&rendition) {
                    r.segmenter.flush();
                }
                self.write(&rendition);
                let produced = self.renditions.get(&rendition).is_some_and(|r| r.produced);
                if !produced
                    && let Ok(mut view) = self.view.lock()
                    && let Some(v) = view.renditions.get_mut(&*rendition)
                {
                    // Not made for this publisher (e.g. not smaller than
                    // its source): no longer offered.
                    v.active = false;
                }
            }
        }
    }

    fn write_all(&mut self) {
        let names: Vec<Arc<str>> = self.renditions.keys().cloned().collect();
        for name in names {
            self.write(&name);
        }
    }

    /// Writes what a rendition's segmenter produced and updates its
    /// playlist; deletes segments past the window and `keep`.
    fn write(&mut self, name: &Arc<str>) {
        let Some(r) = self.renditions.get_mut(name) else {
            return;
        };
        let outputs: Vec<Output> = r.segmenter.drain().collect();
        if outputs.is_empty() {
            return;
        }
        r.produced |= outputs.iter().any(|o| matches!(o, Output::Segment(_)));
        let frame_rate = r.segmenter.frame_rate;
        let mut view = self
            .view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(v) = view.renditions.get_mut(&**name) else {
            return;
        };
        v.frame_rate = frame_rate.or(v.frame_rate);
        let limit = self.config.window + self.config.keep;
        for out in outputs {
            match out {
                Output::Init {
                    id,
                    bytes,
                    video,
                    audio,
                } => {
                    let path = v.dir.join(v.playlist.init_name(id));
                    match write_file(&v.dir, &path, &bytes) {
                        Ok(()) => {
                            v.inits.insert(id, (video, audio));
                        }
                        Err(e) => {
                            self.write_errors = report_write_error(self.write_errors, &path, &e)
                        }
                    }
                }
                Output::Segment(seg) => {
                    let path = v.dir.join(v.playlist.segment_name(seg.seq));
                    if let Err(e) = write_file(&v.dir, &path, &seg.bytes) {
                        self.write_errors = report_write_error(self.write_errors, &path, &e);
                        continue;
                    }
                    metrics::counter!("weir_hls_segments_total").increment(1);
                    metrics::counter!("weir_hls_bytes_written_total")
                        .increment(seg.bytes.len() as u64);
                    if seg.forced {
                        metrics::counter!("weir_hls_forced_cuts_total").increment(1);
                    }
                    v.playlist.push(Entry {
                        seq: seg.seq,
                        duration: seg.duration,
                        discontinuity: seg.discontinuity,
                        init: seg.init,
                        bytes: seg.bytes.len() as u64,
                        wall: seg.wall,
                    });
                    v.kept.push_back((seg.seq, seg.init));
                    while v.kept.len() > limit {
                        if let Some((old, _)) = v.kept.pop_front() {
                            let _ = std::fs::remove_file(v.dir.join(v.playlist.segment_name(old)));
                        }
                    }
                    // Init segments no kept segment needs any more.
                    let needed: Vec<u32> = v.kept.iter().map(|(_, i)| *i).collect();
                    let unused: Vec<u32> = v
                        .inits
                        .keys()
                        .copied()
                        .filter(|i| !needed.contains(i) && Some(*i) != needed.last().copied())
                        .collect();
                    for id in unused {
                        v.inits.remove(&id);
                        let _ = std::fs::remove_file(v.dir.join(v.playlist.init_name(id)));
                    }
                }
            }
        }
    }
}

fn report_write_error(errors: u64, path: &Path, e: &std::io::Error) -> u64 {
    let errors = errors + 1;
    metrics::counter!("weir_hls_write_errors_total").increment(1);
    if errors.is_power_of_two() {
        tracing::warn!(path = %path.display(), error = %e, errors, "cannot write an HLS file");
    }
    errors
}

/// Writes a file whole (to a temporary name, then renamed) so a reader
/// never sees half of it.
fn write_file(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

//! Data parallel across processes: where a rank stands ([`DistEnv`], read from the
//! variables `torchrun`, SLURM or OpenMPI set), and the two collectives a step needs
//! ([`Collective`]): gathering every rank's rows of a tensor and summing a tensor over
//! the ranks.
//!
//! [`TcpCollective`] is the CPU engine, over TCP between local or remote processes: rank
//! 0 listens at `MASTER_ADDR:MASTER_PORT`, every other rank connects to it, and each
//! collective is a gather to rank 0, which combines the parts **in rank order** and sends
//! the result back. `NcclCollective` (the `nccl` feature) is the GPU engine: NCCL on
//! each rank's GPU, set up over the same TCP connection. In the TCP engine the
//! combination order is fixed, so a run's numbers do not depend on
//! which rank arrives first, and a sum over ranks rounds exactly as the same sum over
//! micro-batches in one process ([`crate::step`]). A rank that stops (an error, a kill)
//! closes its connection; the others' next collective fails with an error naming it.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::{Result, TrainError};

#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "nccl")]
pub use nccl::NcclCollective;

/// This process's place in a data-parallel run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    /// The rank among the processes of this node (the GPU it takes, on a GPU node).
    pub local_rank: usize,
    /// Rank 0's address and port, where the others connect.
    pub master_addr: String,
    pub master_port: u16,
}

/// The launcher whose variables were read, and their names: rank, world size, local rank.
const LAUNCHERS: [(&str, [&str; 3]); 3] = [
    ("torchrun", ["RANK", "WORLD_SIZE", "LOCAL_RANK"]),
    ("SLURM", ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"]),
    (
        "OpenMPI",
        [
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
        ],
    ),
];

impl DistEnv {
    /// From the process environment; see [`DistEnv::from_vars`].
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The first launcher whose world-size variable is set, in the order torchrun,
    /// SLURM, OpenMPI (as open_clip reads them); `None` when none is, or the world has
    /// one rank. `MASTER_ADDR` defaults to 127.0.0.1 and `MASTER_PORT` to 29500 (torchrun's
    /// defaults); under torchrun, whose agent serves its store on `MASTER_PORT`
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`), rank 0 listens on `MASTER_PORT + 1`. A
    /// malformed value is an error naming the variable.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some((launcher, [rank_key, world_key, local_key])) =
            LAUNCHERS.iter().find(|(_, keys)| get(keys[1]).is_some())
        else {
            return Ok(None);
        };
        let number = |key: &str, default: Option<usize>| -> Result<usize> {
            match get(key) {
                Some(v) => v.trim().parse().map_err(|_| {
                    TrainError::Invalid(format!(
                        "{launcher} variable {key}={v:?} is not a non-negative integer"
                    ))
                }),
                None => default.ok_or_else(|| {
                    TrainError::Invalid(format!(
                        "{launcher} variable {world_key} is set but {key} is not"
                    ))
                }),
            }
        };
        let world_size = number(world_key, None)?;
        let rank = number(rank_key, None)?;
        let local_rank = number(local_key, Some(rank))?;
        if world_size == 0 || rank >= world_size {
            return Err(TrainError::Invalid(format!(
                "{launcher}: rank {rank} ({rank_key}) is not below the world size {world_size} ({world_key})"
            )));
        }
        if world_size == 1 {
            return Ok(None);
        }
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port: u16 = match get("MASTER_PORT") {
            Some(v) => v.trim().parse().map_err(|_| {
                TrainError::Invalid(format!("MASTER_PORT={v:?} is not a port number"))
            })?,
            None => 29500,
        };
        // torchrun's agent already serves its own store on MASTER_PORT (and says so in
        // this variable); rank 0 then listens on the port after it.
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let master_port = if agent_store {
            master_port.checked_add(1).ok_or_else(|| {
                TrainError::Invalid(format!(
                    "MASTER_PORT={master_port}: torchrun holds it, and no port follows it"
                ))
            })?
        } else {
            master_port
        };
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        }))
    }
}

/// The collectives of a data-parallel step. Tensors are f32; results are on `device`
/// of the input.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `(rows, ..)` tensor, concatenated along rows in rank order, and each
    /// rank's row count.
    fn all_gather_rows(&self, t: &Tensor) -> Result<(Tensor, Vec<usize>)>;
    /// The sum over ranks of a tensor of the same shape on every rank, added in rank
    /// order.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
}

/// Whether this process writes a run's files: without a collective, or as rank 0.
pub fn writes(comm: Option<&dyn Collective>) -> bool {
    comm.is_none_or(|c| c.rank() == 0)
}

/// Magic bytes that open a rank's greeting.
const HELLO: &[u8; 4] = b"RKAL";

/// How long a rank waits for the others to connect, and for any one message.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub message: Duration,
}

impl Default for Timeouts {
    /// 5 minutes to connect; 30 minutes for a message, PyTorch's default process-group
    /// timeout (the other ranks wait this long while rank 0 alone evaluates).
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(300),
            message: Duration::from_secs(1800),
        }
    }
}

impl Timeouts {
    /// The defaults, with the message timeout from `RANKALIGN_DIST_TIMEOUT` (seconds)
    /// when it is set.
    pub fn from_env() -> Result<Self> {
        let mut t = Self::default();
        if let Ok(v) = std::env::var("RANKALIGN_DIST_TIMEOUT") {
            let secs: u64 = v.trim().parse().map_err(|_| {
                TrainError::Invalid(format!(
                    "RANKALIGN_DIST_TIMEOUT={v:?} is not a number of seconds"
                ))
            })?;
            t.message = Duration::from_secs(secs.max(1));
        }
        Ok(t)
    }
}

/// The TCP engine: a star around rank 0 (see the module docs).
pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// Rank 0: a connection per rank 1.., in rank order; others: the one to rank 0.
    links: Vec<Link>,
}

impl std::fmt::Debug for TcpCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TcpCollective(rank {} of {})", self.rank, self.world)
    }
}

struct Link {
    /// The rank at the other end.
    peer: usize,
    reader: std::sync::Mutex<BufReader<TcpStream>>,
    writer: std::sync::Mutex<BufWriter<TcpStream>>,
}

pub(crate) fn dist_error(rank: usize, msg: impl std::fmt::Display) -> TrainError {
    TrainError::Invalid(format!("data parallel, rank {rank}: {msg}"))
}

impl Link {
    fn new(peer: usize, stream: TcpStream, timeouts: Timeouts) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeouts.message))?;
        stream.set_write_timeout(Some(timeouts.message))?;
        Ok(Self {
            peer,
            reader: std::sync::Mutex::new(BufReader::new(stream.try_clone()?)),
            writer: std::sync::Mutex::new(BufWriter::new(stream)),
        })
    }

    /// An error for a failed read or write on this link, seen from `me`.
    fn broken(&self, me: usize, e: std::io::Error) -> TrainError {
        use std::io::ErrorKind::*;
        let why = match e.kind() {
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => {
                "closed the connection: it stopped (an error or a kill; its own output says which)"
                    .to_string()
            }
            WouldBlock | TimedOut => "sent nothing within the message timeout".to_string(),
            _ => format!("the connection failed: {e}"),
        };
        dist_error(me, format!("rank {} {why}", self.peer))
    }

    fn send(&self, me: usize, msg: &Message) -> Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        msg.write(&mut *w)
            .and_then(|()| w.flush())
            .map_err(|e| self.broken(me, e))
    }

    /// The next message, its header checked by `expect` before its values are read.
    fn recv(&self, me: usize, expect: &Expect) -> Result<Message> {
        let mut r = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        Message::read(&mut *r, expect).map_err(|e| self.broken(me, e))
    }
}

/// One tensor on the wire: its dims, its f32 values, and (for gathers) row counts.
#[derive(Debug, PartialEq)]
struct Message {
    dims: Vec<usize>,
    rows: Vec<usize>,
    values: Vec<f32>,
}

/// Largest element count a message may announce (16 GiB of f32): a larger one is a
/// corrupt or foreign stream, not a tensor.
const MAX_VALUES: u64 = 1 << 32;

/// What a receiver knows of the message it waits for, checked before any value is read.
#[derive(Debug)]
enum Expect {
    /// Exactly these dims (a sum's parts and result).
    Dims(Vec<usize>),
    /// `(rows, tail..)` with this tail; for a gather's result also one row count per
    /// rank, adding up to the rows.
    Rows {
        tail: Vec<usize>,
        ranks: Option<usize>,
    },
}

impl Expect {
    fn admits(&self, dims: &[usize], rows: &[usize]) -> bool {
        match self {
            Expect::Dims(d) => dims == d.as_slice(),
            Expect::Rows { tail, ranks } => {
                !dims.is_empty()
                    && dims[1..] == tail[..]
                    && ranks
                        .is_none_or(|n| rows.len() == n && rows.iter().sum::<usize>() == dims[0])
            }
        }
    }
}

impl Message {
    fn of(t: &Tensor) -> Result<Self> {
        Ok(Self {
            dims: t.dims().to_vec(),
            rows: Vec::new(),
            values: t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        })
    }

    fn tensor(self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.values, self.dims, &Device::Cpu)?.to_device(device)?)
    }

    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        let mut head = Vec::with_capacity(16 + 8 * (self.dims.len() + self.rows.len()));
        for list in [&self.dims, &self.rows] {
            head.extend_from_slice(&(list.len() as u64).to_le_bytes());
            for &v in list.iter() {
                head.extend_from_slice(&(v as u64).to_le_bytes());
            }
        }
        w.write_all(&head)?;
        let mut bytes = Vec::with_capacity(4 * self.values.len());
        for v in &self.values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        w.write_all(&bytes)
    }

    fn read(r: &mut impl Read, expect: &Expect) -> std::io::Result<Self> {
        let bad = |msg: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string());
        let u64_of = |r: &mut dyn Read| -> std::io::Result<u64> {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            Ok(u64::from_le_bytes(b))
        };
        let mut lists = [Vec::new(), Vec::new()];
        for list in lists.iter_mut() {
            let n = u64_of(r)?;
            if n > 64 {
                return Err(bad("a message header announces more than 64 entries"));
            }
            for _ in 0..n {
                list.push(usize::try_from(u64_of(r)?).map_err(|_| bad("a dimension overflows"))?);
            }
        }
        let [dims, rows] = lists;
        if !expect.admits(&dims, &rows) {
            return Err(bad(&format!(
                "a message of shape {dims:?} (rows {rows:?}) where {expect:?} was expected"
            )));
        }
        let count = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .filter(|&c| c <= MAX_VALUES)
            .ok_or_else(|| bad("a message announces an impossible tensor size"))?;
        // Read in pieces, so that a stream that ends early fails before a header's
        // count is ever allocated in full.
        let count = count as usize;
        let mut values = Vec::with_capacity(count.min(1 << 20));
        let mut piece = vec![0u8; 4 * count.min(1 << 20)];
        while values.len() < count {
            let n = (count - values.len()).min(1 << 20);
            r.read_exact(&mut piece[..4 * n])?;
            values.extend(
                piece[..4 * n]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(Self { dims, rows, values })
    }
}

impl TcpCollective {
    /// Joins the run `env` describes: rank 0 listens and waits for every other rank,
    /// the others connect to it (retrying until `timeouts.connect`, as rank 0 may start
    /// later).
    pub fn connect(env: &DistEnv, timeouts: Timeouts) -> Result<Self> {
        let me = env.rank;
        let addr = format!("{}:{}", env.master_addr, env.master_port);
        let deadline = Instant::now() + timeouts.connect;
        if me == 0 {
            let listener = TcpListener::bind(&addr)
                .map_err(|e| dist_error(0, format!("cannot listen at {addr}: {e}")))?;
            Self::accept(&listener, env.world_size, timeouts)
        } else {
            let target = addr
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| {
                    dist_error(
                        me,
                        format!("MASTER_ADDR:MASTER_PORT {addr} does not resolve"),
                    )
                })?;
            let stream = loop {
                match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => {
                        return Err(dist_error(
                            me,
                            format!(
                                "rank 0 did not accept at {addr} within {:?}: {e}",
                                timeouts.connect
                            ),
                        ));
                    }
                }
            };
            let link = Link::new(0, stream, timeouts).map_err(|e| dist_error(me, e))?;
            {
                let mut w = link.writer.lock().unwrap_or_else(|p| p.into_inner());
                let mut hello = HELLO.to_vec();
                hello.extend_from_slice(&(me as u64).to_le_bytes());
                hello.extend_from_slice(&(env.world_size as u64).to_le_bytes());
                w.write_all(&hello)
                    .and_then(|()| w.flush())
                    .map_err(|e| link.broken(me, e))?;
            }
            Ok(Self {
                rank: me,
                world: env.world_size,
                links: vec![link],
            })
        }
    }

    /// Rank 0 on an already bound listener (tests bind port 0 and pass the port on).
    pub fn accept(listener: &TcpListener, world: usize, timeouts: Timeouts) -> Result<Self> {
        let deadline = Instant::now() + timeouts.connect;
        listener
            .set_nonblocking(true)
            .map_err(|e| dist_error(0, e))?;
        let mut peers: Vec<Option<Link>> = (1..world).map(|_| None).collect();
        let mut refused: Vec<String> = Vec::new();
        while peers.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((stream, from)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| dist_error(0, e))?;
                    stream
                        .set_read_timeout(Some(Duration::from_secs(30)))
                        .map_err(|e| dist_error(0, e))?;
                    // A connection that is not a new rank of this run is dropped and
                    // noted; the ranks may still come.
                    let mut hello = [0u8; 20];
                    if let Err(e) = (&stream).read_exact(&mut hello) {
                        refused.push(format!("{from} sent no greeting ({e})"));
                        continue;
                    }
                    let word = |i: usize| {
                        u64::from_le_bytes(hello[i..i + 8].try_into().unwrap_or([0xff; 8]))
                    };
                    let (rank, size) = (word(4) as usize, word(12) as usize);
                    if &hello[..4] != HELLO || size != world || rank == 0 || rank >= world {
                        refused.push(format!(
                            "{from} is not a rank of this run of {world} (it says rank {rank} of {size})"
                        ));
                        continue;
                    }
                    if peers[rank - 1].is_some() {
                        refused.push(format!("{from} says it is rank {rank}, which is connected"));
                        continue;
                    }
                    peers[rank - 1] =
                        Some(Link::new(rank, stream, timeouts).map_err(|e| dist_error(0, e))?);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = peers
                            .iter()
                            .enumerate()
                            .filter(|(_, p)| p.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        let refused = if refused.is_empty() {
                            String::new()
                        } else {
                            format!("; connections refused: {}", refused.join("; "))
                        };
                        return Err(dist_error(
                            0,
                            format!(
                                "ranks {} did not connect within {:?}{refused}",
                                missing.join(", "),
                                timeouts.connect
                            ),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(dist_error(0, format!("accepting a rank failed: {e}"))),
            }
        }
        Ok(Self {
            rank: 0,
            world,
            links: peers.into_iter().flatten().collect(),
        })
    }

    /// Rank 0 folds every other rank's part (in rank order, each checked by `part`)
    /// into its own with `fold`, and sends the result to all; the others send theirs
    /// and receive the result (checked by `result`).
    fn gather_fold(
        &self,
        mine: Message,
        part: &Expect,
        result: &Expect,
        mut fold: impl FnMut(Message, Message) -> Message,
    ) -> Result<Message> {
        if self.rank != 0 {
            let link = &self.links[0];
            link.send(self.rank, &mine)?;
            return link.recv(self.rank, result);
        }
        let mut acc = mine;
        for link in &self.links {
            acc = fold(acc, link.recv(0, part)?);
        }
        for link in &self.links {
            link.send(0, &acc)?;
        }
        Ok(acc)
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_gather_rows(&self, t: &Tensor) -> Result<(Tensor, Vec<usize>)> {
        let mut mine = Message::of(t)?;
        let Some((&rows, tail)) = mine.dims.split_first() else {
            return Err(dist_error(self.rank, "a gather needs a tensor with rows"));
        };
        let tail = tail.to_vec();
        mine.rows = vec![rows];
        let part = Expect::Rows {
            tail: tail.clone(),
            ranks: None,
        };
        let result = Expect::Rows {
            tail,
            ranks: Some(self.world),
        };
        // Parts are appended as they arrive: rank 0 holds one copy of the result.
        let out = self.gather_fold(mine, &part, &result, |mut acc, p| {
            acc.rows.push(p.dims[0]);
            acc.dims[0] += p.dims[0];
            acc.values.extend(p.values);
            acc
        })?;
        let rows = out.rows.clone();
        Ok((out.tensor(t.device())?, rows))
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let mine = Message::of(t)?;
        let same = Expect::Dims(mine.dims.clone());
        // Each part is added as it arrives, in rank order: ((r0 + r1) + r2) + …
        let out = self.gather_fold(mine, &same, &same, |mut acc, p| {
            for (a, v) in acc.values.iter_mut().zip(&p.values) {
                *a += v;
            }
            acc
        })?;
        out.tensor(t.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<Option<DistEnv>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn reads_torchrun_slurm_and_openmpi_variables() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
        let t = env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((t.rank, t.world_size, t.local_rank), (3, 4, 1));
        assert_eq!((t.master_addr.as_str(), t.master_port), ("node7", 1234));
        let s = env(&[
            ("SLURM_NTASKS", "8"),
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (s.rank, s.world_size, s.local_rank, s.master_port),
            (5, 8, 1, 29500)
        );
        let under_torchrun = env(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(under_torchrun.master_port, 29401);
        let m = env(&[("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "1")])
            .unwrap()
            .unwrap();
        assert_eq!(
            (m.rank, m.local_rank, m.master_addr.as_str()),
            (1, 1, "127.0.0.1")
        );
    }

    #[test]
    fn bad_launch_variables_are_named() {
        let e = env(&[("WORLD_SIZE", "two"), ("RANK", "0")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WORLD_SIZE") && e.contains("two"), "{e}");
        let e = env(&[("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("RANK"), "{e}");
        let e = env(&[("WORLD_SIZE", "2"), ("RANK", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 2") && e.contains("world size 2"), "{e}");
        let e = env(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_PORT"), "{e}");
    }

    /// Random bytes, and a valid message with bits flipped, never panic the reader and
    /// never yield a message of a shape the receiver did not expect.
    #[test]
    fn random_and_bit_flipped_streams_are_errors_or_expected_messages() {
        let m = Message {
            dims: vec![2, 3],
            rows: vec![1, 1],
            values: vec![1.0, -2.5, 3.0, 0.0, 7.0, -0.0],
        };
        let mut good = Vec::new();
        m.write(&mut good).unwrap();
        let expect = Expect::Rows {
            tail: vec![3],
            ranks: Some(2),
        };
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let len = (next() % 200) as usize;
            let noise: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let mut flipped = good.clone();
            for _ in 0..1 + next() % 4 {
                let bit = (next() % (8 * flipped.len() as u64)) as usize;
                flipped[bit / 8] ^= 1 << (bit % 8);
            }
            for bytes in [&noise, &flipped] {
                if let Ok(got) = Message::read(&mut bytes.as_slice(), &expect) {
                    assert!(expect.admits(&got.dims, &got.rows), "{got:?}");
                    assert_eq!(got.values.len(), got.dims.iter().product::<usize>());
                }
            }
        }
    }

    #[test]
    fn a_message_round_trips_and_a_corrupt_one_is_an_error() {
        let m = Message {
            dims: vec![2, 3],
            rows: vec![1, 1],
            values: vec![1.0, -2.5, 3.0, 0.0, f32::MAX, -0.0],
        };
        let mut buf = Vec::new();
        m.write(&mut buf).unwrap();
        let expect = Expect::Rows {
            tail: vec![3],
            ranks: Some(2),
        };
        assert_eq!(Message::read(&mut buf.as_slice(), &expect).unwrap(), m);
        // Every truncation fails cleanly.
        for cut in 0..buf.len() {
            assert!(
                Message::read(&mut &buf[..cut], &expect).is_err(),
                "cut at {cut}"
            );
        }
        // A shape the receiver does not expect is refused before its values are read.
        let err = Message::read(&mut buf.as_slice(), &Expect::Dims(vec![3, 2])).unwrap_err();
        assert!(err.to_string().contains("[2, 3]"), "{err}");
        let uneven = Expect::Rows {
            tail: vec![3],
            ranks: Some(3),
        };
        assert!(Message::read(&mut buf.as_slice(), &uneven).is_err());
        // An absurd header is refused before any allocation.
        let mut bad = Vec::new();
        bad.extend_from_slice(&2u64.to_le_bytes());
        bad.extend_from_slice(&u64::MAX.to_le_bytes());
        bad.extend_from_slice(&u64::MAX.to_le_bytes());
        bad.extend_from_slice(&0u64.to_le_bytes());
        let any = Expect::Rows {
            tail: vec![usize::MAX],
            ranks: None,
        };
        assert!(Message::read(&mut bad.as_slice(), &any).is_err());
    }
}

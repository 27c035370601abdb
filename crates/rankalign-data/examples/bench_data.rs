//! The rankalign side of the data-throughput benchmark (`cargo xtask bench`, op
//! `data_decode_rrc`), the twin of `benches/torch_data.py`: webdataset shards of JPEGs
//! (from `benches/make_bench_shards.py`) through [`PairStream`] — tar listing, seeded
//! shuffle buffer, zune-jpeg decoding, torchvision's `RandomResizedCrop(224, scale 0.9–1,
//! bicubic)` with Pillow's arithmetic — then collation into a normalised `(64, 3, 224,
//! 224)` f32 tensor, on a rayon pool of `--threads` data threads.
//!
//! Timing: one warm-up batch, then full passes over all shards (3, or 1 with `--quick`);
//! `ms` is the median pass time per batch of 64. Peak memory is this process's VmHWM
//! (peak resident set) at the end, which covers the whole streaming run.
//!
//! Run: `cargo run --release -p rankalign-data --example bench_data -- --shards DIR
//! --threads N [--quick]`; prints one JSON line like the Python script.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use rankalign_data::batch::collate_images;
use rankalign_data::source::{PairSource, PairStream, SourceConfig, WdsSource};
use rankalign_data::{DataPosition, Sharding, SkipPolicy};

const BATCH: usize = 64;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn vm_hwm_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(arg("--shards").ok_or("--shards DIR is required")?);
    let threads: usize = arg("--threads").unwrap_or_else(|| "1".into()).parse()?;
    let quick = std::env::args().any(|a| a == "--quick");
    let shards: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "tar"))
            .collect();
        v.sort();
        v
    };
    if shards.is_empty() {
        return Err(format!("no .tar shards in {}", dir.display()).into());
    }
    let spec = shards
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join("::");
    let cfg: SourceConfig = toml::from_str(&format!(
        "source = \"webdataset\"\nimage_size = 224\nshards = \"{spec}\"\nshuffle_buffer = 1000"
    ))?;
    let SourceConfig::Webdataset(w) = cfg else {
        unreachable!()
    };
    let source: Arc<dyn PairSource> = Arc::new(WdsSource::open(&w, &spec)?);
    let per_pass = source.len() / BATCH;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()?;
    let mut stream = PairStream::new(
        source.clone(),
        1,
        Sharding::default(),
        SkipPolicy::default(),
        DataPosition::default(),
    )?;
    let device = candle_core::Device::Cpu;
    let batch = |stream: &mut PairStream| -> Result<(), Box<dyn std::error::Error>> {
        let (samples, _) = pool.install(|| stream.next_batch(BATCH, 224))?;
        let images: Vec<_> = samples.iter().map(|s| &s.image).collect();
        let t = pool.install(|| collate_images(&images, 224, &device))?;
        std::hint::black_box(t);
        Ok(())
    };
    batch(&mut stream)?;
    let passes = if quick { 1 } else { 3 };
    let mut times = Vec::new();
    for p in 0..passes {
        // Each timed pass starts at a pass boundary, as the Python side's passes do.
        stream = PairStream::new(
            source.clone(),
            1,
            Sharding::default(),
            SkipPolicy::default(),
            DataPosition {
                pass: p as u64 + 1,
                ..DataPosition::default()
            },
        )?;
        let t0 = Instant::now();
        for _ in 0..per_pass {
            batch(&mut stream)?;
        }
        times.push(t0.elapsed().as_secs_f64());
        eprintln!(
            "pass {}: {:.1} images/s",
            p + 1,
            (per_pass * BATCH) as f64 / times[p]
        );
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    #[allow(clippy::print_stdout)]
    {
        println!(
            "{{\"op\": \"data_decode_rrc\", \"size\": \"jpeg 224px b64 w{threads}\", \"impl\": \"ours\", \"ms\": {:.3}, \"peak_mb\": {:.1}, \"images_per_s\": {:.1}}}",
            1e3 * median / per_pass as f64,
            vm_hwm_mb(),
            (per_pass * BATCH) as f64 / median
        );
    }
    Ok(())
}

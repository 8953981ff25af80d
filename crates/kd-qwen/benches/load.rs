//! Load benchmark (not a test): a Qwen3-0.6B-shaped checkpoint with random weights, bf16,
//! sharded as transformers shards it, loaded into f32 on the CPU.
//!
//! `cargo bench -p kd-qwen --bench load` writes the checkpoint to a temporary folder, then
//! runs the load in a child process (so the writer's memory does not count) which reports
//! the time to read the files, the load time and peak RSS (`VmHWM`), and writes
//! `docs/bench-load.md`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark binary

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use kd_qwen::QwenConfig;

const CHILD_ENV: &str = "KD_BENCH_LOAD_DIR";
/// transformers' default `max_shard_size` is 5 GB; 500 MB gives the 0.6B model 3 shards.
const SHARD_BYTES: usize = 500_000_000;

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Every tensor name and PyTorch shape of a model with this config.
fn layout(c: &QwenConfig) -> Vec<(String, Vec<usize>)> {
    let (d, hd, f) = (c.hidden_size, c.head_dim(), c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, d],
    )];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![q, d]),
            ("self_attn.k_proj.weight", vec![kv, d]),
            ("self_attn.v_proj.weight", vec![kv, d]),
            ("self_attn.o_proj.weight", vec![d, q]),
            ("self_attn.q_norm.weight", vec![hd]),
            ("self_attn.k_norm.weight", vec![hd]),
            ("mlp.gate_proj.weight", vec![f, d]),
            ("mlp.up_proj.weight", vec![f, d]),
            ("mlp.down_proj.weight", vec![d, f]),
            ("input_layernorm.weight", vec![d]),
            ("post_attention_layernorm.weight", vec![d]),
        ] {
            out.push((format!("{p}.{name}"), shape));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    out
}

/// Random bf16 bytes (|x| < 0.0625) from a xorshift generator: fast, and never NaN.
fn random_bf16(n: usize, state: &mut u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * n);
    for _ in 0..n {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let mantissa = (*state & 0x7f) as u16;
        let sign = ((*state >> 7) & 1) as u16;
        // exponent 118..122: magnitudes 2^-9 .. 2^-5
        let exponent = 118 + ((*state >> 8) % 5) as u16;
        out.extend_from_slice(&((sign << 15) | (exponent << 7) | mantissa).to_le_bytes());
    }
    out
}

fn write_checkpoint(dir: &Path, config: &QwenConfig) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut shards: Vec<Vec<(String, Vec<usize>, Vec<u8>)>> = vec![Vec::new()];
    let mut size = 0;
    for (name, shape) in layout(config) {
        let bytes = random_bf16(shape.iter().product(), &mut state);
        if size + bytes.len() > SHARD_BYTES && !shards.last().unwrap().is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes.len();
        shards.last_mut().unwrap().push((name, shape, bytes));
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        let views: Vec<_> = shard
            .iter()
            .map(|(n, s, b)| {
                weight_map.insert(n.clone(), file.clone().into());
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b);
                (n.clone(), view.unwrap())
            })
            .collect();
        safetensors::tensor::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(config).unwrap(),
    )
    .unwrap();
}

fn child(dir: &Path) {
    // 1. Reading the files (page cache warm after the first pass) is the floor to compare to.
    let mut buf = vec![0u8; 1 << 24];
    let mut best_read = f64::MAX;
    let mut read_bytes = 0usize;
    for _ in 0..2 {
        read_bytes = 0;
        let start = Instant::now();
        for entry in std::fs::read_dir(dir).unwrap() {
            let mut file = std::fs::File::open(entry.unwrap().path()).unwrap();
            loop {
                let n = file.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                read_bytes += n;
            }
        }
        best_read = best_read.min(start.elapsed().as_secs_f64());
    }
    drop(buf);
    assert!(read_bytes > 0, "read nothing");
    eprintln!("read {read_bytes} bytes in {best_read:.3} s");

    // 2. A second floor: writing as many f32 values as the model has into fresh memory, on
    //    every core (what any bf16 -> f32 load must do at least: 2 x the file's bytes, with
    //    the page faults of new memory).
    let n = (params_of(dir) as usize).max(1);
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let start = Instant::now();
    let mut floor = vec![0.0f32; n];
    std::thread::scope(|s| {
        for (t, chunk) in floor.chunks_mut(n.div_ceil(threads)).enumerate() {
            s.spawn(move || {
                for (i, v) in chunk.iter_mut().enumerate() {
                    *v = (t + i) as f32;
                }
            });
        }
    });
    let fill = start.elapsed().as_secs_f64();
    std::hint::black_box(&floor);
    drop(floor);

    // 3. The load itself, into f32.
    let device = burn::tensor::Device::flex();
    let start = Instant::now();
    let model = kd_qwen::load_checkpoint(dir, &device).unwrap();
    let load = start.elapsed().as_secs_f64();
    let params = model.config().num_params();
    println!("{best_read} {load} {} {params} {fill}", vm_hwm_kib());
}

/// Parameters of the checkpoint in `dir`, from its config.
fn params_of(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = QwenConfig::from_json(&text, "config.json").unwrap();
    config.num_params() as u64
}

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
        return;
    }
    let config = QwenConfig::qwen3_shaped(1024, 3072, 28, 16, 8, 128);
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    write_checkpoint(dir.path(), &config);
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let bytes: u64 = files
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    println!(
        "wrote {} files, {:.2} GB, in {:.1} s",
        files.len(),
        bytes as f64 / 1e9,
        start.elapsed().as_secs_f64()
    );

    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<f64> = text
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    assert!(
        fields.len() == 5 && out.status.success(),
        "child failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let (read, load, hwm_kib, params, fill) =
        (fields[0], fields[1], fields[2], fields[3], fields[4]);
    let peak = hwm_kib * 1024.0;
    let f32_bytes = params * 4.0;
    let report = format!(
        "# Load benchmark\n\n`cargo bench -p kd-qwen --bench load` (benches/load.rs; the figures below are from \
         its dev-profile build, `cargo test -p kd-qwen --bench load --no-run` and running the binary, \
         which optimises dependencies fully): a Qwen3-0.6B-shaped \
         checkpoint ({params:.0} parameters, tied head) with random bf16 weights, {} safetensors shards \
         plus model.safetensors.index.json, loaded into f32 on the Flex CPU backend in a child process. \
         Machine: 2 shared cores; figures swing with the other load.\n\n\
         | | value |\n|---|---|\n\
         | checkpoint on disk (bf16) | {:.2} GB |\n\
         | the same weights in f32 | {:.2} GB |\n\
         | reading the files (warm page cache) | {read:.2} s |\n\
         | writing that many f32 values into fresh memory, all cores | {fill:.2} s |\n\
         | load into f32 | {load:.2} s ({:.1}× reading, {:.1}× the f32 write) |\n\
         | peak RSS (VmHWM) | {:.2} GB ({:.2}× the checkpoint, {:.2}× the f32 weights) |\n\n\
         Goal: peak RSS ≤ 1.5× the checkpoint, load ≤ 2× reading. Neither can be met by a bf16 \
         checkpoint loaded into f32: the weights double in size, so peak memory is at least 2× the \
         file (the meaningful figure is the ratio to the f32 weights: the loader holds one tensor's \
         bytes beyond the model at a time), and the load must write twice the file's bytes into \
         fresh memory, which alone costs the \"f32 write\" row, many times the page-cache read. \
         The load decodes (and transposes the `[out, in]` linear weights to burn's `[in, out]`) on \
         every core; the ratio to the f32 write is what is left to win.\n",
        files.len() - 2,
        bytes as f64 / 1e9,
        f32_bytes / 1e9,
        load / read,
        load / fill,
        peak / 1e9,
        peak / bytes as f64,
        peak / f32_bytes,
    );
    println!("{report}");
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/bench-load.md");
    std::fs::write(&docs, report).unwrap();
}

//! `primad`: the prima daemon. With no subcommand (or `serve`) it runs the
//! service; the engine tools (`generate`, `perplexity`, `inspect`, `tokenize`,
//! `bench`) run a model on this machine alone and mirror llama.cpp's.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use prima_kernels::{
    engine::{self, GenerateParams},
    quant::GgmlType,
    tokenizer::chat::Message,
    Model, Sampler, SamplerConfig, Tokenizer,
};

#[derive(Parser)]
#[command(
    name = "primad",
    version,
    about = "prima: run language models across the devices a household owns",
    long_about = "prima: run language models across the devices a household owns.\n\n\
        With no subcommand, primad runs the service: the OpenAI-compatible API \
        (http://127.0.0.1:7340 by default) that `primactl` and any OpenAI client \
        talk to. The engine tools below run a GGUF model on this machine alone.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Clone, Default)]
struct ServeArgs {
    /// Config file (default: /etc/prima/primad.toml if it exists, else built-in defaults).
    #[arg(long, value_name = "FILE", env = "PRIMAD_CONFIG")]
    config: Option<PathBuf>,
    /// State directory (identity, model registry); overrides [store] state_dir.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// API listen address HOST:PORT; overrides [api] addr.
    #[arg(long, value_name = "HOST:PORT")]
    api_addr: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Generate text from a prompt; prints only the generated text to stdout.
    Generate(GenerateArgs),
    /// Perplexity of a text file, computed the way llama.cpp's tool does.
    Perplexity(PerplexityArgs),
    /// Show a model's architecture, sizes, quantisation mix, tokenizer and template.
    Inspect(InspectArgs),
    /// Tokenize text with a model's tokenizer and print the ids as JSON.
    Tokenize(TokenizeArgs),
    /// Measure prefill and decode speed (tokens/s), like llama-bench.
    Bench(BenchArgs),
    /// Plan a model onto devices offline with Halda ("what if I add my phone?").
    Plan(PlanArgs),
    /// Measure this device for Halda (CPU per weight type, memory, disk).
    Profile(ProfileArgs),
    /// Write a synthetic llama-family GGUF (random weights, a real
    /// tokenizer) of a chosen shape and quantisation, to test big-model
    /// behaviour without downloads. llama.cpp loads these files too.
    Synth(SynthArgs),
    /// Install, remove or inspect primad as this machine's system service
    /// (systemd on Linux, launchd on macOS, the Windows service manager).
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Lists the GPU adapters as JSON (the daemon runs this in a child
    /// process, so drivers load only where a GPU will be used).
    #[command(hide = true, name = primad::gpu::PROBE_COMMAND)]
    GpuProbe,
    /// Test aid: act as this (stopped) device and send malformed gossip.
    #[command(hide = true)]
    DebugHostileGossip {
        #[command(flatten)]
        serve: ServeArgs,
        /// The member to send to, e.g. /ip4/10.77.0.1/tcp/7341.
        #[arg(long)]
        peer: String,
    },
}

/// Where to run layers: `--gpu` options shared by `generate` and `bench`.
#[derive(Args, Clone)]
struct GpuArgs {
    /// Run the last N layers (or `all`: every layer, the embedding and the
    /// output head) on the GPU through wgpu; the rest on the CPU.
    #[arg(long, value_name = "N|all")]
    gpu: Option<String>,
    /// Use the first GPU adapter whose name contains this.
    #[arg(long, value_name = "NAME", requires = "gpu")]
    gpu_adapter: Option<String>,
    /// Accept a software adapter (Mesa's llvmpipe): correct, slow.
    #[arg(long, requires = "gpu")]
    allow_software_gpu: bool,
}

/// Speculative decoding: `--draft-layers` or `--draft-model`.
#[derive(Args, Clone)]
struct DraftArgs {
    /// Speculative decoding with the model's own first N layers and its
    /// output head as the draft (no second model).
    #[arg(long, value_name = "N", conflicts_with = "draft_model")]
    draft_layers: Option<usize>,
    /// Speculative decoding with this smaller model (same vocabulary) as
    /// the draft.
    #[arg(long, value_name = "PATH")]
    draft_model: Option<PathBuf>,
    /// Most tokens the draft proposes per pass of the model.
    #[arg(long, default_value_t = 8, value_name = "N")]
    draft_max: usize,
    /// Stop proposing when the draft's top token probability falls below this.
    #[arg(long, default_value_t = 0.6, value_name = "P")]
    draft_p_min: f32,
}

impl DraftArgs {
    fn enabled(&self) -> bool {
        self.draft_layers.is_some() || self.draft_model.is_some()
    }

    fn params(&self) -> prima_kernels::speculative::SpecParams {
        prima_kernels::speculative::SpecParams {
            max_draft: self.draft_max,
            p_min: self.draft_p_min,
        }
    }

    /// The draft model file, opened and checked against `target`'s vocabulary.
    fn open_model(&self, target: &Model) -> Result<Option<Model>> {
        let Some(p) = &self.draft_model else {
            return Ok(None);
        };
        let d = Model::open(p).with_context(|| format!("loading the draft {}", p.display()))?;
        prima_kernels::speculative::ModelDraft::check(&d, target)
            .map_err(|e| anyhow::anyhow!("the draft {} cannot be used: {e}", p.display()))?;
        Ok(Some(d))
    }

    fn describe(&self) -> String {
        match (&self.draft_layers, &self.draft_model) {
            (Some(n), _) => format!("first {n} layers as the draft"),
            (_, Some(p)) => format!("draft {}", p.display()),
            _ => "no draft".into(),
        }
    }
}

fn any_draft<'m>(
    a: &DraftArgs,
    target: &'m Model,
    draft_model: Option<&'m Model>,
    ctx: usize,
) -> Result<prima_kernels::speculative::Draft<'m>> {
    use prima_kernels::speculative::{Draft, ModelDraft, SelfDraft};
    Ok(match (a.draft_layers, draft_model) {
        (Some(n), _) => Draft::Layers(SelfDraft::new(target, n, ctx).with_context(|| {
            format!(
                "--draft-layers {n}: must be between 1 and {}",
                target.config.n_layer - 1
            )
        })?),
        (None, Some(m)) => Draft::Model(Box::new(ModelDraft::new(m, ctx))),
        (None, None) => bail!("no draft given"),
    })
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    gpu: GpuArgs,
    #[command(flatten)]
    draft: DraftArgs,
    /// Prompt length for the prefill test (0 skips it).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to decode one at a time for the decode test (0 skips it).
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Repetitions of each test; the median is reported.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Also measure memory read bandwidth and the decode ceiling it implies.
    #[arg(long)]
    bandwidth: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Install and start the service (idempotent; needs root/Administrator).
    /// Linux: a `prima` system user, /var/lib/prima, /etc/prima/primad.toml
    /// (kept if present) and /etc/systemd/system/primad.service.
    Install,
    /// Stop and remove the service; state and config stay unless --purge.
    Uninstall {
        /// Also remove the state (identity, household key, models), the
        /// config and (Linux) the prima user.
        #[arg(long)]
        purge: bool,
    },
    /// Is it installed, enabled, running?
    Status,
    /// What the Windows service manager runs (not for direct use).
    #[command(hide = true)]
    Run,
}

#[derive(Args)]
struct SynthArgs {
    /// Shape: tiny, 1b, 3b (= ref, the reference's bigger-than-memory
    /// model: 28 layers, d_model 3072, d_ff 8192, 24/8 heads) or 8b.
    #[arg(long, default_value = "ref")]
    shape: String,
    /// Override the number of layers.
    #[arg(long)]
    layers: Option<u64>,
    /// Override d_model.
    #[arg(long)]
    embd: Option<u64>,
    /// Override d_ff.
    #[arg(long)]
    ff: Option<u64>,
    /// Weight type of the layers: q4_0, q8_0, q4_k or f16 (embedding and
    /// output are q8_0, or f16 for f16).
    #[arg(long, default_value = "q4_0")]
    quant: String,
    /// Copy the tokenizer (and chat template) from this GGUF; default:
    /// SmolLM2 from the model cache (scripts/fetch-models smollm2).
    #[arg(long, value_name = "PATH")]
    tokenizer_from: Option<PathBuf>,
    /// Random seed for the weights (same seed, same file).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the model.
    #[arg(long, short = 'o', value_name = "PATH")]
    out: PathBuf,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct ProfileArgs {
    /// Time the CPU on this model's weight types (else only f32).
    #[arg(long, short = 'm', value_name = "PATH")]
    model: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Directory for the disk probe's 64 MiB scratch file.
    #[arg(long, default_value = ".")]
    scratch: PathBuf,
    /// Print the device record as JSON (the format `primad plan --devices` reads).
    #[arg(long)]
    json: bool,
    /// The config whose `[gpu]` section picks the adapter (default: the
    /// platform's primad.toml if present).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct PlanArgs {
    /// Device profiles: a JSON file `{"devices": [...], "options": {...}}`
    /// (options optional); each device record is a Halda device profile
    /// (name, os, cpu.flops by weight type in GFLOPS, memory, disk, gpus,
    /// links). The first device is the head. See daemon/halda/src/profile.rs.
    #[arg(long, value_name = "FILE.json")]
    devices: PathBuf,
    /// The GGUF model to plan.
    #[arg(long, short = 'm', value_name = "PATH")]
    model: PathBuf,
    /// Context length the KV cache is sized for.
    #[arg(long, default_value_t = 2048)]
    ctx: u32,
    /// `optimal` (the global optimum, with prefetch overlap and links) or
    /// `shipped` (prima.cpp's algorithm, for comparison).
    #[arg(long, default_value = "optimal")]
    mode: String,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    /// Path to a GGUF model file.
    #[arg(long, short = 'm', value_name = "PATH")]
    model: PathBuf,
    /// Text to tokenize.
    #[arg(long, short = 'p', conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the text from a file instead.
    #[arg(long, short = 'f', value_name = "FILE")]
    file: Option<PathBuf>,
    /// Do not add BOS/EOS even when the model asks for them.
    #[arg(long)]
    no_special: bool,
    /// Turn control-token text such as <|im_start|> into control tokens.
    #[arg(long)]
    parse_special: bool,
}

#[derive(Args)]
struct ModelArgs {
    /// Path to a GGUF model file.
    #[arg(long, short = 'm', value_name = "PATH")]
    model: PathBuf,
    /// Worker threads for the forward pass (default: all cores).
    #[arg(long, short = 't', value_name = "N")]
    threads: Option<usize>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    gpu: GpuArgs,
    #[command(flatten)]
    draft: DraftArgs,
    /// The prompt text.
    #[arg(long, short = 'p')]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy (deterministic).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample only among the K most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling: keep the smallest set with this total probability.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalise repeating any of the last 64 tokens (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Subtract this from logits of tokens already present (0 = off).
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, short = 's', default_value_t = 0x5eed)]
    seed: u64,
    /// Stop when this string is generated (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Apply the model's chat template to the prompt (a user message).
    #[arg(long)]
    chat: bool,
    /// Context size in tokens.
    #[arg(long, short = 'c', default_value_t = 2048)]
    ctx: usize,
    /// Print the prompt and generated token ids and speeds to stderr as JSON.
    #[arg(long)]
    ids: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file to score.
    #[arg(long, short = 'f', value_name = "FILE")]
    file: PathBuf,
    /// Tokens per chunk.
    #[arg(long, short = 'c', default_value_t = 128)]
    ctx: usize,
    /// Print `{"ppl": .., "chunks": [..], "tokens": ..}` instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// Path to a GGUF model file.
    #[arg(long, short = 'm', value_name = "PATH")]
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The service logs its life at info; the tools only warnings. RUST_LOG wins.
    let serving = matches!(cli.command, None | Some(Command::Serve(_)));
    if serving {
        // Before any thread exists.
        primad::memory::tune_allocator();
    }
    let default = if serving { "info,sled=warn" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        // Colour for a terminal only: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let res = match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(a)) => serve(a),
        Some(c) => tool(c),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            eprintln!("primad: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    let cfg = primad::serve::load_config(
        a.config.as_deref(),
        &primad::serve::Overrides {
            state_dir: a.state_dir,
            api_addr: a.api_addr,
        },
    )?;
    primad::serve::run(cfg)
}

fn tool(c: Command) -> Result<()> {
    match c {
        Command::Serve(_) => unreachable!("handled by the caller"),
        Command::DebugHostileGossip { serve, peer } => {
            let cfg = primad::serve::load_config(
                serve.config.as_deref(),
                &primad::serve::Overrides {
                    state_dir: serve.state_dir,
                    api_addr: serve.api_addr,
                },
            )?;
            primad::serve::hostile_gossip(cfg, &peer)
        }
        Command::Generate(a) => generate(a),
        Command::Perplexity(a) => perplexity(a),
        Command::Inspect(a) => inspect(a),
        Command::Tokenize(a) => tokenize(a),
        Command::Bench(a) => bench(a),
        Command::Plan(a) => plan(a),
        Command::Profile(a) => profile(a),
        Command::Synth(a) => synth(a),
        Command::GpuProbe => {
            #[cfg(feature = "gpu")]
            let list = serde_json::json!(prima_kernels::gpu::adapters());
            #[cfg(not(feature = "gpu"))]
            let list = serde_json::json!([]);
            println!("{list}");
            Ok(())
        }
        Command::Service(c) => match c {
            ServiceCmd::Install => primad::service::install(),
            ServiceCmd::Uninstall { purge } => primad::service::uninstall(purge),
            ServiceCmd::Status => primad::service::status(),
            #[cfg(windows)]
            ServiceCmd::Run => primad::service::run_as_service(),
            #[cfg(not(windows))]
            ServiceCmd::Run => anyhow::bail!(
                "`primad service run` is for the Windows service manager; elsewhere run `primad`"
            ),
        },
    }
}

fn profile(a: ProfileArgs) -> Result<()> {
    set_threads(a.threads)?;
    let model = match &a.model {
        Some(p) => Some(Model::open(p).with_context(|| format!("loading {}", p.display()))?),
        None => None,
    };
    let name = primad::serve::hostname();
    let t = Instant::now();
    let cfg = match &a.config {
        Some(path) => prima_config::Config::from_file(path)?,
        None => prima_config::Config::load(None)?.0,
    };
    let gpu = primad::gpu::Handle::open(&cfg.gpu);
    let p = primad::profiler::profile(&name, model.as_ref(), &a.scratch, &gpu)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    println!(
        "device     {} ({:?}), profiled in {:.1} s",
        p.name,
        p.os,
        t.elapsed().as_secs_f64()
    );
    println!("threads    {}", p.cpu.threads.unwrap_or(0));
    for (ty, g) in &p.cpu.flops {
        println!("cpu        {ty:<6} {g:8.1} GFLOPS (mat-vec)");
    }
    println!("kv copy    {:.4} ms per token per layer", p.cpu.kv_copy_ms);
    println!(
        "memory     {:.2} GiB total, {:.2} GiB available for models, read {:.1} GB/s",
        p.memory.total_bytes as f64 / (1u64 << 30) as f64,
        p.memory.available_bytes as f64 / (1u64 << 30) as f64,
        p.memory.bandwidth_gbps.unwrap_or(0.0)
    );
    println!(
        "disk       {:.2} GB/s sequential, {:.3} GB/s random 4 KiB",
        p.disk.seq_read_gbps, p.disk.rnd_read_gbps
    );
    println!("gpu        {}", gpu.summary());
    for g in &p.gpus {
        for (ty, f) in &g.flops {
            println!("gpu        {ty:<6} {f:8.1} GFLOPS (mat-vec)");
        }
        println!(
            "gpu        kv copy {:.4} ms, {:.2} GiB for layers",
            g.kv_copy_ms,
            g.vram_free_bytes as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesFile {
    devices: Vec<halda::DeviceProfile>,
    #[serde(default)]
    options: halda::Options,
}

fn plan(a: PlanArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.devices)
        .with_context(|| format!("reading {}", a.devices.display()))?;
    let mut f: DevicesFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a devices file", a.devices.display()))?;
    f.options.mode = match a.mode.as_str() {
        "optimal" => halda::Mode::Optimal,
        "shipped" => halda::Mode::Shipped,
        m => bail!("--mode {m}: expected optimal or shipped"),
    };
    let model = Model::open(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let name = a
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mp = primad::modelprof::model_profile(&model.file, &model.config, &name, a.ctx);
    let p = halda::plan(&mp, &f.devices, a.ctx, &f.options)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{p}");
    }
    Ok(())
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn set_threads(n: Option<usize>) -> Result<()> {
    if let Some(n) = n {
        prima_kernels::cpu::set_threads(n).context("--threads")?;
    }
    Ok(())
}

fn load(args: &ModelArgs) -> Result<(Model, Tokenizer)> {
    set_threads(args.threads)?;
    load_path(&args.model)
}

fn load_path(path: &Path) -> Result<(Model, Tokenizer)> {
    let t = Instant::now();
    let model = Model::open(path).with_context(|| format!("loading model {}", path.display()))?;
    let tok = Tokenizer::from_metadata(&model.file.metadata)
        .with_context(|| format!("loading the tokenizer of {}", path.display()))?;
    tracing::info!(elapsed = ?t.elapsed(), "model loaded");
    Ok((model, tok))
}

/// A session over the whole model, with the layers `--gpu` asks for on the
/// GPU.
fn session<'m>(
    model: &'m Model,
    ctx: usize,
    g: &GpuArgs,
    verbose: bool,
) -> Result<engine::Session<'m>> {
    let Some(spec) = &g.gpu else {
        return Ok(engine::Session::new(model, ctx));
    };
    #[cfg(feature = "gpu")]
    {
        use prima_kernels::gpu::{Gpu, GpuLayers, GpuOptions};
        let n = model.config.n_layer;
        let (layers, ends) = match spec.as_str() {
            "all" => (0..n, true),
            s => {
                let k: usize = s.parse().map_err(|_| {
                    anyhow::anyhow!("--gpu {s}: expected a number of layers or `all`")
                })?;
                if k > n {
                    bail!("--gpu {k}: the model has {n} layers");
                }
                (n - k..n, false)
            }
        };
        let gpu = Gpu::open(&GpuOptions {
            adapter: g.gpu_adapter.clone(),
            allow_software: g.allow_software_gpu,
        })?;
        if verbose {
            eprintln!(
                "gpu: {} ({:?}), layers {layers:?}{}",
                gpu.report.name,
                gpu.report.kind,
                if ends {
                    " and the embedding and output head"
                } else {
                    ""
                }
            );
        }
        let mut l = GpuLayers::upload(&gpu, model, layers)?;
        if ends {
            l = l.with_ends(model)?;
        }
        Ok(engine::Session::with_gpu(model, ctx, l)?)
    }
    #[cfg(not(feature = "gpu"))]
    {
        let _ = (model, ctx, verbose);
        bail!("--gpu {spec}: this primad was built without the gpu feature")
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    let (model, tok) = load(&a.model)?;
    let prompt = if a.chat {
        tok.apply_chat_template(&[Message::new("user", &a.prompt)])?
    } else {
        a.prompt.clone()
    };
    // Chat templates carry special tokens as text: parse them; raw prompts
    // are taken literally except for BOS, as llama.cpp does.
    let ids = tok.encode(&prompt, true, a.chat)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenisation");
    }
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        presence_penalty: a.presence_penalty,
        seed: a.seed,
        ..SamplerConfig::default()
    });
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
        ctx: a.ctx,
        ..Default::default()
    };
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    let ctx = a.ctx.min(model.config.ctx_train).max(1);
    let mut session = session(&model, ctx, &a.gpu, true)?;
    let mut on_text =
        |piece: &str, _: &[u32]| match out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
            Ok(()) => true,
            Err(e) => {
                write_err = Some(e);
                false
            }
        };
    let g = if a.draft.enabled() {
        let dm = a.draft.open_model(&model)?;
        let draft = any_draft(&a.draft, &model, dm.as_ref(), ctx)?;
        let mut spec =
            prima_kernels::speculative::Speculative::new(&mut session, draft, a.draft.params());
        spec.set_end(ids.len() + a.max_tokens);
        let g = engine::generate_with(&mut spec, &tok, &ids, &params, &mut sampler, &mut on_text)?;
        let st = spec.stats;
        eprintln!(
            "speculative ({}): {:.0}% of {} proposals accepted; {} passes of the model for {} tokens",
            a.draft.describe(),
            100.0 * st.acceptance(),
            st.drafted,
            st.target_passes,
            g.ids.len()
        );
        g
    } else {
        engine::generate_with(
            &mut session,
            &tok,
            &ids,
            &params,
            &mut sampler,
            &mut on_text,
        )?
    };
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    let pp = g.prompt_ids.len() as f64 / g.prefill_time.as_secs_f64();
    let tg = g.ids.len() as f64 / g.decode_time.as_secs_f64().max(1e-9);
    if a.ids {
        eprintln!(
            "{}",
            serde_json::json!({
                "prompt_ids": g.prompt_ids,
                "output_ids": g.ids,
                "finish_reason": g.finish.as_str(),
                "prefill_tok_s": pp,
                "decode_tok_s": tg,
            })
        );
    }
    tracing::info!(
        prompt_tokens = g.prompt_ids.len(),
        generated = g.ids.len(),
        prefill_tok_s = format!("{pp:.1}"),
        decode_tok_s = format!("{tg:.1}"),
        "done"
    );
    Ok(())
}

fn perplexity(a: PerplexityArgs) -> Result<()> {
    let (model, tok) = load(&a.model)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let json = a.json;
    let r = engine::perplexity(&model, &tok, &text, a.ctx, |done, total| {
        if !json {
            eprint!("\rperplexity: chunk {done}/{total}");
            if done == total {
                eprintln!();
            }
        }
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"ppl": r.ppl, "chunks": r.chunks, "tokens": r.tokens})
        );
    } else {
        let chunks: Vec<String> = r.chunks.iter().map(|c| format!("{c:.4}")).collect();
        println!("chunks: [{}]", chunks.join(", "));
        println!("tokens: {}", r.tokens);
        println!("perplexity: {:.4}", r.ppl);
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let (model, tok) = load_path(&a.model)?;
    let f = &model.file;
    let c = &model.config;
    let mut mix: Vec<(GgmlType, usize, u64)> = Vec::new();
    for t in &f.tensors {
        match mix.iter_mut().find(|m| m.0 == t.ty) {
            Some(m) => {
                m.1 += 1;
                m.2 += t.size;
            }
            None => mix.push((t.ty, 1, t.size)),
        }
    }
    mix.sort_by_key(|m| std::cmp::Reverse(m.2));
    let params: u64 = f.tensors.iter().map(|t| t.n_elements()).sum();
    let weight_bytes: u64 = f.tensors.iter().map(|t| t.size).sum();
    let name = f
        .metadata
        .opt_str("general.name")
        .ok()
        .flatten()
        .unwrap_or("(unnamed)");
    if a.json {
        let v = serde_json::json!({
            "file": a.model.display().to_string(),
            "name": name,
            "gguf_version": f.version,
            "file_bytes": f.file_len(),
            "architecture": c.arch.name(),
            "layers": c.n_layer,
            "embedding": c.n_embd,
            "feed_forward": c.n_ff,
            "heads": c.n_head,
            "kv_heads": c.n_head_kv,
            "head_dim": c.head_dim,
            "vocab": c.n_vocab,
            "context_train": c.ctx_train,
            "rope_base": c.rope_base,
            "sliding_window": c.sliding_window,
            "parameters": params,
            "weight_bytes": weight_bytes,
            "tensors": f.tensors.len(),
            "quant_mix": mix.iter().map(|(t, n, b)| serde_json::json!({"type": t.name(), "tensors": n, "bytes": b})).collect::<Vec<_>>(),
            "tokenizer": tok.model_name(),
            "bos": tok.bos, "eos": tok.eos, "add_bos": tok.add_bos,
            "chat_template": tok.chat_template,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "file          {} ({:.1} MB, GGUF v{})",
        a.model.display(),
        f.file_len() as f64 / 1e6,
        f.version
    );
    println!("name          {name}");
    println!("architecture  {}", c.arch.name());
    println!(
        "shape         {} layers, d_model {}, ffn {}, heads {} / kv {}, head dim {}",
        c.n_layer, c.n_embd, c.n_ff, c.n_head, c.n_head_kv, c.head_dim
    );
    println!("vocabulary    {}", c.n_vocab);
    println!("context       {} (trained)", c.ctx_train);
    print!("rope          base {}", c.rope_base);
    if let Some(w) = c.sliding_window {
        print!(
            ", sliding window {w} (local base {}), every {}th layer global",
            c.rope_base_swa, c.swa_pattern
        );
    }
    println!();
    println!(
        "parameters    {:.1} M in {} tensors, {:.1} MB of weights",
        params as f64 / 1e6,
        f.tensors.len(),
        weight_bytes as f64 / 1e6
    );
    println!("quant mix");
    for (t, n, b) in &mix {
        println!(
            "  {:<6} {:>4} tensors {:>8.1} MB",
            t.name(),
            n,
            *b as f64 / 1e6
        );
    }
    println!(
        "tokenizer     {}, bos {:?}, eos {:?}, add_bos {}",
        tok.model_name(),
        tok.bos.and_then(|i| tok.token_text(i)),
        tok.eos.and_then(|i| tok.token_text(i)),
        tok.add_bos
    );
    match &tok.chat_template {
        Some(t) => println!("chat template {} bytes:\n{}", t.len(), indent(t)),
        None if tok.chat_template_source() == prima_kernels::tokenizer::chat::GEMMA => {
            println!("chat template (none; Gemma's turn format is used)")
        }
        None => println!("chat template (none; ChatML is used)"),
    }
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let gguf = prima_kernels::Gguf::open(&a.model)
        .with_context(|| format!("opening {}", a.model.display()))?;
    let tok = Tokenizer::from_metadata(&gguf.metadata)?;
    let text = match (&a.prompt, &a.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => bail!("give the text with --prompt or --file"),
    };
    let ids = tok.encode(&text, !a.no_special, a.parse_special)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

/// Median, min and max of a set of rates.
fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let median = if v.is_empty() { 0.0 } else { v[v.len() / 2] };
    serde_json::json!({
        "median": median,
        "min": v.first().copied().unwrap_or(0.0),
        "max": v.last().copied().unwrap_or(0.0),
        "runs": v,
    })
}

fn bench(a: BenchArgs) -> Result<()> {
    let (model, tok) = load(&a.model)?;
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let ctx = (a.prompt_tokens.max(a.gen_tokens) + 1).min(model.config.ctx_train);
    // Real text, repeated to length: ids that occur in practice.
    let sample = tok.encode("The quick brown fox jumps over the lazy dog. Households own many devices, and together they can run a model none of them could run alone. ", false, false)?;
    let prompt: Vec<u32> = sample
        .iter()
        .copied()
        .cycle()
        .take(a.prompt_tokens)
        .collect();
    // Warm-up: touch every weight once.
    if sample.is_empty() {
        bail!("the model's tokenizer produced no tokens for the benchmark text");
    }
    let (pp, tg) = bench_run(
        &|ctx| Ok(engine::Session::new(&model, ctx)),
        &a,
        ctx,
        &sample,
        &prompt,
    )?;
    // The same tests with layers on the GPU, in the same run (each session
    // uploads its layers before its clock starts).
    let gpu = match &a.gpu.gpu {
        Some(_) => Some(bench_run(
            &|ctx| session(&model, ctx, &a.gpu, false),
            &a,
            ctx,
            &sample,
            &prompt,
        )?),
        None => None,
    };
    // Decode again with speculation, same tokens (greedy), same run.
    let spec = if a.draft.enabled() && a.gen_tokens > 0 {
        let dm = a.draft.open_model(&model)?;
        let mut runs = Vec::new();
        let mut stats = prima_kernels::speculative::SpecStats::default();
        for _ in 0..a.reps {
            let mut target = engine::Session::new(&model, ctx);
            let draft = any_draft(&a.draft, &model, dm.as_ref(), ctx)?;
            let mut s =
                prima_kernels::speculative::Speculative::new(&mut target, draft, a.draft.params());
            s.set_end(a.gen_tokens + 1);
            let mut next = sample[0];
            let t = Instant::now();
            for _ in 0..a.gen_tokens {
                let logits = engine::Evaluator::eval_last(&mut s, &[next])?;
                next = prima_kernels::sample::argmax(&logits);
            }
            runs.push(a.gen_tokens as f64 / t.elapsed().as_secs_f64());
            stats = s.stats;
        }
        Some((runs, stats))
    } else {
        None
    };
    let weight_bytes: u64 = model.file.tensors.iter().map(|t| t.size).sum();
    let mut v = serde_json::json!({
        "model": a.model.model.display().to_string(),
        "threads": prima_kernels::cpu::threads(),
        "kernels": prima_kernels::cpu::describe(),
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "prefill_tok_s": stats(pp),
        "decode_tok_s": stats(tg),
        "bytes_per_token": weight_bytes,
    });
    if let Some((runs, st)) = spec {
        let plain = v["decode_tok_s"]["median"].as_f64().unwrap_or(0.0);
        let sv = stats(runs);
        let speedup = sv["median"].as_f64().unwrap_or(0.0) / plain.max(1e-9);
        v["speculative"] = serde_json::json!({
            "draft": a.draft.describe(),
            "max_draft": a.draft.draft_max,
            "p_min": a.draft.draft_p_min,
            "decode_tok_s": sv,
            "speedup": speedup,
            "acceptance": st.acceptance(),
            "drafted": st.drafted,
            "accepted": st.accepted,
            "target_passes": st.target_passes,
        });
    }
    if let Some((gpp, gtg)) = gpu {
        let med = |k: &str, v: &serde_json::Value| v[k]["median"].as_f64().unwrap_or(0.0);
        let g = serde_json::json!({
            "layers": a.gpu.gpu,
            "prefill_tok_s": stats(gpp),
            "decode_tok_s": stats(gtg),
        });
        v["gpu_vs_cpu"] = serde_json::json!({
            "prefill": med("prefill_tok_s", &g) / med("prefill_tok_s", &v).max(1e-9),
            "decode": med("decode_tok_s", &g) / med("decode_tok_s", &v).max(1e-9),
        });
        v["gpu"] = g;
    }
    if a.bandwidth {
        let bw = primad::profiler::read_bandwidth();
        v["read_bandwidth_gb_s"] = serde_json::json!(bw / 1e9);
        v["decode_ceiling_tok_s"] = serde_json::json!(bw / weight_bytes as f64);
    }
    if a.json {
        println!("{v}");
    } else {
        let f = |k: &str| {
            format!(
                "{:.1} ({:.1}-{:.1})",
                v[k]["median"].as_f64().unwrap_or(0.0),
                v[k]["min"].as_f64().unwrap_or(0.0),
                v[k]["max"].as_f64().unwrap_or(0.0)
            )
        };
        println!("model     {}", a.model.model.display());
        println!(
            "threads   {} ({})",
            v["threads"],
            prima_kernels::cpu::describe()
        );
        println!("pp{:<6} {} tok/s", a.prompt_tokens, f("prefill_tok_s"));
        println!("tg{:<6} {} tok/s", a.gen_tokens, f("decode_tok_s"));
        if !v["speculative"].is_null() {
            let sp = &v["speculative"];
            println!(
                "spec tg{:<4} {:.1} tok/s, {:.2}x plain ({}; {:.0}% of {} proposals accepted, {} passes for {} tokens)",
                a.gen_tokens,
                sp["decode_tok_s"]["median"].as_f64().unwrap_or(0.0),
                sp["speedup"].as_f64().unwrap_or(0.0),
                a.draft.describe(),
                100.0 * sp["acceptance"].as_f64().unwrap_or(0.0),
                sp["drafted"],
                sp["target_passes"],
                a.gen_tokens
            );
        }
        if !v["gpu"].is_null() {
            let g = |k: &str| {
                format!(
                    "{:.1} ({:.1}-{:.1})",
                    v["gpu"][k]["median"].as_f64().unwrap_or(0.0),
                    v["gpu"][k]["min"].as_f64().unwrap_or(0.0),
                    v["gpu"][k]["max"].as_f64().unwrap_or(0.0)
                )
            };
            let layers = a.gpu.gpu.as_deref().unwrap_or("");
            println!(
                "gpu ({layers}) pp{:<6} {} tok/s, {:.2}x the CPU",
                a.prompt_tokens,
                g("prefill_tok_s"),
                v["gpu_vs_cpu"]["prefill"].as_f64().unwrap_or(0.0)
            );
            println!(
                "gpu ({layers}) tg{:<6} {} tok/s, {:.2}x the CPU",
                a.gen_tokens,
                g("decode_tok_s"),
                v["gpu_vs_cpu"]["decode"].as_f64().unwrap_or(0.0)
            );
        }
        if a.bandwidth {
            println!(
                "memory    {:.1} GB/s read; {:.1} MB per token; ceiling {:.0} tok/s",
                v["read_bandwidth_gb_s"].as_f64().unwrap_or(0.0),
                weight_bytes as f64 / 1e6,
                v["decode_ceiling_tok_s"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

/// Prefill and decode speeds (tok/s), `a.reps` times, of sessions `make`
/// builds for a context of `ctx`.
fn bench_run<'m>(
    make: &dyn Fn(usize) -> Result<engine::Session<'m>>,
    a: &BenchArgs,
    ctx: usize,
    sample: &[u32],
    prompt: &[u32],
) -> Result<(Vec<f64>, Vec<f64>)> {
    make(8)?.eval_last(&sample[..1])?;
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..a.reps {
        if a.prompt_tokens > 0 {
            let mut s = make(ctx)?;
            let t = Instant::now();
            s.eval_last(prompt)?;
            pp.push(a.prompt_tokens as f64 / t.elapsed().as_secs_f64());
        }
        if a.gen_tokens > 0 {
            let mut s = make(ctx)?;
            let mut next = sample[0];
            let t = Instant::now();
            for _ in 0..a.gen_tokens {
                let logits = s.eval_last(&[next])?;
                next = prima_kernels::sample::argmax(&logits);
            }
            tg.push(a.gen_tokens as f64 / t.elapsed().as_secs_f64());
        }
    }
    Ok((pp, tg))
}

fn synth(a: SynthArgs) -> Result<()> {
    let mut shape = primad::synth::Shape::named(&a.shape)
        .ok_or_else(|| anyhow::anyhow!("unknown shape '{}' (tiny, 1b, 3b, ref, 8b)", a.shape))?;
    if let Some(l) = a.layers {
        shape.n_layer = l;
    }
    if let Some(e) = a.embd {
        shape.n_embd = e;
    }
    if let Some(f) = a.ff {
        shape.n_ff = f;
    }
    let quant = primad::synth::parse_quant(&a.quant)?;
    if a.out.exists() && !a.force {
        anyhow::bail!("{} exists (pass --force to overwrite)", a.out.display());
    }
    let src = match a.tokenizer_from {
        Some(p) => p,
        None => prima_kernels::models_dir()
            .context("no model cache (set PRIMA_MODELS or HOME)")?
            .join("SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    let tok = prima_kernels::gguf::Gguf::open(&src).with_context(|| {
        format!(
            "reading the tokenizer source {} (fetch it with scripts/fetch-models smollm2, or pass --tokenizer-from)",
            src.display()
        )
    })?;
    let w = primad::synth::plan(shape, quant, &tok)?;
    let total = w.file_size();
    eprintln!(
        "writing {}: {} layers, d_model {}, d_ff {}, {}/{} heads, {}, {:.2} GB",
        a.out.display(),
        shape.n_layer,
        shape.n_embd,
        shape.n_ff,
        shape.n_head,
        shape.n_head_kv,
        quant.name(),
        total as f64 / 1e9
    );
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("template"),
    );
    primad::synth::write(&w, &a.out, a.seed, |n| bar.set_position(n))?;
    bar.finish_and_clear();
    println!("{}", a.out.display());
    Ok(())
}

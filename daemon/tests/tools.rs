//! The engine tools of the `primad` binary, run as a user would.

use std::{path::PathBuf, process::Command};

fn models() -> PathBuf {
    prima_kernels::models_dir().expect("HOME or PRIMA_MODELS is set")
}

fn smol() -> PathBuf {
    let p = models().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} missing: run scripts/fetch-models",
        p.display()
    );
    p
}

fn primad(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_primad"))
        .args(args)
        .output()
        .expect("run primad")
}

#[test]
fn generate_prints_exactly_the_generated_text() {
    let m = smol();
    let out = primad(&[
        "generate",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "The capital of France is",
        "-n",
        "32",
        "-t",
        "2",
        "--ids",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The shared llama.cpp reference for this prompt.
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        " Paris.\n\nThe United States has a population of approximately 311 million people.\n\nThe United States has a population of approximately 31"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(stderr.lines().rev().find(|l| l.starts_with('{')).unwrap()).unwrap();
    assert_eq!(
        json["prompt_ids"],
        serde_json::json!([504, 3575, 282, 4649, 314])
    );
    assert_eq!(json["output_ids"].as_array().unwrap().len(), 32);
    assert_eq!(json["finish_reason"], "length");
}

/// Every case of the shared llama.cpp reference, through the binary as a
/// user runs it: `primad generate` at temperature 0 prints exactly
/// llama.cpp's text and reports exactly its token ids, on both models.
#[test]
fn generate_reproduces_every_shared_reference_case() {
    if !prima_kernels::cpu::simd_enabled() {
        // The portable kernels sum in ggml's reference order, not its x86
        // order; the engine tests hold them to the near-tie rule instead.
        eprintln!("PRIMA_SIMD=off: exact reference match is checked with the SIMD kernels only");
        return;
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../kernels/tests/data/llama-cpp-reference.json");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut checked = 0;
    for (model, m) in r["models"].as_object().unwrap() {
        let file = models().join(model);
        assert!(
            file.exists(),
            "{} missing: run scripts/fetch-models",
            file.display()
        );
        for c in m["cases"].as_array().unwrap() {
            let want_ids = &c["output_ids"];
            let n = want_ids.as_array().unwrap().len().to_string();
            let prompt = c["prompt"].as_str().unwrap();
            let out = primad(&[
                "generate",
                "-m",
                file.to_str().unwrap(),
                "-p",
                prompt,
                "-n",
                &n,
                "--temperature",
                "0",
                "--ids",
            ]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{model} {prompt:?}: {stderr}");
            let json: serde_json::Value =
                serde_json::from_str(stderr.lines().rev().find(|l| l.starts_with('{')).unwrap())
                    .unwrap();
            assert_eq!(json["prompt_ids"], c["prompt_ids"], "{model} {prompt:?}");
            assert_eq!(&json["output_ids"], want_ids, "{model} {prompt:?}");
            assert_eq!(
                String::from_utf8(out.stdout).unwrap(),
                c["output"].as_str().unwrap(),
                "{model} {prompt:?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 6, "the reference has three cases per model");
}

#[test]
fn generate_stops_at_stop_strings_and_chat_ends_at_end_of_turn() {
    let m = smol();
    let out = primad(&[
        "generate",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "The capital of France is",
        "-n",
        "32",
        "--stop",
        "\n",
    ]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), " Paris.");
    let out = primad(&[
        "generate",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "Say hello.",
        "--chat",
        "-n",
        "200",
        "--ids",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("<|im_end|>") && !text.is_empty(), "{text:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("\"finish_reason\":\"stop\""), "{stderr}");
}

#[test]
fn sampling_is_seeded() {
    let m = smol();
    let run = |seed: &str| {
        let out = primad(&[
            "generate",
            "-m",
            m.to_str().unwrap(),
            "-p",
            "Once upon a time",
            "-n",
            "24",
            "--temperature",
            "1.0",
            "--seed",
            seed,
        ]);
        assert!(out.status.success());
        out.stdout
    };
    assert_eq!(run("1"), run("1"));
    assert_ne!(run("1"), run("2"));
}

#[test]
fn perplexity_json_and_inspect() {
    let m = smol();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kernels/tests/data/ppl.txt");
    let out = primad(&[
        "perplexity",
        "-m",
        m.to_str().unwrap(),
        "-f",
        data.to_str().unwrap(),
        "--ctx",
        "128",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ppl = v["ppl"].as_f64().unwrap();
    assert!((ppl - 22.4761).abs() / 22.4761 < 0.01, "{ppl}");
    assert_eq!(v["tokens"], 898);
    assert_eq!(v["chunks"].as_array().unwrap().len(), 7);

    let out = primad(&["inspect", "-m", m.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["layers"], 30);
    assert_eq!(v["vocab"], 49152);
    assert_eq!(v["quant_mix"][0]["type"], "Q4_1");
    assert!(v["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    let out = primad(&["inspect", "-m", m.to_str().unwrap()]);
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .contains("architecture  llama"));
}

#[test]
fn bad_model_files_give_clear_errors() {
    let dir = std::env::temp_dir().join(format!("primad-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A truncated copy of the real model.
    let bytes = std::fs::read(smol()).unwrap();
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = primad(&["generate", "-m", truncated.to_str().unwrap(), "-p", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("needs") && err.contains("remaining in file"),
        "{err}"
    );
    let text = dir.join("text.gguf");
    std::fs::write(&text, b"hello world, not a model").unwrap();
    let out = primad(&["inspect", "-m", text.to_str().unwrap()]);
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("not a GGUF file"));
    let out = primad(&["generate", "-m", "/nonexistent.gguf", "-p", "hi"]);
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("cannot open /nonexistent.gguf"));
    std::fs::remove_dir_all(&dir).ok();
}

fn devices_file() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/devices-two.json").to_string()
}

#[test]
fn plan_splits_the_real_model_and_explains_drops() {
    let m = smol();
    let m = m.to_str().unwrap();
    let out = primad(&["plan", "--devices", &devices_file(), "-m", m, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let k = v["k"].as_u64().unwrap();
    let total: u64 = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["window"].as_u64().unwrap())
        .sum();
    assert_eq!(k * total, 30, "windows must cover SmolLM2's 30 layers: {v}");
    // The text form names both devices and says why one is unused.
    let out = primad(&["plan", "--devices", &devices_file(), "-m", m]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("desktop") && text.contains("laptop"),
        "{text}"
    );
    assert!(text.contains("TPOT"), "{text}");
    let out = primad(&[
        "plan",
        "--devices",
        &devices_file(),
        "-m",
        m,
        "--mode",
        "shipped",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("shipped"));
    let out = primad(&[
        "plan",
        "--devices",
        &devices_file(),
        "-m",
        m,
        "--mode",
        "fast",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("optimal or shipped"));
}

#[test]
fn profile_measures_the_models_weight_types() {
    let m = smol();
    let dir = std::env::temp_dir();
    let out = primad(&[
        "profile",
        "--json",
        "-m",
        m.to_str().unwrap(),
        "--scratch",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for ty in ["q4_1", "q8_0", "f32"] {
        let g = v["cpu"]["flops"][ty].as_f64().unwrap_or(0.0);
        assert!(g > 0.1, "{ty}: {g} GFLOPS");
    }
    assert!(
        v["memory"]["total_bytes"].as_u64().unwrap()
            >= v["memory"]["available_bytes"].as_u64().unwrap()
    );
    assert!(v["disk"]["seq_read_gbps"].as_f64().unwrap() > 0.0);
    // The record is what `primad plan --devices` reads.
    let dev: halda::DeviceProfile = serde_json::from_value(v).unwrap();
    assert_eq!(dev.cpu.threads.map(|t| t > 0), Some(true));
}

/// `--draft-layers` and `--draft-model` change how fast, not what: the text
/// is the plain greedy text, sampled text too (the same seed), and the
/// acceptance is reported; a draft with another vocabulary is refused.
#[test]
fn speculative_generation_gives_the_same_text() {
    let m = smol();
    let m = m.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "-m", m, "-p", "Once upon a time", "-n", "40"];
        args.extend_from_slice(extra);
        let o = primad(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            String::from_utf8(o.stdout).unwrap(),
            String::from_utf8(o.stderr).unwrap(),
        )
    };
    let (plain, _) = run(&[]);
    for extra in [
        &["--draft-layers", "10", "--draft-p-min", "0"][..],
        &["--draft-model", m, "--draft-max", "5"],
    ] {
        let (text, err) = run(extra);
        assert_eq!(text, plain, "{extra:?}");
        assert!(err.contains("proposals accepted"), "{err}");
    }
    let sampled = ["--temperature", "0.8", "--seed", "7"];
    let (want, _) = run(&sampled);
    let (got, _) = run(&[&sampled[..], &["--draft-model", m]].concat());
    assert_eq!(got, want, "sampling from the target's logits, same seed");
    let g = models().join("gemma-3-270m-q4_k_m.gguf");
    let o = primad(&[
        "generate",
        "-m",
        m,
        "-p",
        "Hi",
        "--draft-model",
        g.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("vocabulary"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
